"""Presets (`--preset NAME`): each workflow's settings as the issue fixes them, overridden as --config is, one
tiny step of each on CPU. W&B logging of a real 2-worker run is checked on tests/test_ray_train.py's run."""

import glob
import subprocess
import sys

import pytest
import torch
import torchvision

from raydist import presets
from raydist.errors import ConfigError
from raydist.cli import parse_cli
from raydist.loop.context import local_context
from raydist.loop.run import run

# What each preset must hold: the workflow's own values wherever the workflow states one (issues 17 and 30),
# not raydist's defaults. Every seed trains in fp32.
EXPECTED = {
    "dli": dict(dataset="cifar10", model="wrn_dli", augment="dli", normalize="0.5", num_workers=4, batch_size=128,
                precision="fp32", optimizer="sgd", lr=0.01, lr_scaling="none", target_accuracy=0.75, patience=2),
    "horovod-resnet18": dict(dataset="cifar10", model="resnet18", batch_size=256, val_batch_size=256, epochs=50,
                             precision="fp32", optimizer="sgd", momentum=0.9, nesterov=False, weight_decay=5e-5,
                             lr=0.1, lr_scaling="per_worker", warmup_epochs=5.0, warmup_from="single_worker",
                             lr_schedule="step", lr_milestones="30,60,80", lr_step_gamma=0.1, fp16_allreduce=False),
    "workload": dict(dataset="fake", fake_image_size=224, fake_num_classes=100, fake_train_size=100_000,
                     augment="none", model="resnet50_imagenet", sync_batchnorm=True, batch_size=64, precision="fp32",
                     lr=0.001, lr_scaling="none", weight_decay=0.0, epochs=100, checkpoint_every=0),
    # the reference's milestones 60,120,160 count epochs from 1 (see the test below)
    "cifar100-resnet50": dict(dataset="cifar100", model="resnet50", num_workers=2, batch_size=128, wandb=True,
                              precision="fp32", epochs=200, warmup_epochs=1.0, lr_schedule="step",
                              lr_milestones="59,119,159", lr_step_gamma=0.2, momentum=0.9, nesterov=False,
                              weight_decay=5e-4),
}
# Where a preset differs from its workflow on purpose, its header says so in these words.
DIFFERENCES = {
    "dli": ["validation is a seeded 10% of the training set, not the test set", "momentum 0.9 (plain)",
            "a\n  constant LR"],
    "horovod-resnet18": ["validation is a seeded 10% of the training set, where Horovod's script validates on the test"],
    "workload": ["a validation pass", "momentum, warmup and cosine"],
    "cifar100-resnet50": ["the LR scales with the global batch", "no 15 deg rotation"],
}


def test_every_shipped_preset_is_checked_here():
    assert sorted(EXPECTED) == presets.names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_preset_resolves_to_its_workflows_values(name):
    cfg, explicit, config_files = parse_cli(["--preset", name])
    assert {key: getattr(cfg, key) for key in EXPECTED[name]} == EXPECTED[name]
    assert explicit == {} and config_files == [presets.path(name)]
    head = presets.header(name)
    assert head[0].startswith(f"{name}: ") and any(line.startswith("Kept exactly") for line in head)
    text = " ".join(head)
    assert all(difference.replace("\n  ", " ") in text for difference in DIFFERENCES[name]), text


def test_cifar100s_lr_drops_at_the_epochs_the_references_multisteplr_does():
    """pytorch-cifar100 calls MultiStepLR([60, 120, 160], gamma=0.2).step(epoch) before each epoch, epochs
    counted from 1, after one warmup epoch: the 60th epoch trains at 0.2 x the LR already. The preset's
    schedule, through the loop's own LR function, gives each epoch that LR (the preset's 60,120,160 trained
    the 60th epoch at the old LR: a drop one epoch late)."""
    import bisect

    from raydist.loop.recipe import lr_factor

    cfg, _, _ = parse_cli(["--preset", "cifar100-resnet50"])
    updates = 10  # per epoch; any number
    milestones = [epoch * updates for epoch in cfg.milestone_list()]
    for epoch in range(2, cfg.epochs + 1):  # 1-based, after the warmup epoch
        reference = 0.2 ** bisect.bisect_right([60, 120, 160], epoch)
        for update in ((epoch - 1) * updates, epoch * updates - 1):  # its first and last update
            ours = lr_factor(update, warmup=updates, total=cfg.epochs * updates, schedule=cfg.lr_schedule,
                             step_every=10**6, gamma=cfg.lr_step_gamma, milestones=milestones)
            assert ours == pytest.approx(reference), (epoch, update)


def test_horovods_lr_rule_comes_out_of_the_preset_exactly():
    """LR = 0.1 x workers x batches per allreduce x adj; in the warmup, Horovod's adj at step u (0-based) of
    W is (1 + (u + 1) / W x (workers - 1)) / workers: from one worker's LR up to the scaled one."""
    from raydist.config.rates import lr_scale
    from raydist.loop.recipe import lr_factor

    workers, warmup, milestones = 4, 100, [300, 600, 800]
    cfg, _, _ = parse_cli(["--preset", "horovod-resnet18", "--num-workers", str(workers), "--grad-accum", "2"])
    peak = cfg.lr * lr_scale(cfg, cfg.global_batch_at(workers))
    assert peak == pytest.approx(0.1 * workers * 2)
    for update, adj in [(0, (1 + 1 / warmup * (workers - 1)) / workers), (49, (1 + 50 / warmup * (workers - 1)) / workers),
                        (warmup - 1, 1.0), (299, 1.0), (300, 0.1), (650, 0.01), (900, 0.001)]:
        factor = lr_factor(update, warmup=warmup, total=1000, schedule="step", step_every=10**6, gamma=0.1,
                           milestones=milestones, warmup_start=1 / workers)
        assert peak * factor == pytest.approx(peak * adj), update


def test_flags_and_config_files_override_a_preset(tmp_path):
    override = tmp_path / "mine.yaml"
    override.write_text("batch_size: 64\npatience: 3\n")
    cfg, _, files = parse_cli(["--preset", "dli", "--config", str(override), "--patience", "4", "--epochs", "7"])
    assert (cfg.model, cfg.batch_size, cfg.patience, cfg.epochs) == ("wrn_dli", 64, 4, 7)
    assert files == [presets.path("dli"), str(override)]


def test_preset_list_names_each_preset_and_the_notebook_studies(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_cli(["--preset", "list"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name in presets.names():
        assert f"\n{name}: " in f"\n{out}"
    assert "cifar10_tune_cnn: " in out and "fashion_mnist_transfer: " in out


def test_an_unknown_preset_is_one_line_with_exit_2():
    with pytest.raises(ConfigError, match=r"--preset 'dlii' is not a preset; known: cifar100-resnet50, dli, "):
        parse_cli(["--preset", "dlii"])
    result = subprocess.run([sys.executable, "-m", "raydist.train", "--preset", "dlii"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "known:" in result.stderr


# ---- one tiny step of each preset, on CPU, with its sizes overridden -------------------------------------

# Sizes only (and one worker, in this process): the model, data set, optimizer and schedule stay the preset's. SyncBatchNorm runs on CUDA
# only, so the workload's is turned off here (its GPU check is raydist.run_config.check_sync_batchnorm's).
TINY = {
    "dli": ["--train-per-class", "1", "--batch-size", "8"],
    "horovod-resnet18": ["--train-per-class", "1", "--batch-size", "8", "--val-batch-size", "16",
                         "--warmup-epochs", "0.5"],
    "workload": ["--fake-image-size", "64", "--fake-train-size", "8", "--fake-val-size", "8", "--batch-size", "8",
                 "--no-sync-batchnorm"],
    "cifar100-resnet50": ["--classes", "0-9", "--train-per-class", "1", "--batch-size", "8"],
}


@pytest.fixture
def cifar_files(tmp_path, monkeypatch):
    """Small CIFAR-10 and CIFAR-100 files in their published format (test_data writes and checks them)."""
    from test_data import _trust_written_files, _write_cifar

    for cls, key, classes, per_file in ((torchvision.datasets.CIFAR10, "labels", 10, 60),
                                        (torchvision.datasets.CIFAR100, "fine_labels", 100, 1000)):
        folder, _ = _write_cifar(tmp_path / "data", cls, per_file, key, classes)
        _trust_written_files(monkeypatch, cls, folder)
    return tmp_path / "data"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_trains_one_tiny_step_on_cpu(name, cifar_files, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, _, _ = parse_cli(["--preset", name, "--epochs", "1", "--warmup-epochs", "0", "--no-use-gpu", "--num-workers", "1",
                           "--data-dir", str(cifar_files), *TINY[name]])
    (metrics,) = run(cfg, local_context(str(tmp_path / "run"), log_dir=str(tmp_path / "run" / "tensorboard")))
    assert torch.isfinite(torch.tensor([metrics["train_loss"], metrics["val_loss"]])).all()
    saved = torch.load(tmp_path / "run" / "model_final.pt", map_location="cpu", weights_only=False)
    kept = ("dataset", "model", "optimizer", "lr", "lr_scaling", "lr_schedule", "augment", "normalize")
    assert {key: saved["config"][key] for key in kept} == {key: getattr(cfg, key) for key in kept}
    assert (cfg.dataset, cfg.model) == (EXPECTED[name]["dataset"], EXPECTED[name]["model"])
    assert bool(glob.glob(str(tmp_path / "run" / "tensorboard" / "wandb" / "offline-run-*"))) == (name == "cifar100-resnet50")
