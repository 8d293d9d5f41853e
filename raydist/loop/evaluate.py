"""Evaluation on a rank's shard, summed exactly over all ranks, and the input pipeline (augmentation,
channels-last) that training and evaluation share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from raydist.config.fields import TrainConfig
from raydist.data.augment import Augmenter, augment_kind, augment_policy
from raydist.data.registry import DATASETS
from raydist.data.sizes import classes_predicted, input_side, stored_side
from raydist.data.splits import shard_indices
from raydist.loop.recipe import autocast_dtype
from raydist.loop.worker_data import data_batches
from raydist.output.mistakes import MATRIX_CLASSES
from raydist.parallel.pipeline import Pipeline


def input_pipeline(cfg: TrainConfig, device, *, seed: int = 0) -> Augmenter:
    """What turns a batch of uint8 images into the model's input: augmentation (training only), the data set's
    normalisation, the channels fed and the --input-size resize."""
    spec = DATASETS[cfg.dataset]
    mean, std = (spec.mean, spec.std) if cfg.normalize == "dataset" else ((0.5,) * 3, (0.5,) * 3)
    kind, side = augment_kind(cfg.augment, cfg.dataset), input_side(cfg)
    recipe = {"policy": augment_policy(cfg.augment), "erase": cfg.random_erase}
    if cfg.dataset == "folder":  # stored at 256 for a 224 input: centre crops, or random-resized crops
        return Augmenter(kind, mean=mean, std=std, device=device, seed=seed, crop=side, **recipe)
    # side: --input-size, or the data set's own side for the model (digits: 16)
    return Augmenter(kind, mean=mean, std=std, device=device, seed=seed, channels=cfg.input_channels(),
                     size=side if side != stored_side(cfg) else None, **recipe)


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    # auto: channels_last on a GPU (tensor cores want NHWC) and on the CPU too, where oneDNN's convolutions
    # ran the CIFAR models 5-26% faster in it (docs/benchmarks.md, "Memory format on the CPU").
    return cfg.channels_last in ("on", "auto")


@torch.no_grad()
def evaluate_model(net: nn.Module, dataset, cfg: TrainConfig, *, device: torch.device, rank: int = 0,
                   world: int = 1, augment: Optional[Augmenter] = None) -> "EpochSums":
    """Sums of loss, correct, count and top-5 correct (and under --tta the mirror-averaged loss and correct),
    and the confusion matrix (up to MATRIX_CLASSES classes), over this rank's share of `dataset`: the one
    evaluation path, for the validation split every epoch and for the test split once at the end
    (raydist.final_eval)."""
    augment = augment or input_pipeline(cfg, device)
    channels_last = uses_channels_last(cfg, device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    net.eval()
    output_device = net.output_device if isinstance(net, Pipeline) else device  # a split model's last device
    sums = EpochSums(*(torch.zeros((), device=output_device, dtype=torch.float64) for _ in range(3)))
    sums.top5 = torch.zeros((), device=output_device, dtype=torch.float64)
    sums.tta_loss, sums.tta_correct = torch.zeros(2, device=output_device, dtype=torch.float64).unbind()
    classes = classes_predicted(cfg)
    matrix = classes <= MATRIX_CLASSES
    # counts as float64 (exact to 2**53), added with index_add_: bincount on a GPU reads its input's
    # largest value to the host
    sums.confusion = torch.zeros(classes * classes if matrix else 0, device=output_device, dtype=torch.float64)
    shards = shard_indices(len(dataset), batch_size=cfg.val_batch_size or 2 * cfg.batch_size, rank=rank,
                           world_size=world, shuffle=False, drop_last=False, pad=False, device=device)
    for images, labels in data_batches(dataset, list(shards), train=False):
        x = augment(images, train=False)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        labels = labels.to(output_device)
        sums.loss += criterion(logits.float(), labels).double() * len(labels)
        predicted = logits.argmax(1)
        sums.correct += (predicted == labels).sum()
        sums.count += len(labels)
        top = logits.topk(min(5, classes), dim=1).indices
        sums.top5 += (top == labels[:, None]).any(1).sum()
        if matrix:
            sums.confusion.index_add_(0, labels * classes + predicted, torch.ones_like(labels, dtype=torch.float64))
        if cfg.tta:  # the plain logits averaged with the mirrored image's: counted apart from the plain metrics
            mirrored = x.flip(3).contiguous(memory_format=torch.channels_last) if channels_last else x.flip(3)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                averaged = (logits.float() + net(mirrored).float()) / 2
            sums.tta_loss += criterion(averaged, labels).double() * len(labels)
            sums.tta_correct += (averaged.argmax(1) == labels).sum()
    sums.confusion = sums.confusion.view(classes, classes) if matrix else None
    return sums


@dataclass
class EpochSums:
    """Per-rank sums, turned into global means by one all-reduce."""
    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    lr_sum: float = 0.0  # training only: the head's LRs of the epoch's updates (the same on every rank)
    updates: int = 0
    seconds: float = 0.0
    grad_norm: object = 0.0  # training under --clip-grad-norm: the sum of the updates' norms before clipping
    top5: Optional[torch.Tensor] = None  # evaluation only: images whose class is among the 5 highest logits
    confusion: Optional[torch.Tensor] = None  # evaluation only: [true class, predicted class] counts
    tta_loss: Optional[torch.Tensor] = None  # evaluation under --tta: the loss of the mirror-averaged logits
    tta_correct: Optional[torch.Tensor] = None  # ... and their correct predictions
