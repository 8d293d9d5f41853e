"""The per-worker training loop, plain PyTorch: one code path for `python -m raydist.train`, every Tune
trial and the benchmarks. `run(cfg, ctx)` runs on each DDP worker of a Ray Train run (through
raydist.ray_edge.worker), in a one-worker trial's own process, and in plain local processes (tests, the
overhead benchmark's baseline); `ctx` (raydist.loop.context.WorkerContext) is all it knows of its launcher.

Per epoch: train on this rank's shard, evaluate on its share of the validation set, sum the metrics
over all ranks, report once (every rank, as Ray requires), checkpoint from rank 0, check early stopping.
"""

from __future__ import annotations

import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from raydist.config.fields import TrainConfig
from raydist.data.sizes import classes_predicted, predicted_class_names
from raydist.errors import DataUnavailable, OutOfMemory, TooManyBadImages, WeightsError, WorkerInputError
from raydist.loop.context import WorkerContext, report_with_checkpoint
from raydist.loop.recipe import (
    DIVERGED,
    apply_device_settings,
    group_precision,
    checkpoint_hint,
    divergence,
    is_out_of_memory,
    out_of_memory_message,
    seed_epoch,
)
from raydist.loop.spot import SpotWatch, resize_line
from raydist.loop.state import TrainingState
from raydist.loop.worker_data import load_data_once_per_node, load_source
from raydist.parallel.elastic import shorten_collective_timeout
from raydist.output.mistakes import PER_CLASS_FILE, per_class_csv
from raydist.output.wandb_log import WandbRun
from raydist.output.wandb_log import run_id as wandb_run_id
from raydist.runs.checkpoints import FINAL_MODEL_FILE, final_model_bytes

SUMS = 10  # the epoch's summed figures ahead of the confusion matrix in the all-reduced totals

# ---- the loop -------------------------------------------------------------------------------------


def run(cfg: TrainConfig, ctx: WorkerContext) -> list[dict]:
    """Train according to `cfg` on this worker; return the metrics reported each epoch. Running out of
    memory is OutOfMemory, one line naming the model, the batch and the device's memory."""

    try:
        return _run(cfg, ctx)
    except TooManyBadImages as exc:  # met while streaming a folder: the run's one-line cause
        raise DataUnavailable(str(exc)) from exc
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(out_of_memory_message(cfg, ctx.device, ctx.world_size)) from exc
    finally:
        if ctx.publish_logs and ctx.log_dir:  # a local copy of events that are in the run folder now
            shutil.rmtree(ctx.log_dir, ignore_errors=True)


def _run(cfg: TrainConfig, ctx: WorkerContext) -> list[dict]:
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    apply_device_settings(cfg, device)
    train_set, val_set = load_data_once_per_node(cfg, device=device, rank=rank, world=world, node_id=ctx.node_id,
                                                 open_stream=ctx.open_stream)
    if cfg.is_elastic():
        shorten_collective_timeout()  # a rank whose peer a reclaim took stops waiting within minutes
    cfg = group_precision(cfg, device, world)  # --precision auto: one choice for every rank
    # A resumed run takes every weight from its checkpoint: the pretrained source is not needed again.
    source = load_source(cfg, node_id=ctx.node_id) if ctx.resume_state is None else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        state = TrainingState(cfg, device=device, rank=rank, world=world, train_set=train_set, val_set=val_set,
                              devices=ctx.devices, source=source, on_micro_batch=ctx.on_micro_batch)
    except WeightsError as exc:  # a file the driver could not see (a cluster joined with --address) that does not fit
        raise WorkerInputError(f"{exc} (on node {ctx.node_id})") from None
    if ctx.resume_state is not None:
        state.load_state_dict(ctx.resume_state)

    if rank == 0 and state.pipeline is not None:
        print(state.pipeline.describe(cfg.pipeline_balance), flush=True)
    if rank == 0 and cfg.compile and cfg.sync_batchnorm and world > 1:
        print("note: --sync-batchnorm with --compile: every SyncBatchNorm layer's collective splits the compiled "
              "graph, so compile gains less than it does with plain BatchNorm", flush=True)
    writer = _tensorboard(ctx.log_dir) if rank == 0 and ctx.log_dir else None
    # W&B's files sit beside TensorBoard's events, so a run in remote storage publishes both after each epoch.
    wandb_run = WandbRun.start(cfg.to_dict(), folder=ctx.log_dir, run_name=cfg.name or "raydist",
                               project=cfg.wandb_project,
                               run_id=cfg.wandb_id or wandb_run_id(f"{cfg.storage_path}/{cfg.name}")
                               ) if writer and cfg.wandb else None
    try:  # closed however the loop ends (Tune stops a trial inside its report; a reused process goes on)
        history = _train_epochs(cfg, ctx, state, writer, wandb_run)
    finally:
        if writer:
            writer.close()
        if wandb_run:
            wandb_run.finish()
    if rank == 0 and not (history and history[-1]["stop_reason"] == DIVERGED):
        ctx.write_file(FINAL_MODEL_FILE, final_model_bytes(state.saved_weights(), cfg.to_dict(),
                                                           history[-1] if history else None))
        # what it gets wrong: the last epoch's matrix, or (no epoch left to run) its checkpoint's
        confusion = state.confusion if history else (ctx.resume_state or {}).get("confusion")
        if confusion is not None:
            ctx.write_file(PER_CLASS_FILE, per_class_csv(confusion.tolist(), predicted_class_names(cfg)).encode())
    return history


def _train_epochs(cfg: TrainConfig, ctx: WorkerContext, state: TrainingState, writer, wandb_run=None) -> list[dict]:
    """The epochs from `state.epoch` on: train, evaluate, sum the metrics over all ranks, report (every
    rank), checkpoint (rank 0), stop on divergence or at the target accuracy. Returns the reported metrics."""
    rank = ctx.rank
    history: list[dict] = []
    checkpoint_hinted = False  # the checkpoint-cost hint is said once
    spot = SpotWatch(cfg, ctx, state) if state.elastic else None
    if spot and rank == 0 and ctx.epoch_lines:
        print(resize_line(ctx.resume_state, state), flush=True)
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        change = state.enter_epoch(epoch)
        if change and rank == 0 and ctx.epoch_lines:
            print(change, flush=True)
        seed_epoch(cfg.seed, epoch, rank, state.augment, position=state.position)
        state._place_schedule()  # the same place as after the last epoch, unless a resume moved it
        train, totals = _train_and_evaluate(ctx, state, spot)
        metrics = _epoch_metrics(cfg, state, epoch, train, totals, world=ctx.world_size, t0=t0)
        classes = classes_predicted(cfg)
        # [true, predicted], every rank's images (none above MATRIX_CLASSES classes)
        confusion = totals[SUMS:].view(classes, classes).round().long().cpu() if len(totals) > SUMS else None
        last = epoch + 1 == cfg.epochs or bool(metrics["stop_reason"])
        save = last or (cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0) or bool(
            spot and spot.notice)  # a node is being reclaimed: this epoch's checkpoint is the one to resume from
        if rank == 0:
            _log_epoch(cfg, ctx, metrics, writer, wandb_run)
        if save and metrics["stop_reason"] != DIVERGED:  # a diverged model is not worth keeping
            # the checkpoint keeps its epoch's confusion matrix: a study's best trial has what its best epoch got wrong
            save_s = report_with_checkpoint(ctx, metrics, {**state.state_dict(metrics), "confusion": confusion}
                                            if rank == 0 else None)
            hint = checkpoint_hint(save_s, metrics["epoch_time_s"], cfg.checkpoint_every or 1)
            if rank == 0 and hint and not checkpoint_hinted:
                print(hint, flush=True)
                checkpoint_hinted = True
        else:
            ctx.report(metrics, None)
        history.append(metrics)
        state.confusion = confusion  # the last evaluation's: what model_final.pt gets wrong
        if metrics["stop_reason"]:
            if rank == 0 and ctx.epoch_lines:
                print(_stop_message(metrics, cfg), flush=True)
            break
    return history


def _train_and_evaluate(ctx: WorkerContext, state: TrainingState, spot: Optional[SpotWatch]):
    """One epoch's training and evaluation on this rank, summed over all ranks: (the rank's training sums,
    the group's totals: train loss, correct, count, val loss, correct, count, summed training seconds, val
    top-5 correct, --tta's val loss and correct (0 without), then the validation confusion matrix's C x C
    counts when it is kept)."""
    world = ctx.world_size
    try:
        train = state.train_epoch(progress_every_s=ctx.progress_every_s if ctx.rank == 0 else 0.0,
                                  after_step=spot.after_step if spot else None)
        if spot:
            spot.at_epoch_end(train)  # a notice that came late in the epoch: its checkpoint is this epoch's
        val = state.evaluate()
        totals = torch.stack([train.loss, train.correct, train.count, val.loss, val.correct, val.count,
                              torch.tensor(train.seconds, device=train.loss.device, dtype=torch.float64),
                              val.top5.to(train.loss.device), val.tta_loss.to(train.loss.device),
                              val.tta_correct.to(train.loss.device)]).double()
        if val.confusion is not None:  # one all-reduce for the sums and the matrix (float64: exact to 2**53)
            totals = torch.cat([totals, val.confusion.flatten().to(totals.device)])
        if world > 1:
            dist.all_reduce(totals)
    except RuntimeError as exc:
        if spot and spot.notice and world > 1 and not is_out_of_memory(exc):
            spot.wait_for_restart(exc)  # the reclaimed node's workers are gone: Ray Train restarts the group
        raise
    return train, totals


def _epoch_metrics(cfg: TrainConfig, state: TrainingState, epoch: int, train, totals: torch.Tensor, *,
                   world: int, t0: float) -> dict:
    """The epoch's reported metrics (what history.jsonl, Tune and the console get), its stop reason, and
    the state moved on to the next epoch."""
    t_loss, t_correct, t_count, v_loss, v_correct, v_count, time_sum, v_top5, tta_loss, tta_correct = \
        totals[:SUMS].tolist()
    images_per_s = t_count / (time_sum / world)  # global images over the mean rank's training time
    # with the part of this epoch trained before a resize or a reclaim
    t_loss, t_correct, t_count, lr_sum, updates, norm_sum = state.with_carried(
        [t_loss, t_correct, t_count, train.lr_sum, train.updates, float(train.grad_norm)])
    state.carried = None
    metrics = {
        "epoch": epoch + 1,
        "train_loss": t_loss / t_count, "train_acc": t_correct / t_count,
        "val_loss": v_loss / v_count, "val_acc": v_correct / v_count,
        **({"val_top5": v_top5 / v_count} if classes_predicted(cfg) >= 10 else {}),  # top-5 says little below 10
        **({"val_loss_tta": tta_loss / v_count, "val_acc_tta": tta_correct / v_count} if cfg.tta else {}),
        "lr": lr_sum / max(updates, 1),  # the mean LR of this epoch's updates (the head's)
        **({"grad_norm": norm_sum / max(updates, 1)} if cfg.clip_grad_norm else {}),  # before clipping
        "epoch_time_s": time.perf_counter() - t0,
        "images_per_s": images_per_s,
        "first_step_unix": state.first_step_unix or float("nan"),
        "world_size": world,
        "global_batch": state.layout.global_batch,
        "images_seen": state.images_before + round(t_count),  # what this epoch trained, not the set's size
        "trainable_params": state.trainable_params(),
        "stop_reason": "",
        "divergence": "",  # why the run diverged, when it did
    }
    state.epoch = epoch + 1
    state.images_before = metrics["images_seen"]
    metrics["divergence"] = divergence(metrics, first_train_loss=state.first_train_loss,
                                       num_classes=classes_predicted(cfg))
    if state.first_train_loss is None and not metrics["divergence"]:
        state.first_train_loss = metrics["train_loss"]
    if metrics["divergence"]:
        metrics["stop_reason"] = DIVERGED
    elif state.early_stop.update(metrics["val_acc"]):
        metrics["stop_reason"] = "target_accuracy"
    return metrics


def _log_epoch(cfg: TrainConfig, ctx: WorkerContext, metrics: dict, writer, wandb_run) -> None:
    """Rank 0's epoch line, TensorBoard scalars and W&B record (copied into remote storage when it is)."""
    if ctx.epoch_lines:
        print(_epoch_line(metrics, cfg.epochs), flush=True)
    if writer:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "val_loss_tta", "val_acc_tta", "lr",
                    "grad_norm", "images_per_s", "epoch_time_s"):
            if key in metrics:  # val_top5: 10 classes or more; grad_norm: under --clip-grad-norm; *_tta: --tta
                writer.add_scalar(key, metrics[key], metrics["epoch"])
        writer.flush()
        if wandb_run:
            wandb_run.log(metrics)
        if ctx.publish_logs:
            ctx.publish_logs()


# ---- spot notices and resizes (elastic runs) -----------------------------------------------------------


def _tensorboard(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def _epoch_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:6.2%}  "
            f"val loss {m['val_loss']:.4f} acc {m['val_acc']:6.2%}  lr {m['lr']:.4g}  "
            f"{m['epoch_time_s']:.1f}s  {m['images_per_s']:,.0f} img/s"
            + (f"  mirror-averaged val acc {m['val_acc_tta']:6.2%}" if "val_acc_tta" in m else ""))


def _stop_message(m: dict, cfg: TrainConfig) -> str:
    if m["stop_reason"] == DIVERGED:
        return (f"stopped at epoch {m['epoch']}: diverged ({m['divergence']}); lower --lr (now {cfg.lr:g}), "
                f"add --warmup-epochs or use --precision fp32")
    return (f"stopped early at epoch {m['epoch']}: validation accuracy {m['val_acc']:.2%} met the target "
            f"{cfg.target_accuracy:.2%} for {cfg.patience} consecutive epoch(s)")


# ---- launchers ------------------------------------------------------------------------------------


