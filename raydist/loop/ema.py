"""An exponential moving average of the weights (--ema DECAY): what timm's ModelEmaV3 and Composer's EMA keep.

The average covers the model's whole floating state: parameters and BatchNorm's running statistics, so the
averaged weights are evaluated with statistics averaged alike. Integer buffers (BatchNorm's batch count) are
copied. The decay ramps up as TensorFlow's ExponentialMovingAverage does with `num_updates`:
min(DECAY, (1 + n) / (10 + n)) at update n, so a short run's average is not dominated by its random start.

The average is updated after every optimizer step, on every rank (the parameters are equal on every rank
after DDP's step; each rank's BatchNorm statistics are its own until the epoch's end, when rank 0's are
broadcast, as the live ones are). Evaluation swaps the averaged values into the model in place, so every form
of it (DDP, compiled, split over devices) evaluates them, and swaps the live ones back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


class WeightAverage:
    def __init__(self, net: nn.Module, decay: float):
        self.net, self.decay = net, decay
        self.updates = 0
        self._names = list(net.state_dict())
        self._average = [t.detach().clone() for t in self._live]
        self._floating = [i for i, t in enumerate(self._average) if t.is_floating_point()]
        self._buffer_names = {name for name, _ in net.named_buffers()}

    @property
    def _live(self) -> list:
        # read each time: state_dict()'s tensors share storage with the module's only until a .to() moves it
        return list(self.net.state_dict().values())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live weights by one optimizer step."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        live = self._live
        torch._foreach_lerp_([self._average[i] for i in self._floating], [live[i] for i in self._floating], weight)
        for i, live in enumerate(live):
            if not live.is_floating_point():
                self._average[i].copy_(live)

    @torch.no_grad()
    def broadcast_statistics(self) -> None:
        """Rank 0's averaged buffers on every rank (the parameters' averages are equal already)."""
        for name, average in zip(self._names, self._average):
            if name in self._buffer_names:
                dist.broadcast(average, src=0)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, keep_statistics: bool = False) -> Iterator[None]:
        """The averaged values in the model's own tensors for the block; the live ones back after it. With
        `keep_statistics`, the buffers as the block left them become the average's (--precise-bn's
        statistics, re-estimated for the averaged weights)."""
        live = self._live
        kept = [t.clone() for t in live]
        for tensor, average in zip(live, self._average):
            tensor.copy_(average)
        try:
            yield
        finally:
            if keep_statistics:
                for name, tensor, average in zip(self._names, live, self._average):
                    if name in self._buffer_names:
                        average.copy_(tensor)
            for tensor, saved in zip(live, kept):
                tensor.copy_(saved)

    def weights(self) -> dict:
        """The averaged weights as a model state dict (what checkpoints and model_final.pt hold)."""
        return dict(zip(self._names, self._average))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    @torch.no_grad()
    def load(self, weights: dict, state: dict) -> None:
        """The average saved in a checkpoint: its weights and how many updates it has seen."""
        for name, average in zip(self._names, self._average):
            average.copy_(weights[name])
        self.updates = int(state["updates"])
