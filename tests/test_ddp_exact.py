"""The numbers a 2-worker run reports are the saved model's, and a resumed run is the uninterrupted one.

Two gloo DDP processes run raydist's real worker loop (tests/local_ddp.py), with what users run:
augmentation on, dropout where the model has it, 2 workers. Everything here is exact on the CPU.
"""

import pytest
import torch
from conftest import digits_val_accuracy
from local_ddp import run_ddp

from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE, load_checkpoint_file
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate
from raydist.runs.checkpoints import read_model_file

TWO_WORKERS = dict(num_workers=2, cpus_per_worker=1.0, batch_size=64, lr=0.8, warmup_epochs=0.5)


def test_every_epochs_reported_accuracy_is_its_saved_checkpoints_on_the_whole_validation_set(tmp_path):
    # --tta: the mirror-averaged accuracy is reported beside the plain one, and is the saved model's too
    cfg = validate(TrainConfig(epochs=4, checkpoint_every=1, augment="crop_flip", tta=True, **TWO_WORKERS))
    history = run_ddp(cfg, tmp_path)
    assert [m["world_size"] for m in history] == [2] * 4
    assert history[-1]["val_acc"] > 0.6  # it learned (chance: 0.1)
    # what was trained: 2 ranks x 11 batches of 64 (each rank's 719 images, its last partial batch dropped),
    # not the 1,438 images of the training set that images_seen used to count per epoch
    assert [m["images_seen"] for m in history] == [1408 * epoch for epoch in (1, 2, 3, 4)]
    for metrics in history:
        state = load_checkpoint_file(str(tmp_path / f"checkpoint_epoch_{metrics['epoch']:04d}" / CHECKPOINT_FILE))
        saved = {"model": state["model"], "config": state["config"]}
        # to the sample: 359 validation images, so one image is 0.0028
        assert digits_val_accuracy(saved) == pytest.approx(metrics["val_acc"], abs=1e-6), metrics["epoch"]
        assert digits_val_accuracy(saved, mirror_averaged=True) == pytest.approx(metrics["val_acc_tta"], abs=1e-6)
    assert history[-1]["val_loss_tta"] != history[-1]["val_loss"]  # a figure of its own, not the plain one
    final = load_checkpoint_file(str(tmp_path / FINAL_MODEL_FILE))
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1e-6)


def _weights(path):
    return load_checkpoint_file(str(path))["model"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", [
    dict(model="resnet8", augment="crop_flip", tta=True),  # CIFAR's augmentation, with the mirror-averaged metric
    # a Wide ResNet with dropout (its shape and dropout from model_args) and the DLI augmentation (affine +
    # colour jitter), on small fake images (wrn_dli itself takes 28-55 px only, 4.8 GFLOP an image at 32)
    dict(model="wrn", model_args={"depth": 10, "widen": 2, "dropout": 0.3}, augment="dli", dataset="fake",
         fake_image_size=8, fake_num_classes=4, fake_train_size=256, fake_val_size=64, batch_size=32, lr=0.1),
    # --ema: the average is in the checkpoint and goes on as the uninterrupted run's (digits' own crop)
    dict(model="resnet8", augment="auto", ema=0.9),
    # --clip-grad-norm below the gradients' norm: every update clipped, grad_norm in the history
    dict(model="resnet8", augment="auto", clip_grad_norm=0.3),
    # mixup and cutmix on each image at even odds, with label smoothing, 80% of the images mixed
    dict(model="resnet8", augment="auto", mixup=0.4, cutmix=1.0, mix_prob=0.8, label_smoothing=0.1),
    # the photo policy and random erasing (on digits' own crop)
    dict(model="resnet8", augment="trivialaugment", random_erase=0.25),
], ids=["resnet8-crop_flip-tta", "wrn-dropout-dli", "resnet8-ema", "resnet8-clip", "resnet8-mix", "resnet8-policy"])
def test_a_run_resumed_from_a_checkpoint_is_bit_identical_to_the_uninterrupted_run(tmp_path, setting):
    cfg = validate(TrainConfig(**{**TWO_WORKERS, "epochs": 3, "checkpoint_every": 1, **setting}))
    full = run_ddp(cfg, tmp_path / "full")
    resumed = run_ddp(cfg, tmp_path / "resumed", resume_from=tmp_path / "full" / "checkpoint_epoch_0001")
    assert [m["epoch"] for m in resumed] == [2, 3]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "val_acc_tta", "val_loss_tta", "lr",
                "grad_norm", "images_seen"):
        assert [m.get(key) for m in resumed] == [m.get(key) for m in full[1:]], key  # val_top5: 10+ classes
    assert (tmp_path / "resumed" / "per_class.csv").read_text() == (tmp_path / "full" / "per_class.csv").read_text()
    a, b = _weights(tmp_path / "full" / FINAL_MODEL_FILE), _weights(tmp_path / "resumed" / FINAL_MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- resume with other settings: they apply, at the same point of training ---------------------------------

ONE_WORKER = dict(num_workers=1, cpus_per_worker=2.0, warmup_epochs=0.5, epochs=2, checkpoint_every=1)


def test_resume_with_a_new_batch_size_lr_and_weight_decay_trains_with_them(tmp_path):
    old = validate(TrainConfig(batch_size=64, lr=0.4, weight_decay=5e-4, **ONE_WORKER))
    new = validate(TrainConfig(batch_size=32, lr=0.1, weight_decay=0.0, momentum=0.8, **ONE_WORKER))
    run(old, local_context(str(tmp_path / "old")))
    state = load_checkpoint_file(str(tmp_path / "old" / "checkpoint_epoch_0001" / CHECKPOINT_FILE))
    resumed = run(new, local_context(str(tmp_path / "resumed"), resume_state=state))
    fresh = run(new, local_context(str(tmp_path / "fresh")))
    # epoch 2 runs at exactly the LRs a fresh run with the new settings uses in its epoch 2
    assert resumed[0]["epoch"] == 2
    assert resumed[0]["lr"] == pytest.approx(fresh[1]["lr"], rel=1e-12)
    assert resumed[0]["lr"] > 0.01 * 0.1 * 32 / 256  # not the zeroed LR of the old LambdaLR state
    resumed_state = load_checkpoint_file(str(tmp_path / "resumed" / "checkpoint_epoch_0002" / CHECKPOINT_FILE))
    groups = resumed_state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert [g["momentum"] for g in groups] == [0.8, 0.8]


@pytest.mark.slow
def test_resume_across_worker_counts_continues_the_schedule_where_it_stood(tmp_path):
    # A 2-worker run's epoch-1 checkpoint continued by 1 worker: the global batch halves, the schedule
    # continues at epoch 1 of 2 counted in the new run's updates, with the new run's peak LR.
    two = validate(TrainConfig(**{**TWO_WORKERS, "epochs": 2, "checkpoint_every": 1}))
    one = validate(TrainConfig(**{**TWO_WORKERS, "epochs": 2, "checkpoint_every": 1, "num_workers": 1}))
    run_ddp(two, tmp_path / "two")
    state = load_checkpoint_file(str(tmp_path / "two" / "checkpoint_epoch_0001" / CHECKPOINT_FILE))
    resumed = run(one, local_context(str(tmp_path / "resumed"), resume_state=state))
    fresh = run(one, local_context(str(tmp_path / "fresh")))
    assert resumed[0]["lr"] == pytest.approx(fresh[1]["lr"], rel=1e-12)
    assert resumed[0]["val_acc"] > 0.3  # it learned (chance: 0.1)


@pytest.mark.slow
def test_two_workers_with_compile_and_gradient_accumulation_learn_and_report_the_saved_models_accuracy(tmp_path):
    """--compile under 2-worker DDP: the model is compiled, then wrapped in DDP (PyTorch's current advice;
    DDP marks its forward active, so Dynamo still splits the graph at DDP's buckets), with no_sync on the
    accumulating steps. It learns, and the accuracy it reports is the saved model's."""
    cfg = TrainConfig(epochs=4, compile=True, grad_accum=2, augment="crop_flip",
                      **{**TWO_WORKERS, "batch_size": 32})
    validate(cfg)
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > 0.6  # it learned (chance: 0.1)
    final = load_checkpoint_file(str(tmp_path / FINAL_MODEL_FILE))
    # Compiled kernels round differently from the eager evaluation here: within one image of 359.
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1.5 / 359)


def test_a_model_with_its_own_arguments_trains_under_2_worker_ddp_and_is_rebuilt_from_its_file_alone(tmp_path):
    # Ray Tune's tutorial CNN with a searched shape (fully connected widths 64 and 32, not its 120 and 84) and
    # its LR convention (the optimizer's LR at any batch), augmentation on.
    cfg = TrainConfig(model="tune_cnn", model_args={"l1": 64, "l2": 32}, augment="crop_flip", lr_scaling="none",
                      **{**TWO_WORKERS, "batch_size": 32, "lr": 0.05, "epochs": 4})
    validate(cfg)
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > 0.6  # it learned (chance: 0.1; 0.84 here)
    assert history[0]["lr"] < 0.05 + 1e-9  # the LR as given, not scaled by the global batch of 64
    from raydist.models.transfer import load_trained_model

    final = load_checkpoint_file(str(tmp_path / FINAL_MODEL_FILE))
    assert final["model_args"] == {"l1": 64, "l2": 32}
    # no config from outside: the file's own
    net = load_trained_model(read_model_file(str(tmp_path / FINAL_MODEL_FILE)))
    assert (net.fc1.out_features, net.fc2.out_features) == (64, 32)
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1e-6)


def test_horovods_lr_rule_is_what_a_2_worker_run_trains_with(tmp_path):
    # --lr-scaling per_worker, --warmup-from single_worker, --lr-milestones: LR = 0.1 x 2 workers x adj,
    # rising per step from one worker's 0.1 during the first epoch, x 0.1 from epoch 3 (1-based).
    from raydist.loop.recipe import lr_factor

    cfg = TrainConfig(model="resnet8", augment="crop_flip", num_workers=2, cpus_per_worker=1.0, batch_size=64,
                      lr=0.1, lr_scaling="per_worker", warmup_epochs=1, warmup_from="single_worker",
                      lr_schedule="step", lr_milestones="2", epochs=3, nesterov=False)
    validate(cfg)
    history = run_ddp(cfg, tmp_path)
    updates, peak = 1438 // (64 * 2), 0.1 * 2  # 11 updates an epoch (each rank: 719 images // 64)
    expected = [peak * sum(lr_factor(u, warmup=updates, total=3 * updates, schedule="step", step_every=1,
                                     gamma=0.1, milestones=[2 * updates], warmup_start=0.5)
                           for u in range(e * updates, (e + 1) * updates)) / updates for e in range(3)]
    assert [m["lr"] for m in history] == pytest.approx(expected, rel=1e-6)
    assert history[0]["lr"] > 0.1 and history[1]["lr"] == pytest.approx(0.2) and history[2]["lr"] == pytest.approx(0.02)
    assert history[-1]["val_acc"] > 0.3  # it learned (chance: 0.1; 0.47 here after 3 epochs at this small LR)
