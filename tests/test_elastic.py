"""Elastic training without a cluster: the global batch kept whatever the worker count, progress counted in
images, a spot notice's checkpoint inside an epoch, and the resume on another worker count that uses every
image of the interrupted epoch exactly once. The loop runs as real gloo DDP processes (tests/local_ddp.py);
the real cluster's resize and reclaim are in tests/test_elastic_cluster.py."""

import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

import image_trace
from local_ddp import run_ddp
from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig
from raydist.cli import parse_cli
from raydist.data.sizes import train_size
from raydist.parallel.elastic import (batch_layout, epoch_order, epoch_steps, min_tail, split_sizes, step_ends,
                                      steps_in_epoch, update_at)
from raydist.runs.checkpoints import CHECKPOINT_FILE, load_checkpoint_file
from raydist.loop.state import TrainingState
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate

N = train_size("digits", val_fraction=None)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_a_layout_keeps_the_global_batch_and_each_micro_batch_within_the_per_worker_limit(world):
    cfg = TrainConfig(num_workers=4, min_workers=1, batch_size=48, global_batch=250)
    layout = batch_layout(cfg, world)
    assert layout.global_batch == 250
    assert layout.micro_batch <= 48
    assert layout.micro_batch * layout.accumulation * world >= 250
    shares = split_sizes(250, world)
    assert sum(shares) == 250 and max(shares) - min(shares) <= 1


def test_every_image_of_an_epoch_is_used_once_across_a_resize_and_each_step_weighs_its_images_equally():
    cfg = TrainConfig(num_workers=4, min_workers=1, batch_size=16, global_batch=40)
    order = epoch_order(N, seed=3, epoch=5)
    used = Counter()
    for world, start, stop in ((2, 0, 400), (3, 400, 1000), (4, 1000, N)):  # grown twice inside the epoch
        layout = batch_layout(cfg, world)
        per_rank = [list(epoch_steps(order, start=start, layout=layout, rank=r)) for r in range(world)]
        for steps in zip(*per_rank):
            assert len({s.end for s in steps}) == 1  # the ranks agree on where each step ends
            if steps[0].end > stop:
                break
            images = steps[0].images
            counted = 0
            for step in steps:
                assert len(step.micro_batches) <= layout.accumulation
                for micro, weight in zip(step.micro_batches, step.weights):
                    if weight:  # each image's loss weighs 1/images in the gradient DDP averages over the ranks
                        assert weight == pytest.approx(len(micro) * world / images)
                        used.update(micro.tolist())
                        counted += len(micro)
            assert counted == images
    assert sorted(used) == list(range(N)) and set(used.values()) == {1}


@pytest.mark.parametrize("num_items, global_batch, batch_size, most", [
    (33, 16, 16, 2),     # the audit's plan [[16], [16], [1]]: a 1-image batch, and BatchNorm raised
    (1438, 205, 64, 2),  # uneven last step: ranks ran 2 and 1 forwards, so SyncBatchNorm's collectives did not match
    (1438, 128, 32, 4), (1000, 96, 16, 3), (50, 12, 5, 4)])
def test_no_micro_batch_has_one_image_and_every_rank_runs_as_many_forwards_on_any_worker_count(
        num_items, global_batch, batch_size, most):
    cfg = TrainConfig(num_workers=most, min_workers=1, batch_size=batch_size, global_batch=global_batch)
    tail = min_tail(cfg)
    ends = step_ends(num_items, global_batch, tail)
    assert ends[-1] == num_items and all(b - a >= tail for a, b in zip([0] + ends, ends))  # no short last step
    order = epoch_order(num_items, seed=1, epoch=0)
    for world in range(1, most + 1):
        layout = batch_layout(cfg, world)
        per_rank = [list(epoch_steps(order, start=0, layout=layout, rank=r, tail=tail)) for r in range(world)]
        assert len(per_rank[0]) == len(ends) == steps_in_epoch(num_items, global_batch, tail)  # the same schedule
        used = Counter()
        for steps in zip(*per_rank):
            assert len({len(step.micro_batches) for step in steps}) == 1  # as many forwards on every rank
            for step in steps:
                assert all(len(micro) >= 2 for micro in step.micro_batches)
                for micro, weight in zip(step.micro_batches, step.weights):
                    assert weight == pytest.approx(len(micro) * world / step.images)
                    used.update(micro.tolist())
        assert sorted(used) == list(range(num_items)) and set(used.values()) == {1}  # every image once
    assert [update_at(0, end, num_items=num_items, global_batch=global_batch, tail=tail) for end in ends] == \
        list(range(1, len(ends) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [{}, dict(mixup=0.2, cutmix=1.0, augment="randaugment", random_erase=0.25)],
                         ids=["plain", "mixed-randaugment-erased"])
def test_the_audits_elastic_epoch_with_a_one_image_tail_trains_a_batchnorm_network(tmp_path, recipe):
    """33 fake images in global batches of 16 on 1 worker ended in a 1-image micro-batch, and resnet18's
    BatchNorm raised "Expected more than 1 value per channel when training"; the tail now joins the step
    before it, and every image is trained on. Issue 33's batch pieces take the elastic run's uneven
    micro-batches too (a 17-image one: an odd batch's middle image is its own mixing partner)."""
    cfg = TrainConfig(dataset="fake", fake_train_size=33, fake_val_size=8, fake_image_size=32, fake_num_classes=4,
                      model="resnet18_imagenet", num_workers=2, min_workers=1, batch_size=16, global_batch=16,
                      epochs=1, warmup_epochs=0, cpus_per_worker=1.0, **recipe)
    validate(cfg)
    (metrics,) = run_ddp(cfg, tmp_path, world_size=1)
    assert metrics["images_seen"] == 33 and math.isfinite(metrics["train_loss"])


def test_the_weighted_split_gives_the_gradient_of_the_whole_steps_mean_loss():
    """Uneven shares (a global batch of 10 on 3 ranks, micro-batches of at most 2): each rank's weighted
    micro-batch losses, averaged over the ranks as DDP does, give exactly the full batch's mean gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    loss_fn = torch.nn.CrossEntropyLoss()
    cfg = TrainConfig(num_workers=3, min_workers=1, batch_size=2, global_batch=10)
    layout = batch_layout(cfg, 3)
    grads = []
    for rank in range(3):
        model.zero_grad()
        (step,) = epoch_steps(torch.arange(10), start=0, layout=layout, rank=rank)
        assert step.images == 10
        for micro, weight in zip(step.micro_batches, step.weights):
            (loss_fn(model(x[micro]), y[micro]) * weight).backward()
        grads.append(model.weight.grad.clone())
    model.zero_grad()
    loss_fn(model(x), y).backward()
    torch.testing.assert_close(sum(grads) / 3, model.weight.grad, rtol=1e-6, atol=1e-7)


def test_the_lr_at_every_update_is_a_function_of_images_seen_whatever_the_worker_count():
    cfg = validate(TrainConfig(num_workers=4, min_workers=1, batch_size=32, epochs=4, warmup_epochs=1))
    states = {w: TrainingState(cfg, device=torch.device("cpu"), rank=0, world=w, train_set=range(N), val_set=[])
              for w in (1, 2, 4)}
    for position in (0, 128, 384, N - N % 128):
        for epoch in (0, 2):
            lrs = set()
            for state in states.values():
                state.epoch, state.position = epoch, position
                state._place_schedule()
                assert state.schedule.update == update_at(epoch, position, num_items=N, global_batch=128,
                                                          tail=min_tail(cfg))
                lrs.add(state.optimizer.param_groups[0]["lr"])
            assert len(lrs) == 1


def test_a_warmup_from_one_workers_lr_is_the_same_on_every_worker_count_of_an_elastic_run():
    """--warmup-from single_worker started at 1 / the current workers: on a resize inside the warmup the LR
    jumped (epoch 2 of 5: 0.400, 0.283, 0.225 on 1, 2, 4 workers; none at all on 1). It rises from one
    worker's share of the fixed global batch (32 of 128 here)."""
    cfg = TrainConfig(num_workers=4, min_workers=1, batch_size=32, epochs=10, warmup_epochs=5,
                      warmup_from="single_worker")
    validate(cfg)
    states = [TrainingState(cfg, device=torch.device("cpu"), rank=0, world=w, train_set=range(N), val_set=[])
              for w in (1, 2, 4)]
    per_epoch = states[0].updates_per_epoch
    peak = cfg.lr * 128 / 256  # --lr per 256 images, at the global batch of 128
    for update in (0, per_epoch, 2 * per_epoch + 3, 5 * per_epoch - 1):
        lrs = {round(state.schedule.lr_at(update), 12) for state in states}
        assert len(lrs) == 1, (update, lrs)
    warmup = 5 * per_epoch
    for state in states:  # from 32/128 of the peak, as a fixed group of 4 workers x 32 starts from 1/4 of it
        assert state.schedule.lr_at(0) == pytest.approx(peak * (0.25 + 0.75 / warmup))
    # a --global-batch laid out for 4 workers of 64 accumulated twice: one worker's share is still 1/4 (not
    # --batch-size / --global-batch = 1/8, which ignored each worker's accumulation to its share)
    cfg = TrainConfig(num_workers=4, min_workers=1, batch_size=32, global_batch=256, epochs=10, warmup_epochs=5,
                      warmup_from="single_worker")
    validate(cfg)
    for world in (1, 2, 4):
        state = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=world, train_set=range(N), val_set=[])
        peak, warmup = cfg.lr * 256 / 256, 5 * state.updates_per_epoch
        assert state.schedule.lr_at(0) == pytest.approx(peak * (0.25 + 0.75 / warmup)), world


def test_the_step_a_run_says_it_is_at_counts_a_folded_tail_in_the_last_step():
    """The resize and spot-notice lines counted steps as position / global batch: after a last step that
    holds the folded tail they said step 3/2 (the review of issue 30)."""
    from raydist.loop.spot import resize_line

    cfg = validate(TrainConfig(num_workers=4, min_workers=1, batch_size=4, global_batch=16))
    state = TrainingState(cfg, device=torch.device("cpu"), rank=0, world=2, train_set=range(36), val_set=[])
    assert state.updates_per_epoch == 2  # 16 images, then 20: the 4 left over (under 2 x 4) join the last step
    for position, steps in ((0, 0), (16, 1), (36, 2)):
        state.position = position
        assert state.steps_done() == steps
        assert f"at epoch 1, step {steps}/2" in resize_line({"world_size": 2}, state)


def test_the_per_worker_policy_keeps_the_batch_and_scales_the_lr_with_the_workers():
    cfg = validate(TrainConfig(num_workers=4, min_workers=1, batch_size=32, elastic_batch="per_worker"))
    peak = {w: TrainingState(cfg, device=torch.device("cpu"), rank=0, world=w, train_set=range(N),
                             val_set=[]).schedule.lr_at(10 ** 6 // 2) for w in (2, 4)}
    assert batch_layout(cfg, 2).global_batch == 64 and batch_layout(cfg, 4).global_batch == 128
    assert batch_layout(cfg, 4).micro_batch == 32
    assert peak[4] == pytest.approx(2 * peak[2])


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "4-2"], "--num-workers '4-2': give a number of workers, or a range MIN-MAX"),
    (["--num-workers", "0-2"], "--num-workers '0-2': give a number of workers, or a range MIN-MAX"),
    (["--num-workers", "2-"], "--num-workers '2-': give a number of workers, or a range MIN-MAX"),
    (["--num-workers", "a-b"], "--num-workers 'a-b': give a number of workers, or a range MIN-MAX"),
    (["--global-batch", "64"], "--global-batch applies to an elastic run only"),
    (["--num-workers", "1-4", "--global-batch", "3"], "--global-batch 3 gives some of the 4 workers fewer than 2 "
                                                      "images a step"),
    # 6 on 4 workers splits 2/2/1/1: two ranks would train on 1 image every step (the review of issue 30)
    (["--num-workers", "2-4", "--global-batch", "6"], "--global-batch 6 gives some of the 4 workers fewer than 2 "
                                                      "images a step .*give at least 8"),
    (["--num-workers", "1-2", "--batch-size", "1"], "--batch-size 1: an elastic run feeds each worker at least 2 "
                                                    "images at a time"),
    (["--num-workers", "1-4", "--global-batch", "5000"], "a global batch of 5000 images per step is more than"),
    (["--num-workers", "1-4", "--elastic-batch", "per_worker", "--global-batch", "64"], "--global-batch 64 fixes the global batch, which --elastic-batch per_worker"),
])
def test_a_bad_range_or_elastic_setting_is_one_line(argv, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        parse_cli(argv)


def test_a_range_sets_both_ends_and_a_single_number_on_top_of_it_is_a_fixed_group(tmp_path):
    cfg, _, _ = parse_cli(["--num-workers", "2-8"])
    assert (cfg.min_workers, cfg.num_workers, cfg.is_elastic()) == (2, 8, True)
    (tmp_path / "spot.yaml").write_text("num_workers: 1-3\n")
    assert parse_cli(["--config", str(tmp_path / "spot.yaml")])[0].workers_text() == "1-3"
    fixed, _, _ = parse_cli(["--config", str(tmp_path / "spot.yaml"), "--num-workers", "2"])
    assert (fixed.min_workers, fixed.num_workers) == (None, 2)


def test_a_bad_range_exits_2_before_ray_in_one_line_and_writes_nothing(tmp_path):
    ran = subprocess.run([sys.executable, "-m", "raydist.train", "--num-workers", "4-2", "--storage-path",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines() == [
        "raydist.train: error: --num-workers '4-2': give a number of workers, or a range MIN-MAX of whole numbers "
        "with 1 <= MIN <= MAX (e.g. 2-8)"]
    assert not (tmp_path / "runs").exists()


ELASTIC = dict(dataset="digits", model="resnet8", num_workers=3, min_workers=1, batch_size=32, global_batch=96,
               epochs=4, lr=1.0, warmup_epochs=0.5, preemption_check_every=2, checkpoint_every=1)  # augmentation on


@pytest.mark.slow
def test_a_spot_notice_checkpoints_mid_epoch_and_a_resume_on_more_workers_uses_each_image_once(tmp_path, monkeypatch):
    """2 workers get a notice at their 4th check (step 8 of epoch 1: 768 images in); the node goes at the
    next check, 2 steps later. The run goes on from the notice's checkpoint on 3 workers: every image of
    epoch 1 is trained on once in all (the 2 repeated steps aside), the global batch is 96 throughout, each
    epoch's LR is that of an uninterrupted 1-worker run at the same images seen, and the model learns."""
    cfg = validate(TrainConfig(**ELASTIC))
    traces = tmp_path / "trace"
    for key, value in image_trace.environment(traces / "first").items():
        monkeypatch.setenv(key, value)
    assert run_ddp(cfg, tmp_path / "first", world_size=2, notice_at_check=4) == "reclaimed"
    jit = tmp_path / "first" / "checkpoint_epoch_0000_at_0000768"
    state = load_checkpoint_file(str(jit / CHECKPOINT_FILE))
    assert (state["epoch"], state["position"], state["world_size"]) == (0, 768, 2)
    assert state["epoch_sums"][2] == 768  # the epoch's images so far, over both ranks

    monkeypatch.setenv(image_trace.TRACE_ENV, str(traces / "second"))
    history = run_ddp(cfg, tmp_path / "second", world_size=3, resume_from=jit)
    first, second = image_trace.read(traces / "first"), image_trace.read(traces / "second")
    kept = [r for r in first if r["epoch"] == 0 and r["end"] <= 768]
    repeated = {r["end"] for r in first if r["epoch"] == 0 and r["end"] > 768}
    assert len(repeated) <= 2  # at most K = 2 steps between the notice's checkpoint and the node's loss
    used = Counter(i for r in kept + [r for r in second if r["epoch"] == 0] for i in r["indices"])
    assert sorted(used) == list(range(N)) and set(used.values()) == {1}
    assert {r["world"] for r in second} == {3}

    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert {m["global_batch"] for m in history} == {96} and {m["world_size"] for m in history} == {3}
    fixed = run(validate(TrainConfig(**{**ELASTIC, "num_workers": 1})), local_context(str(tmp_path / "fixed")))
    assert [m["lr"] for m in history] == pytest.approx([m["lr"] for m in fixed], rel=1e-9)
    assert history[-1]["val_acc"] >= 0.7, history[-1]  # it learned (chance: 0.1; an uninterrupted run: 0.86)


@pytest.mark.parametrize("workers, use_gpu, env", [
    ("1-4", True, {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}), ("1-4", False, {}), ("4", True, {})])
def test_an_elastic_gpu_runs_nccl_raises_in_the_waiting_ranks_instead_of_killing_them(workers, use_gpu, env):
    """With NCCL, Ray sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed collective kills the process, before
    the restart path (raydist.loop.spot.SpotWatch.wait_for_restart) could hold a rank left by a reclaimed
    peer. An elastic GPU run's TorchTrainer gives its workers 2 (abort the communicator and raise)."""
    from raydist.cli import parse_cli
    from raydist.ray_edge.fit import _torch_trainer, worker_environment

    cfg = parse_cli(["--num-workers", workers, "--no-use-gpu" if not use_gpu else "--use-gpu"])[0]
    assert worker_environment(cfg, use_gpu) == env
    trainer = _torch_trainer(cfg, use_gpu=use_gpu, callbacks=[], console={})
    assert (trainer.train_run_context.run_config.worker_runtime_env or {}).get("env_vars", {}) == env
    assert trainer.train_run_context.backend_config.timeout_s == 1800  # start-up waits keep torch's default


def test_once_its_data_is_loaded_an_elastic_runs_collectives_time_out_within_a_reclaim(tmp_path, monkeypatch):
    """A collective waiting on a peer a reclaim took fails after ELASTIC_COLLECTIVE_TIMEOUT_S, not torch's
    30 minutes; set once the data is loaded (while a node's first rank downloads or decodes a data set the
    others wait in a collective). A fixed-size run keeps the default. The real loop, one gloo process."""
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from raydist.cli import parse_cli
    from raydist.loop import run as loop_run
    from raydist.loop.context import local_context
    from raydist.parallel.elastic import ELASTIC_COLLECTIVE_TIMEOUT_S

    def timeout():
        return distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout

    while_loading = []
    load = loop_run.load_data_once_per_node
    monkeypatch.setattr(loop_run, "load_data_once_per_node",
                        lambda *args, **kwargs: (while_loading.append(timeout()), load(*args, **kwargs))[1])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        default = timeout()
        for workers, after in (("1", default), ("1-2", datetime.timedelta(seconds=ELASTIC_COLLECTIVE_TIMEOUT_S))):
            cfg = parse_cli(["--num-workers", workers, "--epochs", "1", "--batch-size", "16", "--train-per-class",
                             "10", "--no-use-gpu"])[0]
            loop_run.run(cfg, local_context(str(tmp_path / workers)))
            assert (while_loading[-1], timeout()) == (default, after), workers
        assert default == datetime.timedelta(minutes=30)
    finally:
        dist.destroy_process_group()
