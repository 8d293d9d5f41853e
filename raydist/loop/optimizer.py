"""The optimizer of a worker's training state: SGD (momentum, Nesterov) or AdamW over parameter groups per
transfer-learning unit, and this run's hyperparameters set in every group (also in groups loaded from a
checkpoint, which carry the old run's)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from raydist.config.fields import TrainConfig
from raydist.config.rates import backbone_lr_mult
from raydist.models.transfer import Unit


def build_optimizer(cfg: TrainConfig, units: Sequence[Unit], peak_lr: float,
                    fused: Optional[bool]) -> tuple[torch.optim.Optimizer, list[float]]:
    """The optimizer and each group's LR multiplier. No weight decay on BatchNorm and bias parameters:
    decaying them only hurts (Goyal et al. 2017). Two groups per unit; a unit's LR multiplier is 1 for the
    new head, backbone_lr_mult for the rest."""
    groups = []
    for unit in units:
        for decay in (True, False):
            params = [p for p in unit.params if (p.ndim > 1) == decay]
            if params:
                groups.append({"params": params, "unit": unit.name, "decay": decay})
    new = {unit.name: unit.new for unit in units}
    mults = [1.0 if new[g["unit"]] else backbone_lr_mult(cfg) for g in groups]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(cfg.momentum, 0.999), fused=fused)
    else:
        optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    apply_hyperparameters(cfg, optimizer, mults, fused)
    return optimizer, mults


def apply_hyperparameters(cfg: TrainConfig, optimizer: torch.optim.Optimizer, mults: Sequence[float],
                          fused: Optional[bool]) -> None:
    """This run's weight decay, momentum, LR multipliers and `fused` in every group (the LR itself is set by
    the Schedule; a checkpoint saved on another device says another `fused`)."""
    for group, mult in zip(optimizer.param_groups, mults):
        group["lr_mult"] = mult
        group["fused"] = fused
        group["weight_decay"] = cfg.weight_decay if group["params"][0].ndim > 1 else 0.0
        if cfg.optimizer == "adamw":
            group["betas"] = (cfg.momentum, group["betas"][1])
        else:
            group["momentum"], group["nesterov"] = cfg.momentum, cfg.nesterov and cfg.momentum > 0
