"""BatchNorm statistics re-estimated for the weights that are evaluated (--precise-bn BATCHES).

BatchNorm's running statistics are a moving average over the last ~1/momentum training steps (10 at
PyTorch's 0.1), each step's taken with the weights of that step. At a high learning rate those weights move
faster than the average follows, and the model is evaluated with statistics of weights it no longer has: on
digits' default run, validation accuracy sat at 9-26% for three epochs while training accuracy reached 85%
(docs/benchmarks.md, "BatchNorm statistics"). "Precise BN" (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021; fvcore's PreciseBN) measures them again before evaluating: a few training batches, with
training augmentation (the policies and random erasing included; not --mixup/--cutmix, which belong to the
loss: the statistics are for the unmixed images evaluation sees) and without gradients, through the model
in training mode with a cumulative average, then the mean over the ranks. A few batches suffice: on digits 2 per worker gave what the
whole training set gave.

The batches are drawn from a permutation of their own (seeded by the run's seed and the epoch), so the
training order, the augmentation of the next epoch (reseeded per epoch) and a resume are unaffected. On a
streamed image folder they are one more Ray Data pipeline per evaluation (about 2 s to start on the test
cluster), which `--precise-bn 0` saves.
Frozen units (fine-tuning) keep their pretrained statistics: their norms are in eval mode and are skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raydist.data.splits import shard_indices
from raydist.loop.worker_data import data_batches
from raydist.models.transfer import freeze_norms

_SEED_OFFSET = 7_919  # its own permutation: not the epoch's training order


def training_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose running statistics training updates (in training mode, tracking them)."""
    return [m for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]


@torch.no_grad()
def reestimate_statistics(net: nn.Module, train_set, *, batches: int, batch_size: int, augment, epoch: int,
                          seed: int, rank: int, world: int, device: torch.device, channels_last: bool,
                          amp_dtype=None) -> int:
    """Replace the running mean and variance of `net`'s training BatchNorm layers with their average over
    `batches` training batches of this rank's, then over all ranks. `net` is in training mode, with frozen
    units' norms in eval mode (as train_epoch leaves it). Returns the batches used on this rank (every rank
    uses as many, which SyncBatchNorm's collectives need)."""
    norms = training_norms(net)
    if not norms or batches <= 0:
        return 0
    shards = list(shard_indices(len(train_set), batch_size=batch_size, rank=rank, world_size=world,
                                epoch=epoch, seed=seed + _SEED_OFFSET, device=device))[:batches]
    momenta = [m.momentum for m in norms]
    calls = {m: 0 for m in norms}

    def next_factor(module, _inputs):
        # A cumulative average of every call's statistics, as momentum None gives, but with the factor given
        # as a number: with None, BatchNorm reads its batch count to the host (a GPU sync) per layer. Counted
        # per layer and call: a split model (--micro-batches M) calls each norm M times a batch.
        calls[module] += 1
        module.momentum = 1.0 / calls[module]

    hooks = [m.register_forward_pre_hook(next_factor) for m in norms]
    for m in norms:
        m.reset_running_stats()
    try:
        shuffle_seed = (seed + _SEED_OFFSET) * 100_003 + epoch  # a streamed folder's local shuffle
        for images, _ in data_batches(train_set, shards, train=True, shuffle_seed=shuffle_seed):
            x = augment(images, train=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                net(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    if world > 1:
        # Every rank averaged the same number of batches: the mean over ranks is the mean over all of them.
        # (On `device`: a model split over GPUs has its norms on several.)
        flat = torch.cat([torch.cat([m.running_mean, m.running_var]).to(device, torch.float64) for m in norms])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for m in norms:
            n = m.running_mean.numel()
            m.running_mean.copy_(flat[offset:offset + n])
            m.running_var.copy_(flat[offset + n:offset + 2 * n])
            offset += 2 * n
    return len(shards)


def precise_statistics(state) -> int:
    """--precise-bn for a TrainingState: its model's statistics re-estimated from `cfg.precise_bn` batches."""
    state.net.train()
    freeze_norms(state.units, state.stage)  # frozen units keep their pretrained statistics
    cfg = state.cfg
    # the batch a worker trains on: --batch-size, or an elastic run's share of its global batch
    return reestimate_statistics(state.pipeline or state.net, state.train_set, batches=cfg.precise_bn,
                                 batch_size=state.layout.micro_batch, augment=state.augment, epoch=state.epoch,
                                 seed=cfg.seed, rank=state.rank, world=state.world, device=state.device,
                                 channels_last=state.channels_last, amp_dtype=state.amp_dtype)


def rank0_statistics(net: nn.Module, average=None) -> None:
    """Rank 0's buffers (BatchNorm's statistics) on every rank, and its averaged ones under --ema: each rank's
    last training forward updated its own, and rank 0's are the ones saved, so every shard is evaluated
    with them and the reported metric is the saved model's (--precise-bn then replaces the training norms'
    with the mean over the ranks)."""
    for buffer in net.buffers():
        dist.broadcast(buffer, src=0)
    if average is not None:
        average.broadcast_statistics()
