"""The learning rates a config gives: --lr scaled by the global batch (--lr-scaling) and the backbone's share
of it (--backbone-lr-mult). The training loop, the console and the scaling study all compute them here."""

from __future__ import annotations

from raydist.config.fields import TrainConfig


def lr_scale(cfg: TrainConfig, global_batch: int) -> float:
    """The factor --lr is multiplied by at this global batch (--lr-scaling): the training loop's peak LR is
    cfg.lr * lr_scale(cfg, global batch), and every figure that states a peak LR computes it here."""
    if cfg.lr_scaling == "none":
        return 1.0
    if cfg.lr_scaling == "per_worker":  # one worker's batch (with its accumulation) gets --lr as it is
        return global_batch / cfg.batch_size
    return global_batch / 256


def backbone_lr_mult(cfg: TrainConfig) -> float:
    if cfg.backbone_lr_mult is not None:
        return cfg.backbone_lr_mult
    return 0.1 if cfg.finetune == "lp-ft" else 1.0
