"""The worker loop in a plain process (no Ray): LR schedule, early stopping, resume, non-finite loss."""

import math
import os
import re

import pytest
import torch

from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE, load_checkpoint_file
from raydist.loop.recipe import EarlyStop, lr_factor
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate

FAST = dict(num_workers=1, cpus_per_worker=2.0, batch_size=128, lr=0.8, warmup_epochs=0.5)


def test_lr_schedule_warms_up_then_decays():
    kw = dict(warmup=10, total=110, step_every=40, gamma=0.1)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(110, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_factor(50, schedule="constant", **kw) == 1.0
    assert [lr_factor(u, schedule="step", **kw) for u in (39, 40, 80)] == pytest.approx([1.0, 0.1, 0.01])


def test_horovods_lr_rule_warms_up_from_one_workers_lr_and_drops_at_its_milestone_epochs():
    # Horovod's example on 4 workers, 10 updates an epoch, 5 warmup epochs: lr_adj x size rises per step
    # from 1 (0.1, one worker's LR) to 4, then x 0.1 from epoch 30, 0.01 from 60, 0.001 from 80.
    kw = dict(warmup=50, total=900, step_every=300, gamma=0.1, schedule="step", milestones=[300, 600, 800],
              warmup_start=1 / 4)
    horovod = [1 / 4 * ((u + 1) / 10 * (4 - 1) / 5 + 1) for u in range(50)]  # its adjust_learning_rate
    assert [lr_factor(u, **kw) for u in range(50)] == pytest.approx(horovod)
    assert lr_factor(0, **kw) == pytest.approx(0.25 + 0.75 / 50)
    assert [lr_factor(u, **kw) for u in (50, 299, 300, 599, 600, 799, 800, 899)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_schedule="step", lr_milestones="30,20"), "--lr-milestones '30,20' must be increasing whole epochs"),
    (dict(lr_schedule="step", lr_milestones="a"), "--lr-milestones 'a' must be increasing whole epochs"),
    (dict(lr_milestones="30"), "--lr-milestones 30 applies to --lr-schedule step, not cosine"),
])
def test_bad_milestones_are_one_line(overrides, message):
    from raydist.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(TrainConfig(epochs=90, **overrides))


def test_early_stop_counts_consecutive_epochs():
    stop = EarlyStop(0.9, patience=2)
    assert [stop.update(a) for a in (0.95, 0.8, 0.91, 0.92)] == [False, False, False, True]
    assert not EarlyStop(None, 1).update(1.0)


def test_early_stopping_stops_at_the_first_epoch_meeting_the_target_for_patience_epochs(tmp_path):
    cfg = validate(TrainConfig(epochs=15, target_accuracy=0.6, patience=2, **FAST))
    history = run(cfg, local_context(str(tmp_path)))
    accs = [m["val_acc"] for m in history]
    first = next(i for i in range(1, len(accs)) if accs[i] >= 0.6 and accs[i - 1] >= 0.6)
    assert len(history) == first + 1 < 15
    assert history[-1]["stop_reason"] == "target_accuracy"
    assert all(m["stop_reason"] == "" for m in history[:-1])
    # the stopping epoch is saved
    assert os.path.exists(tmp_path / f"checkpoint_epoch_{first + 1:04d}" / CHECKPOINT_FILE)
    final = load_checkpoint_file(str(tmp_path / FINAL_MODEL_FILE))
    assert final["metrics"]["epoch"] == first + 1 and final["config"]["target_accuracy"] == 0.6


def test_resume_continues_at_the_next_epoch_and_reproduces_the_uninterrupted_run(tmp_path):
    # No augmentation: the data order depends on (seed, epoch) alone, so a resumed run must repeat epoch 3 exactly.
    cfg = validate(TrainConfig(epochs=3, augment="none", checkpoint_every=1, **FAST))
    full = run(cfg, local_context(str(tmp_path / "full")))
    state = load_checkpoint_file(str(tmp_path / "full" / "checkpoint_epoch_0002" / CHECKPOINT_FILE))
    assert state["epoch"] == 2 and state["config"] == cfg.to_dict()
    resumed = run(cfg, local_context(str(tmp_path / "resumed"), resume_state=state))
    assert [m["epoch"] for m in resumed] == [3]
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert resumed[0][key] == pytest.approx(full[2][key], rel=1e-4, abs=1e-6), key


def test_non_finite_loss_stops_with_a_clear_reason_and_no_checkpoint(tmp_path, capsys):
    cfg = TrainConfig(epochs=4, lr=1e9, warmup_epochs=0.0, **{k: v for k, v in FAST.items()
                                                              if k not in ("lr", "warmup_epochs")})
    validate(cfg)
    history = run(cfg, local_context(str(tmp_path)))
    assert history[-1]["stop_reason"] == "diverged" and len(history) < 4
    assert not math.isfinite(history[-1]["train_loss"])
    assert "stopped at epoch 1: diverged (the train loss is nan); lower --lr (now 1e+09)" in capsys.readouterr().out
    assert not any(p.startswith("checkpoint_epoch_") for p in os.listdir(tmp_path))
    assert not (tmp_path / FINAL_MODEL_FILE).exists()


def test_grad_accumulation_and_adamw_and_label_smoothing_learn(tmp_path):
    cfg = TrainConfig(epochs=4, optimizer="adamw", lr=0.02, grad_accum=2, label_smoothing=0.1, batch_size=64,
                      **{k: v for k, v in FAST.items() if k not in ("lr", "batch_size")})
    validate(cfg)
    history = run(cfg, local_context(str(tmp_path)))
    assert history[-1]["val_acc"] > 0.6
    # the linear scaling rule's global batch counts accumulated steps: peak = 0.02 x (64 x 2) / 256; each
    # epoch reports the mean LR of its own updates (1438 digits // 64 = 22 steps = 11 updates per epoch)
    updates, peak = 11, 0.02 * 64 * 2 / 256
    expected = [peak * sum(lr_factor(u, warmup=round(0.5 * updates), total=4 * updates, schedule="cosine",
                                     step_every=30 * updates, gamma=0.1)
                           for u in range(e * updates, (e + 1) * updates)) / updates for e in range(4)]
    assert [m["lr"] for m in history] == pytest.approx(expected, rel=1e-6)
    assert 0 < history[-1]["lr"] < history[0]["lr"] < peak  # warmup's mean is below the peak; the end is not 0


def test_tensorboard_events_are_written(tmp_path):
    cfg = validate(TrainConfig(epochs=1, **FAST))
    run(cfg, local_context(str(tmp_path), log_dir=str(tmp_path / "tb")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"val_acc", "train_loss", "lr"} <= set(events.Tags()["scalars"])


def test_resume_reads_its_checkpoint_through_rays_storage_layer_and_never_starts_over_silently(tmp_path):
    from raydist.errors import WorkerInputError
    from raydist.runs.checkpoints import checkpoint_bytes
    from raydist.ray_edge.worker import read_resume_checkpoint

    checkpoint = tmp_path / "checkpoint_epoch_0003"
    checkpoint.mkdir()
    (checkpoint / CHECKPOINT_FILE).write_bytes(checkpoint_bytes({"epoch": 3}))
    assert read_resume_checkpoint(str(checkpoint), node_id="n1")["epoch"] == 3
    assert read_resume_checkpoint(f"file://{checkpoint}", node_id="n1")["epoch"] == 3  # a URI, as s3://...
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("epochs: 3\n")
    assert read_resume_checkpoint(str(run_dir), node_id="n1") is None  # a run folder before its first checkpoint
    with pytest.raises(WorkerInputError, match=rf"--resume {tmp_path}/elsewhere: no checkpoint.pt there as seen "
                                               rf"from node n7; give a path every node can read"):
        read_resume_checkpoint(str(tmp_path / "elsewhere"), node_id="n7")


def test_a_corrupt_data_file_is_named_per_node_and_not_taken_for_missing_data(tmp_path):
    from raydist.errors import DataUnavailable
    from raydist.loop.worker_data import load_data_once_per_node

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):  # headers promise 5 images of 28 x 28; the bytes stop short
        (raw / f"{split}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28]) + b"x")
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5]) + bytes(5))
    cfg = TrainConfig(dataset="fashion_mnist", data_dir=str(tmp_path), num_workers=1)
    # The user's to fix, so the run's one-line cause (DataUnavailable), naming the damaged file, not "not found".
    with pytest.raises(DataUnavailable, match=rf"^on node n3: {raw}/train-images-idx3-ubyte is truncated or "
                                              rf"corrupt: its header announces 5 x 28 x 28 bytes"):
        load_data_once_per_node(cfg, device="cpu", rank=0, world=1, node_id="n3")
    with pytest.raises(DataUnavailable, match=rf"^on node n3: FashionMNIST train split not found in {tmp_path}/none"):
        load_data_once_per_node(TrainConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "none"), num_workers=1),
                                device="cpu", rank=0, world=1, node_id="n3")


def test_any_seed_gives_every_epoch_and_rank_its_own_stream():
    from raydist.data.augment import Augmenter
    from raydist.loop.recipe import seed_epoch

    aug = Augmenter("crop_flip", mean=(0.5,) * 3, std=(0.25,) * 3)
    draws = set()
    for seed in (0, 10**12):  # a seed far beyond 64 bits once mixed with the epoch and rank
        for epoch, rank in ((0, 0), (0, 1), (1, 0)):
            seed_epoch(seed, epoch, rank, aug)
            draws.add((torch.rand(1).item(), torch.rand(1, generator=aug.gen).item()))
    assert len(draws) == 6


def test_lp_ft_gives_the_probe_and_the_fine_tuning_a_schedule_each(tmp_path):
    """The backbone unfreezes at --freeze-epochs into a fresh warmup and decay (fastai's fine_tune), at the
    backbone multiplier of the head's LR, not late in a schedule that has already decayed."""
    from raydist.data.sources import load_split
    from raydist.loop.state import TrainingState
    from raydist.models.registry import create_model

    source = tmp_path / "w.pth"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), source)
    cfg = TrainConfig(weights=str(source), finetune="lp-ft", freeze_epochs=2, epochs=6, warmup_epochs=1,
                      **{k: v for k, v in FAST.items() if k != "warmup_epochs"})
    validate(cfg)
    train, val = load_split("digits", "train"), load_split("digits", "val")
    state = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=train, val_set=val)
    per_epoch = state.updates_per_epoch
    peak = cfg.lr * cfg.batch_size / 256
    lrs = [state.schedule.lr_at(u) for u in range(6 * per_epoch)]
    probe, tune = lrs[:2 * per_epoch], lrs[2 * per_epoch:]
    assert max(probe) == pytest.approx(peak) and probe[-1] < 0.1 * peak  # warmed up, then decayed
    assert tune[0] == pytest.approx(peak / per_epoch)  # a new warmup over one epoch ...
    assert max(tune) == pytest.approx(peak) and tune[-1] < 0.1 * peak  # ... to the peak, then a new decay
    state.schedule.update = 2 * per_epoch
    state.schedule.apply(state.optimizer)
    by_unit = {g["unit"]: g["lr"] for g in state.optimizer.param_groups}
    assert by_unit["fc"] == pytest.approx(peak / per_epoch) and by_unit["stem"] == pytest.approx(0.1 * by_unit["fc"])


def test_a_loss_that_explodes_but_stays_finite_is_divergence_in_the_epoch_it_happens(tmp_path, capsys):
    """LR 300 per 256: the training loss reaches about 1e11 in the first epoch and stays finite for two
    more; it used to be reported as a finished run."""
    cfg = TrainConfig(epochs=3, lr=300.0, warmup_epochs=0.0, lr_schedule="constant",
                      **{k: v for k, v in FAST.items() if k not in ("lr", "warmup_epochs")})
    validate(cfg)
    history = run(cfg, local_context(str(tmp_path)))
    assert len(history) == 1 and history[0]["stop_reason"] == "diverged"
    assert math.isfinite(history[0]["train_loss"]) and history[0]["train_loss"] > 1000 * math.log(10)
    assert history[0]["divergence"].startswith("the train loss ") and "over 1000x its start" in history[0]["divergence"]
    assert "stopped at epoch 1: diverged (the train loss" in capsys.readouterr().out
    assert not (tmp_path / FINAL_MODEL_FILE).exists() and not list(tmp_path.glob("checkpoint_epoch_*"))


@pytest.mark.parametrize("train_loss, val_loss, first, expected", [
    (2.0, float("nan"), 2.3, "the val loss is nan"),
    (1e17, 3.0, 2.3, "the train loss 1e+17 is over 1000x its start (2.3)"),
    (float("inf"), 3.0, 2.3, "the train loss is inf"),
    (5e3, 3.0, None, "the train loss 5e+03 is over 1000x its start (2.3)"),  # the first epoch: chance level
    (900.0, 1e5, 2.3, ""),  # val loss far above train early on (BatchNorm settling) is not divergence
    (2.0, 2.5, 0.5, ""),
])
def test_divergence_reasons(train_loss, val_loss, first, expected):
    from raydist.loop.recipe import divergence

    assert divergence({"train_loss": train_loss, "val_loss": val_loss}, first_train_loss=first,
                      num_classes=10) == expected


# The tensor methods that hand a value to Python, which on a GPU makes the host wait for the device.
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("augment", ["crop_flip", "dli"])
def test_a_training_epoch_and_an_evaluation_hand_nothing_to_the_host_step_by_step(monkeypatch, augment):
    """Every call of a tensor method that makes the host wait for the device (on a GPU), counted over a
    training epoch and an evaluation of the real loop with augmentation on: none, whatever the step count.
    (A GPU adds what the CPU cannot show: torch.cuda.set_sync_debug_mode("error"), in the GPU checks.)"""
    from raydist.data.sources import load_splits
    from raydist.loop.state import TrainingState

    cfg = validate(TrainConfig(augment=augment, **{**FAST, "batch_size": 32}))
    train, val = load_splits("digits", ("train", "val"), device="cpu")
    state = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=train, val_set=val)
    state.enter_epoch(0)
    calls = []
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sums = state.train_epoch()
    state.evaluate()
    monkeypatch.undo()
    assert sums.updates == len(train) // 32 > 40  # the epoch really stepped
    assert calls == []


def test_a_checkpoint_that_holds_training_up_gets_a_hint_with_the_interval_that_fits():
    from raydist.loop.recipe import checkpoint_hint

    assert checkpoint_hint(0.05, epoch_seconds=1.0, every=1) is None  # 5% of the epoch: fine
    line = checkpoint_hint(0.5, epoch_seconds=1.0, every=1)
    assert "50% of the training time between checkpoints (1.0s)" in line
    assert "--checkpoint-every 5 keeps it under 10% (a resume then loses up to 5 epochs)" in line
    assert checkpoint_hint(0.5, epoch_seconds=1.0, every=5) is None  # already 5 epochs apart


def test_an_unfused_adamw_checkpoint_resumes_into_a_fused_optimizer_with_its_state(monkeypatch):
    """A checkpoint written on CPUs (AdamW not fused) continued on a GPU (fused): PyTorch places each
    `step` by the flag in the groups it is given, so those groups must say fused, or the first fused update
    fails on a CPU step. (CPU fused AdamW stands in for the GPU one here; the flag is what differs.)"""
    from raydist.data.sources import load_split
    from raydist.loop.state import TrainingState

    cfg = validate(TrainConfig(optimizer="adamw", lr=0.01, **{k: v for k, v in FAST.items() if k != "lr"}))
    train, val = load_split("digits", "train"), load_split("digits", "val")
    unfused = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=train, val_set=val)
    unfused.train_epoch()
    saved = unfused.state_dict()
    assert all(not g.get("fused") for g in saved["optimizer"]["param_groups"])

    given = []
    original = torch.optim.Optimizer.load_state_dict
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict",
                        lambda self, sd: (given.append(sd), original(self, sd))[1])
    monkeypatch.setattr(TrainingState, "_fused", lambda self: True)
    fused = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=train, val_set=val)
    fused.load_state_dict(saved)
    assert [g["fused"] for g in given[0]["param_groups"]] == [True] * len(saved["optimizer"]["param_groups"])
    assert all(not g.get("fused") for g in saved["optimizer"]["param_groups"])  # the checkpoint is untouched
    steps = [s["step"].item() for s in fused.optimizer.state.values()]
    assert steps and set(steps) == {float(unfused.updates_per_epoch)}  # the moments came along
    assert fused.train_epoch().updates == fused.updates_per_epoch  # and the fused update runs on them


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_precision_auto_is_bf16_where_the_gpu_computes_it_natively_else_fp16_with_the_scaler(capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16 autocast: fp16 with the grad scaler there; A100 (8.0), A10G (8.6),
    H100 (9.0) compute bf16 natively. On a CPU: fp32."""
    from raydist.loop.recipe import auto_precision_dtype, autocast_dtype

    assert auto_precision_dtype(torch.device("cuda", 0), capability) is expected
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # asked for: whatever the device


def test_precision_auto_is_resolved_once_for_the_run_and_saved_as_what_it_trained_with(monkeypatch):
    """The loop resolves auto before it builds the training state (every rank alike: the group's smallest
    compute capability decides, an all-reduce on GPUs), so the scaler, the fp16 allreduce hook and the saved
    config all say the precision that ran."""
    from raydist.loop.recipe import group_precision

    cfg = validate(TrainConfig(**FAST))
    assert group_precision(cfg, torch.device("cpu"), 1) is cfg  # fp32 on the CPU, as auto says
    for capability, precision in (((7, 5), "fp16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert group_precision(cfg, torch.device("cuda", 0), 1).precision == precision
    assert group_precision(validate(TrainConfig(precision="fp32", **FAST)), torch.device("cuda", 0), 1).precision == "fp32"


@pytest.mark.parametrize("saved_as, resumed_as", [("bf16", "fp16"), ("fp32", "fp16"), ("auto", "fp16"),
                                                  ("fp16", "fp16"), ("fp16", "bf16")])
def test_a_checkpoint_resumes_under_another_precision_with_the_grad_scaler_it_needs(saved_as, resumed_as):
    """A scaler that was off (bf16, fp32, `auto` on a CPU) saves an empty state, which an enabled one refuses
    to load: an fp16 run resumed from such a checkpoint starts with a fresh scale, one resumed from fp16
    keeps the scale it reached, and a run without a scaler ignores one. (fp16 convolutions are emulated on
    a CPU, 50x slower than fp32 here: 32 images of digits, each epoch two steps.)"""
    from raydist.data.sources import TensorSource, load_split
    from raydist.loop.state import TrainingState

    train, val = load_split("digits", "train"), load_split("digits", "val")
    train, val = (TensorSource(split.images[:32], split.labels[:32]) for split in (train, val))

    def state(precision):
        cfg = validate(TrainConfig(precision=precision, augment="crop_flip", **{**FAST, "batch_size": 16}))
        return TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=train, val_set=val)

    first = state(saved_as)
    first.train_epoch()
    if saved_as == "fp16":
        first.scaler.update(new_scale=1024.0)  # a scale a fresh scaler never has (it starts at 2**16)
    saved = first.state_dict()
    assert bool(saved["scaler"]) == (saved_as == "fp16")
    resumed = state(resumed_as)
    resumed.load_state_dict(saved)
    fresh = torch.amp.GradScaler("cpu").get_scale()
    if resumed_as == "fp16":
        assert resumed.scaler.get_scale() == (1024.0 if saved_as == "fp16" else fresh) and fresh == 2.0**16
    assert all(torch.equal(a, b) for a, b in zip(resumed.net.parameters(), first.net.parameters()))
    epoch = resumed.train_epoch()  # and the next epoch trains, its updates through the scaler
    assert epoch.updates == resumed.updates_per_epoch == 2 and math.isfinite(epoch.loss.item())


def test_a_deferred_checkpoint_holds_training_up_for_a_copy_and_writes_the_state_as_it_was(tmp_path):
    """Where the context writes in the background (Ray Train's upload thread), rank 0 copies the state to host
    memory and goes on: the file written later holds the state at the report, not what training changed
    since, and the seconds returned (the checkpoint-cost hint's) are the copy's."""
    from raydist.data.sources import load_split
    from raydist.loop.context import WorkerContext, report_with_checkpoint
    from raydist.loop.state import TrainingState

    cfg = validate(TrainConfig(augment="crop_flip", **FAST))
    train, val = load_split("digits", "train"), load_split("digits", "val")
    state = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=1, train_set=train, val_set=val)
    state.train_epoch()
    deferred = []
    ctx = WorkerContext(rank=0, world_size=1, device=torch.device("cpu"), report=None, write_file=None,
                        report_deferred=lambda metrics, write: deferred.append((metrics, write)))
    saved = state.state_dict({"epoch": 1})
    expected = {name: tensor.clone() for name, tensor in saved["model"].items()}
    momentum = [s["momentum_buffer"].clone() for s in saved["optimizer"]["state"].values()]
    seconds = report_with_checkpoint(ctx, {"epoch": 1}, saved)
    assert len(deferred) == 1 and deferred[0][0] == {"epoch": 1} and 0 <= seconds < 5
    state.train_epoch()  # training goes on and changes the weights and the momentum in place
    assert any(not torch.equal(expected[n], t) for n, t in state.net.state_dict().items())
    deferred[0][1](str(tmp_path))  # the upload thread writes it now
    written = load_checkpoint_file(str(tmp_path / CHECKPOINT_FILE))
    assert all(torch.equal(written["model"][name], tensor) for name, tensor in expected.items())
    assert all(torch.equal(a["momentum_buffer"], b) for a, b in zip(written["optimizer"]["state"].values(), momentum))
    assert written["epoch"] == saved["epoch"] and written["config"] == saved["config"]


def test_a_checkpoint_copied_into_storage_before_the_report_returns_counts_as_holding_training_up(
        tmp_path, monkeypatch):
    """A one-worker trial copies each checkpoint into its run folder itself (Ray Train would upload it in
    the background): that copy holds training up and goes into the time the checkpoint hint judges; the
    time the report then waits for Tune does not."""
    import time as clock

    import raydist.loop.context
    from raydist.loop.context import report_with_checkpoint, run_folder_context

    real_write = raydist.loop.context.write_atomically

    def slow_disk(path, data):
        clock.sleep(0.3)
        real_write(path, data)

    monkeypatch.setattr(raydist.loop.context, "write_atomically", slow_disk)  # the copy into storage
    told = []
    ctx = run_folder_context(validate(TrainConfig(**FAST)), run_dir=str(tmp_path / "run"),
                             device=torch.device("cpu"), node_id="n",
                             report=lambda metrics, path: (told.append(path), clock.sleep(2.0)))
    seconds = report_with_checkpoint(ctx, {"epoch": 1, "val_acc": 0.5}, {"weights": torch.zeros(1000)})
    assert told == [str(tmp_path / "run" / "checkpoint_epoch_0001")]
    assert (tmp_path / "run" / "checkpoint_epoch_0001" / CHECKPOINT_FILE).is_file()
    # The copy (0.3 s and a small file), not the 2 s the report waited for Tune: a wide gap, so that a
    # machine busy with other tests (the suite runs two processes) cannot blur it (0.5 s once did).
    assert 0.3 <= seconds < 2.0


def test_a_long_epoch_prints_progress_lines_on_rank_0_and_a_short_one_none(tmp_path, capsys, monkeypatch):
    """Real epochs of the loop: with the progress clock made fast (a line at every step after the first),
    rank 0 prints how far the epoch is; with the real one, a 1-second digits epoch prints nothing."""
    import dataclasses

    import raydist.loop.state
    from raydist.output import console

    cfg = TrainConfig(epochs=1, batch_size=128)
    ctx = dataclasses.replace(local_context(str(tmp_path / "fast")), progress_every_s=30.0)
    real = console.EpochProgress

    class Eager(real):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "quiet_s": 0.0, "every_s": 1e-9 if kwargs["every_s"] else 0.0})

    monkeypatch.setattr(raydist.loop.state, "EpochProgress", Eager)  # where the loop looks it up
    run(cfg, ctx)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(console.PROGRESS_MARK)]
    steps = {int(re.search(r"step \d+/(\d+) ", line).group(1)) for line in lines}
    assert steps == {11}  # this rank's steps: 1,437 training images in batches of 128
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in lines] == list(range(1, 11))  # not 0, not 11
    assert all("epoch 1/1" in line and "img/s" in line and "ETA" in line for line in lines)

    monkeypatch.setattr(raydist.loop.state, "EpochProgress", real)
    run(cfg, dataclasses.replace(local_context(str(tmp_path / "real")), progress_every_s=30.0))
    assert console.PROGRESS_MARK not in capsys.readouterr().out
