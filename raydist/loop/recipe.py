"""The training recipe's small parts: the learning-rate schedule (warmup, cosine, step, one-cycle), early
stopping at a target accuracy, divergence, out-of-memory messages, autocast precision, per-epoch seeds and
the checkpoint-cost hint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional, Sequence

import torch

from raydist.config.fields import TrainConfig
from raydist.data.augment import Augmenter
from raydist.data.sizes import input_side


def lr_factor(update: int, *, warmup: int, total: int, schedule: str, step_every: int, gamma: float,
              milestones: Sequence[int] = (), warmup_start: float = 0.0) -> float:
    """LR multiplier at optimizer update `update` (0-based): linear warmup, then cosine, step or constant.
    `warmup_start`: the factor the warmup rises from (0, or 1 / workers: from one worker's LR, as Horovod's
    examples do); `milestones`: the updates at which the step schedule multiplies by `gamma` (else every
    `step_every`)."""
    # 1) warmup: ramp linearly from warmup_start + 1/warmup of the rest to 1 over the first `warmup` updates
    if update < warmup:
        return warmup_start + (1.0 - warmup_start) * (update + 1) / warmup
    # 2) after warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        if milestones:
            return gamma ** sum(update >= m for m in milestones)
        return gamma ** (update // step_every)
    progress = min((update - warmup) / max(1, total - warmup), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """Sets the LR of optimizer update `update` before it is taken. Unlike LambdaLR it keeps no state of its
    own worth saving: a resumed run places it by the epochs done, in its own updates per epoch."""

    def __init__(self, lr_at: Callable[[int], float]):
        self.lr_at, self.update = lr_at, 0

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(self.update) * group.get("lr_mult", 1.0)  # a pretrained backbone's lower LR

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.update += 1
        self.apply(optimizer)


_DROPOUT_STREAM = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: torch's generator a long way from the augmenter's


def seed_epoch(seed: int, epoch: int, rank: int, augment: "Augmenter", position: int = 0) -> None:
    """Seed every random stream of this rank (augmentation, dropout, CPU and CUDA) from (seed, epoch, rank).

    An epoch's randomness then depends on nothing that happened before it, so a run resumed from a
    checkpoint at an epoch end draws exactly what the uninterrupted run drew, with no generator state to
    save, and after a restart on another worker count each rank still gets its own stream. A resume inside
    an epoch (`position` images in) draws a stream of its own for the rest of it.
    """
    stream = ((seed * 1_000_003 + epoch) * 1_009 + rank) % 2**63  # torch takes a 64-bit seed
    if position:
        stream = (stream * 1_000_033 + position) % 2**63
    # Two seeds, not one: generators of the same kind seeded alike draw the same numbers, and dropout's masks
    # (torch's generator) would repeat the augmentation's and the mixer's draws (the augmenter's).
    torch.manual_seed((stream + _DROPOUT_STREAM) % 2**63)  # also seeds every CUDA device
    augment.gen.manual_seed(stream)


def apply_device_settings(cfg: TrainConfig, device: torch.device) -> None:
    """The process-wide settings a worker trains under, set by the loop and by every benchmark that times the
    loop's pieces (so that its figures are the loop's): on a CPU a thread pool sized to the worker's CPUs; on
    a GPU cuDNN's autotuner (fixed input shapes: it times its kernels once and keeps the best) and TF32
    matmuls and convolutions where fp32 runs, except when fp32 itself is asked for (--precision fp32)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision != "fp32"


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        return auto_precision_dtype(device)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def group_precision(cfg: TrainConfig, device: torch.device, world: int) -> TrainConfig:
    """cfg with `--precision auto` resolved once for the whole group on GPUs: bf16 only when every rank's
    GPU computes it natively (the smallest compute capability decides), else fp16 with the grad scaler. Each
    rank deciding alone would mix scaled and unscaled gradients in one allreduce on a mixed cluster."""
    if cfg.precision != "auto" or device.type != "cuda":
        return cfg
    major = torch.cuda.get_device_capability(device)[0]
    if world > 1:
        import torch.distributed as dist

        smallest = torch.tensor([major], device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        major = int(smallest.item())
    chosen = auto_precision_dtype(device, (major, 0))
    return dataclasses.replace(cfg, precision="bf16" if chosen is torch.bfloat16 else "fp16")


def auto_precision_dtype(device: torch.device, capability: Optional[tuple] = None) -> Optional[torch.dtype]:
    """`--precision auto`: bf16 where the GPU computes it natively (compute capability 8.0 and later: A100,
    A10G, L4, H100), fp16 with the grad scaler before that (T4, V100 emulate bf16 autocast, several times
    slower), fp32 on the CPU. `capability`: the device's (major, minor), read from it when not given."""
    if device.type != "cuda":
        return None
    major, _ = capability if capability is not None else torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS), or the CPU allocator's refusal, which torch raises as a plain
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def out_of_memory_message(cfg: TrainConfig, device: torch.device, world: int) -> str:
    """What ran out, with what, and what to change: half the per-worker batch with twice the accumulation
    keeps the global batch (and so the LR and the results) the same."""
    if device.type == "cuda":
        memory = f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
    else:
        try:
            memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB (host)"
        except (ValueError, OSError, AttributeError):
            memory = "unknown"
    size = input_side(cfg)
    half = max(1, cfg.batch_size // 2)
    held = folder_on_device(cfg, device)
    if held:  # the decoded folder, not the batch, took the device's memory: say that first
        return (f"out of memory on {device.type} training {cfg.model}: the image folder held decoded on the GPU "
                f"takes {held / 2**30:.1f} GiB of its {memory}; use --data-loader stream (images decoded by Ray "
                f"Data, a batch at a time), or a smaller --input-size")
    return (f"out of memory on {device.type} training {cfg.model} with a per-worker batch of {cfg.batch_size} "
            f"images of {size}x{size} pixels (device memory {memory}, {world} worker(s)); use "
            f"--batch-size {half} --grad-accum {cfg.grad_accum * cfg.batch_size // half} (the same global batch), "
            f"or a smaller batch, --input-size or model")


def folder_on_device(cfg: TrainConfig, device: torch.device) -> int:
    """Bytes of an image folder held decoded on this GPU when they are more than DEVICE_SHARE of it, else 0.
    Only `--data-loader memory` holds such a folder: `auto` streams it."""
    if cfg.dataset != "folder" or cfg.data_loader != "memory" or device.type != "cuda":
        return 0
    from raydist.loop.worker_data import DEVICE_SHARE, device_memory_bytes, folder_copy_bytes

    try:
        held = folder_copy_bytes(cfg)
    except Exception:  # noqa: BLE001 - only a better message
        return 0
    return held if held > DEVICE_SHARE * device_memory_bytes(device) else 0


DIVERGED = "diverged"


DIVERGENCE_FACTOR = 1000  # a training loss this many times its first epoch's (or chance level's) has diverged


def divergence(metrics: dict, *, first_train_loss: Optional[float], num_classes: int) -> str:
    """Why an epoch's metrics show a diverged run ("" when they do not): a loss that is not finite, or a
    training loss grown far beyond where it started (it can explode to 1e17 and stay finite). Validation
    loss is only checked for being finite: early in training it legitimately jumps far above the
    training loss while BatchNorm statistics settle."""
    if not math.isfinite(metrics["train_loss"]):
        return f"the train loss is {metrics['train_loss']}"
    # Chance level, ln(classes), bounds the reference from below: a first epoch that already exploded counts.
    # The training loss is the cause, so it is named first: an exploded model's val loss is often inf too.
    reference = max(first_train_loss or 0.0, math.log(num_classes))
    if metrics["train_loss"] > DIVERGENCE_FACTOR * reference:
        return (f"the train loss {metrics['train_loss']:.3g} is over {DIVERGENCE_FACTOR}x its start "
                f"({reference:.3g})")
    if not math.isfinite(metrics["val_loss"]):
        return f"the val loss is {metrics['val_loss']}"
    return ""


class EarlyStop:
    """Stop once validation accuracy has met the target for `patience` consecutive epochs."""

    def __init__(self, target: Optional[float], patience: int, hits: int = 0):
        self.target, self.patience, self.hits = target, patience, hits

    def update(self, val_acc: float) -> bool:
        if self.target is None:
            return False
        self.hits = self.hits + 1 if val_acc >= self.target else 0
        return self.hits >= self.patience


CHECKPOINT_BUDGET = 0.1  # a checkpoint holding training up longer than this share of its epoch gets a hint


def checkpoint_hint(seconds: float, epoch_seconds: float, every: int) -> Optional[str]:
    """A line suggesting a longer --checkpoint-every when writing a checkpoint holds training up for more
    than CHECKPOINT_BUDGET of the epoch (a large model on fast GPUs with slow storage), else None."""
    if epoch_seconds <= 0 or seconds <= CHECKPOINT_BUDGET * epoch_seconds * every:
        return None
    suggested = math.ceil(seconds / (CHECKPOINT_BUDGET * epoch_seconds))
    return (f"note: the checkpoint took {seconds:.2f}s, {seconds / (epoch_seconds * every):.0%} of the training "
            f"time between checkpoints ({epoch_seconds * every:.1f}s); --checkpoint-every {suggested} keeps it "
            f"under {CHECKPOINT_BUDGET:.0%} (a resume then loses up to {suggested} epochs)")


def with_fused_flag(optimizer_state: dict, fused: Optional[bool]) -> dict:
    """A saved optimizer state whose groups say this run's `fused`. PyTorch's load_state_dict places each
    Adam `step` by the *saved* groups' flag: a checkpoint written on CPUs (not fused) would leave the steps
    on the CPU for a fused GPU optimizer, whose first update then fails on the device mismatch."""
    groups = [{**group, "fused": fused} for group in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}


def clip_gradients(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """--clip-grad-norm: the gradients' global L2 norm clipped to `max_norm`, after the fp16 loss scale is taken
    off (unscale_ here; the scaler's step then does not unscale again, and still skips a step whose gradients
    overflowed). Every rank holds the same all-reduced gradients, so every rank clips alike. Returns the norm
    before clipping, on the device (0 for an overflowed step), with no host sync."""
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
