"""Transfer learning through the commands users run: refusals before anything starts, a 2-worker gradual
fine-tune on the session's Ray cluster, and a transfer study through `python -m raydist.tune`."""

import os
import subprocess
import sys

import pytest
import torch
from cli import run_main
from conftest import digits_val_accuracy, read_csv, start_tune, wait_for_free_cluster

from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import FINAL_MODEL_FILE
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory):
    """resnet8 trained on digits 0-4 by raydist's loop: the model_final.pt that transfer starts from."""
    folder = tmp_path_factory.mktemp("source")
    cfg = TrainConfig(dataset="digits", classes="0-4", epochs=8, num_workers=1, cpus_per_worker=2.0,
                      batch_size=32, lr=0.4, warmup_epochs=0.5)
    validate(cfg)
    assert run(cfg, local_context(str(folder)))[-1]["val_acc"] > 0.9
    return str(folder / FINAL_MODEL_FILE)


def _train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raydist.train", *args], capture_output=True, text=True,
                          timeout=300, env=env)


UNUSABLE = {  # the case, its flags, what its one line says
    "missing file": (lambda tmp, source: ["--weights", str(tmp / "nope.pt")], "no such file"),
    "pretrained offline": (lambda tmp, source: ["--model", "resnet18_imagenet", "--pretrained"],
                           "resnet18-f37072fd.pth"),  # torch.hub says what it tried to fetch
    "wrong model": (lambda tmp, source: ["--model", "resnet18_imagenet", "--weights", source],
                    "does not fit --model resnet18_imagenet"),
    "scratch linear": (lambda tmp, source: ["--finetune", "linear"], "starts from scratch"),
    "colour data grey stem": (lambda tmp, source: ["--dataset", "cifar10", "--download", "--grey-input", "sum"],
                              "cifar10 is in colour"),
}


def _assert_refused(code, out, err, expected, runs):
    assert code == 2, err[-2000:]
    # nothing ran: the config line comes right before the cluster starts
    assert "config:" not in out and "Ray" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydist.train: error: "), err
    assert expected in lines[0]
    assert not os.path.exists(runs)  # nothing half-written


@pytest.mark.parametrize("case", [c for c in UNUSABLE if c != "pretrained offline"])
def test_unusable_starting_weights_are_one_line_and_exit_2_before_any_cluster_starts(tmp_path, source_weights, case,
                                                                                    capsys, monkeypatch):
    flags, expected = UNUSABLE[case]
    code, out, err = run_main("raydist.train", [*flags(tmp_path, source_weights), "--storage-path",
                                                str(tmp_path / "runs")], capsys, monkeypatch)
    _assert_refused(code, out, err, expected, tmp_path / "runs")


def test_pretrained_weights_that_cannot_be_fetched_are_one_line_and_exit_2_from_the_real_process(tmp_path):
    """The real process (the table above runs main() in this one): an empty weights cache and no way out,
    with or without internet; exit code 2 and one line before any cluster starts."""
    flags, expected = UNUSABLE["pretrained offline"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9"}
    result = _train(*flags(tmp_path, None), "--storage-path", str(tmp_path / "runs"), env=env)
    _assert_refused(result.returncode, result.stdout, result.stderr, expected, tmp_path / "runs")


def test_a_study_with_missing_weights_is_refused_before_any_trial(tmp_path, capsys, monkeypatch):
    code, _, err = run_main("raydist.tune", ["--search-space", "digits_transfer", "--set", f"weights={tmp_path}/none.pt",
                                             "--storage-path", str(tmp_path / "runs")], capsys, monkeypatch)
    assert code == 2 and "none.pt: no such file" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "runs")


def test_gradual_fine_tuning_on_2_ray_workers_unfreezes_by_stage_and_learns(ray_cluster, source_weights, tmp_path):
    result = _train("--address", ray_cluster, "--weights", source_weights, "--finetune", "gradual",
                    "--classes", "5-9", "--train-per-class", "20", "--batch-size", "10", "--lr", "1.0",
                    "--epochs", "4", "--num-workers", "2", "--storage-path", str(tmp_path), "--name", "gradual")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("epoch 2: training fc, stage3 (", "epoch 3: training fc, stage3, stage2 (",
                 "epoch 4: training fc, stage3, stage2, stage1 ("):
        assert line in result.stdout
    final = torch.load(tmp_path / "gradual" / FINAL_MODEL_FILE, weights_only=True)
    assert final["num_classes"] == 5 and final["metrics"]["world_size"] == 2
    assert final["metrics"]["val_acc"] > 0.35  # chance on 5 classes: 0.2
    assert digits_val_accuracy(final) == pytest.approx(final["metrics"]["val_acc"], abs=1e-6)
    wait_for_free_cluster()


def test_a_transfer_study_searches_the_fine_tuning_mode_through_raydist_tune(ray_cluster, source_weights, tmp_path):
    wait_for_free_cluster()
    proc = start_tune(ray_cluster, "--search-space", "digits_transfer", "--set", f"weights={source_weights}",
                      "--set", "epochs=5", "--set", "warmup_epochs=0.5", "--num-samples", "3", "--scheduler", "fifo",
                      "--storage-path", str(tmp_path), "--name", "transfer")
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]
    rows = read_csv(tmp_path / "transfer" / "results.csv")
    assert len(rows) == 3 and all(row["status"] == "finished" for row in rows), rows
    # the study's first points: one trial per mode, each training what its mode says
    assert sorted(row["finetune"] for row in rows) == ["gradual", "linear", "lp-ft"]
    curves = read_csv(tmp_path / "transfer" / "learning_curves.csv")
    mode = {row["trial_id"]: row["finetune"] for row in rows}
    trainable = {}
    for point in curves:
        trainable.setdefault(mode[point["trial_id"]], []).append(int(float(point["trainable_params"])))
    assert set(trainable["linear"]) == {64 * 5 + 5}  # the head of resnet8 for 5 classes
    assert trainable["gradual"] == sorted(trainable["gradual"]) and len(set(trainable["gradual"])) > 1
    assert trainable["lp-ft"][0] == 64 * 5 + 5 < trainable["lp-ft"][-1]
    best = torch.load(tmp_path / "transfer" / "best_model.pt", weights_only=True)
    assert best["config"]["weights"] == source_weights and best["num_classes"] == 5
    assert best["metrics"]["val_acc"] > 0.35
    assert digits_val_accuracy(best) == pytest.approx(best["metrics"]["val_acc"], abs=1e-6)
    wait_for_free_cluster()
