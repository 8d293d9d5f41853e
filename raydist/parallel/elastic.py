"""Elastic training's arithmetic: the same optimisation whatever the worker count, and the position inside
an epoch that a resize or a spot reclaim resumes from. Plain PyTorch (no Ray), testable in one process.

    layout = batch_layout(cfg, world=3)     # global batch 256 on 3 workers: 86/85/85 images, 1 micro-batch
    for step in epoch_steps(order, start=position, layout=layout, rank=r):
        ...                                 # step.micro_batches, step.weights; step.end is the new position

Progress is counted in images: an epoch is a seeded permutation of the training set (the same on every
rank and every worker count) consumed `global_batch` images per optimizer step, from the position where
the last checkpoint left it. Each step's images are split over the ranks as evenly as they go (sizes
differ by one at most) and each rank's share into micro-batches of at most --batch-size images (gradient
accumulation), or fewer, larger ones where --batch-size would leave a micro-batch of one image. Every
image of an epoch is used exactly once, whatever resizes happened inside it; the last step of an epoch
takes what is left, and a remainder too short to give every rank of the largest group 2 images joins the
step before it (min_tail), so no micro-batch has a single image (BatchNorm fails on one, and a 1-image
batch moves its statistics) and the epoch's steps are the same on any worker count. Every rank runs the
same number of micro-batches in a step, as SyncBatchNorm's per-forward collectives need.

The gradient is the mean over the step's images, however they were split: each micro-batch's mean loss is
weighted by its images x world / step images (DDP averages the ranks' gradients, so the world cancels).
A rank that gets no image (only in an epoch smaller than the group) runs 2 images at weight 0, because
DDP's allreduce needs every rank's backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from raydist.config.fields import MIN_MICRO_BATCH


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's images are split on `world` workers."""
    global_batch: int  # images per optimizer step, all ranks together
    world: int
    accumulation: int  # micro-batches per rank per step (gradient accumulation)
    micro_batch: int  # the most images a rank feeds the model at once (at most --batch-size)

    def describe(self) -> str:
        per_rank = sorted(set(split_sizes(self.global_batch, self.world)), reverse=True)
        shares = "/".join(str(n) for n in per_rank)
        accumulate = f", in {self.accumulation} micro-batches of up to {self.micro_batch}" if self.accumulation > 1 else ""
        return (f"global batch {self.global_batch} = {self.world} worker(s) x {shares} images{accumulate} "
                f"per optimizer step")


def batch_layout(cfg, world: int) -> BatchLayout:
    """The layout of `cfg` (a TrainConfig) on `world` workers: the global batch it asks for (fixed, or
    --batch-size x --grad-accum per worker with --elastic-batch per_worker), each rank's share at most
    --batch-size images per micro-batch."""
    global_batch = cfg.global_batch_at(world)
    per_rank = math.ceil(global_batch / world)
    accumulation = math.ceil(per_rank / cfg.batch_size)
    return BatchLayout(global_batch=global_batch, world=world, accumulation=accumulation,
                       micro_batch=math.ceil(per_rank / accumulation))


def single_worker_share(cfg, layout: BatchLayout) -> float:
    """The LR factor a `--warmup-from single_worker` warmup rises from: one worker's share of the global
    batch, as Horovod's examples start from one worker's LR. On a fixed group that is 1 / workers. An
    elastic run's global batch stays the same whatever the worker count (--elastic-batch global), and so
    does this share: 1 / the most workers, the group the global batch is laid out for (1 / the current
    workers would jump the LR at every resize; --batch-size over a --global-batch would ignore that each
    worker accumulates to its share)."""
    if cfg.is_elastic() and cfg.elastic_batch == "global":
        return 1.0 / cfg.num_workers
    return 1.0 / layout.world


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` split in `parts` sizes that differ by one at most, the larger first."""
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def min_tail(cfg) -> int:
    """The fewest images the last step of an elastic epoch may have: every rank of the largest group gets
    MIN_MICRO_BATCH; a shorter tail joins the step before it. Counted at the most workers, so the steps of an
    epoch (and so the LR schedule) are the same whatever the worker count."""
    return MIN_MICRO_BATCH * cfg.num_workers


def step_ends(num_items: int, global_batch: int, tail: int = 0) -> list[int]:
    """Where each optimizer step of an epoch ends (images consumed): every `global_batch`, and the last step
    takes what is left, with a remainder shorter than `tail` folded into the step before it."""
    ends = list(range(global_batch, num_items, global_batch)) + [num_items]
    if len(ends) > 1 and num_items - ends[-2] < tail:
        del ends[-2]
    return ends


def steps_in_epoch(num_items: int, global_batch: int, tail: int = 0) -> int:
    return len(step_ends(num_items, global_batch, tail))


def update_at(epoch: int, position: int, *, num_items: int, global_batch: int, tail: int = 0) -> int:
    """The optimizer update reached after `epoch` whole epochs and `position` images of the next one, in
    updates of `global_batch` images: where the LR schedule continues after a resume or a resize."""
    ends = step_ends(num_items, global_batch, tail)
    return epoch * len(ends) + sum(1 for end in ends if end <= position)


def epoch_order(num_items: int, *, seed: int, epoch: int, device=None) -> torch.Tensor:
    """The epoch's permutation of the training set: the one shard_indices draws for (seed, epoch), the same
    on every rank and for every worker count."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order.to(device) if device is not None else order


@dataclass
class Step:
    end: int  # the epoch's position (images consumed) once this step is taken
    images: int  # the step's images, all ranks together
    micro_batches: list  # this rank's index tensors, in order; DDP allreduces after the last one
    weights: list  # each micro-batch's loss multiplier: its images x world / step images


def epoch_steps(order: torch.Tensor, *, start: int, layout: BatchLayout, rank: int, tail: int = 0) -> Iterator[Step]:
    """This rank's optimizer steps for the rest of the epoch `order`, from image `start` on (a step's end:
    step_ends, with `tail` from min_tail). Every rank runs the same number of micro-batches in a step
    (SyncBatchNorm's collectives run once per forward on every rank), and none has fewer than
    MIN_MICRO_BATCH images where the shares allow it (BatchNorm fails on one image and a 1-image batch
    moves its statistics)."""
    world = layout.world
    low = start
    for end in step_ends(len(order), layout.global_batch, tail):
        if end <= start:
            continue
        chunk = order[low:end]
        images = len(chunk)
        sizes = split_sizes(images, world)
        offset = sum(sizes[:rank])
        mine = chunk[offset:offset + sizes[rank]]
        low = end
        if len(mine) == 0:  # an epoch smaller than the group (tiny data): take part at weight 0
            yield Step(end=end, images=images, micro_batches=[chunk[:MIN_MICRO_BATCH]], weights=[0.0])
            continue
        # as many pieces as the largest share needs at --batch-size each, the same on every rank; fewer when
        # the smallest share would give a piece under MIN_MICRO_BATCH images
        pieces = math.ceil(sizes[0] / layout.micro_batch)
        if sizes[-1] // pieces < MIN_MICRO_BATCH:
            pieces = max(1, sizes[-1] // MIN_MICRO_BATCH)
        micro, at = [], 0
        for size in reversed(split_sizes(len(mine), pieces)):  # smaller first: the synced last one is full
            micro.append(mine[at:at + size])
            at += size
        yield Step(end=end, images=images, micro_batches=micro,
                   weights=[len(m) * world / images for m in micro])


# ---- spot notices: when to ask --------------------------------------------------------------------------

# An elastic run's collectives once its data is loaded: one waiting on a peer a reclaim took fails within
# minutes, not at torch's default of 30 (start-up keeps that default: a node's first rank may download or
# decode a whole data set while the others wait in a collective).
ELASTIC_COLLECTIVE_TIMEOUT_S = 300


def shorten_collective_timeout(seconds: float = ELASTIC_COLLECTIVE_TIMEOUT_S) -> None:
    """The default process group's timeout for every later collective (torch.distributed's set_timeout)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    set_timeout = getattr(distributed_c10d, "set_timeout", None) or distributed_c10d._set_pg_timeout
    if dist.is_initialized():
        set_timeout(datetime.timedelta(seconds=seconds))


CHECK_BUDGET = 0.01  # preemption checks may cost this share of the training time
FIRST_CHECK_AFTER = 10  # steps timed before the first check, when the cadence is chosen automatically
MAX_CHECK_EVERY = 1000


def check_every(check_s: float, step_s: float) -> int:
    """Steps between preemption checks so that one check (a barrier across all ranks) costs at most
    CHECK_BUDGET of the steps between two checks."""
    if step_s <= 0:
        return MAX_CHECK_EVERY
    return max(1, min(MAX_CHECK_EVERY, math.ceil(check_s / (CHECK_BUDGET * step_s))))
