"""--model-parallel K: one worker's model cut into K stages on its K devices (raydist.parallel.pipeline),
balanced by parameter count or by each unit's measured forward+backward time.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from raydist.config.fields import TrainConfig
from raydist.data.sizes import input_side
from raydist.errors import WorkerInputError
from raydist.loop.recipe import autocast_dtype
from raydist.parallel.pipeline import Pipeline, pipeline_units, stage_devices, unit_costs


def split_model(net: nn.Module, cfg: TrainConfig, *, device: torch.device, world: int,
                held: Sequence[torch.device], channels_last: bool) -> Pipeline:
    """`net` in cfg.model_parallel stages balanced by parameter count or by the forward+backward time of each
    unit, measured here on a micro-batch of this run's input shape; every rank cuts it where rank 0 does."""
    units = pipeline_units(net)
    sample = None
    if cfg.pipeline_balance == "time":
        side = input_side(cfg)
        generator = torch.Generator(device=device).manual_seed(0)
        sample = torch.randn(math.ceil(cfg.batch_size / cfg.micro_batches), cfg.input_channels(), side, side,
                             device=device, generator=generator)
        if channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
    costs = torch.tensor(unit_costs(units, balance=cfg.pipeline_balance, sample=sample,
                                    autocast_dtype=autocast_dtype(cfg.precision, device)),
                         dtype=torch.float64, device=device)
    if world > 1:  # measured times differ from rank to rank; DDP needs every rank to cut the model alike
        dist.broadcast(costs, src=0)
    try:
        devices = stage_devices(device, cfg.model_parallel, held=held)
    except ValueError as exc:  # fewer GPUs visible than stages: the user's setting, said in one line
        raise WorkerInputError(str(exc)) from None
    return Pipeline(units, costs=costs.tolist(), devices=devices, micro_batches=cfg.micro_batches)
