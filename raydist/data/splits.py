"""Which images are which: the fixed validation hold-out of a published training set, the fixed class and
size subsets, and each rank's shard of an epoch (pure index arithmetic on torch tensors)."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

DIGITS_SPLIT_SEED = 0  # fixed: the digits validation set is the same whatever --seed says


VAL_SPLIT_SEED = 0  # fixed: the images held out of a published training set for validation never change


def held_out(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which images of a published training set are held out for validation (a boolean mask): round(fraction
    x n) of each class's n images, a fixed random choice (VAL_SPLIT_SEED), so both parts keep every class's
    share and the split never changes with --seed (or between a run and its resume)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = order[labels[order] == label]  # this class's images in the fixed random order
        mask[members[:held_out_count(len(members), fraction)]] = True
    return mask


def held_out_count(n: int, fraction: float) -> int:
    return round(n * fraction)


SUBSET_SEED = 0  # --train-fraction / --train-per-class pick the same images whatever --seed says


def subset_size(n: int, fraction: float, per_class: Optional[int]) -> int:
    if per_class:
        return min(n, per_class)
    return n if fraction >= 1.0 else max(1, round(n * fraction))


def shard_indices(num_items: int, *, batch_size: int, rank: int, world_size: int, epoch: int = 0,
                  seed: int = 0, shuffle: bool = True, drop_last: bool = True, pad: bool = True,
                  device=None) -> Iterator[torch.Tensor]:
    """Yield this rank's batches of indices for one epoch.

    Training (shuffle, pad, drop_last): every rank draws the same permutation for (seed, epoch), pads it by
    wrapping around so that all ranks hold equally many items, and takes every world_size-th item. Equal
    step counts keep DDP's allreduces matched; dropping the last short batch keeps BatchNorm away from
    single-image batches. Evaluation (no shuffle, no pad, keep last): each item is seen exactly once.
    `device`: where the batches are. The permutation is drawn on the CPU (the same on every device) and
    moved there once per epoch; each batch is then a slice on the device, so no step copies indices from
    the host (on a GPU, a copy that makes the host wait for the device).
    """
    if shuffle:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(num_items)
    if pad and num_items % world_size:
        extra = world_size - num_items % world_size
        order = torch.cat([order, order.repeat(-(-extra // num_items))[:extra]])  # even when extra > num_items
    mine = order[rank::world_size]
    if device is not None:
        mine = mine.to(device)
    stop = len(mine)
    if drop_last and len(mine) >= batch_size:
        stop = len(mine) - len(mine) % batch_size
    for start in range(0, stop, batch_size):
        yield mine[start:start + batch_size]


def steps_per_epoch(num_items: int, *, batch_size: int, world_size: int) -> int:
    """Training batches each rank runs per epoch (matches shard_indices with its training defaults)."""
    per_rank = -(-num_items // world_size)
    return max(per_rank // batch_size, 1) if per_rank >= batch_size else 1
