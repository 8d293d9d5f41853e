"""Model parallelism: a model's layers in K stages on K devices, with micro-batches pipelined through them (GPipe).

    units = pipeline_units(net)                                    # [("stem", m), ("stage1.0", m), ..., ("head", m)]
    costs = unit_costs(units, balance="params")                    # or "time": measured on a sample micro-batch
    pipe = Pipeline(units, costs=costs, devices=stage_devices(torch.device("cuda:0"), 2), micro_batches=4)
    loss = criterion(pipe(x), y.to(pipe.output_device))            # x on the first device; backward as usual

This is the split of PyTorch's model-parallel tutorial (ResNet-50 as stem..layer2 on one GPU, layer3..head on
another, micro-batches so both work at once), made general: every registered model names its units (its
`pipeline_units()` method; torchvision's ResNets are read from their attributes here), and the boundaries are
chosen to balance parameter counts or measured forward+backward time. The units are the model's own modules,
so the model's state dict, its checkpoints and its optimizer are those of the unsplit model. Pure torch: no Ray.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import torch
from torch import nn

from raydist.models.registry import MODELS, create_model

Units = list[tuple[str, nn.Module]]
BALANCES = ("params", "time")


# ---- the model's units ---------------------------------------------------------------------------------


def pipeline_units(net: nn.Module) -> Units:
    """The model as an ordered list of (name, module) whose composition is its forward. Read after
    raydist.models.transfer has built it (a grey stem replaces the first conv): the units are its modules then."""
    import torchvision

    if isinstance(net, torchvision.models.ResNet):
        units = [("stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool))]
        for i in range(1, 5):
            units += [(f"layer{i}.{j}", block) for j, block in enumerate(getattr(net, f"layer{i}"))]
        units.append(("head", nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)))
    elif hasattr(net, "pipeline_units"):
        units = net.pipeline_units()
    else:
        raise ValueError(f"{type(net).__name__} defines no pipeline units (a pipeline_units() method); the models "
                         f"that do: {', '.join(models_with_units())}")
    _check_covers(net, units)
    return units


def models_with_units() -> list[str]:
    """The registered models that can be split (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        return [name for name in sorted(MODELS) if _has_units(create_model(name, num_classes=10))]


def _has_units(net: nn.Module) -> bool:
    import torchvision

    return isinstance(net, torchvision.models.ResNet) or hasattr(net, "pipeline_units")


def _check_covers(net: nn.Module, units: Units) -> None:
    """Every parameter and buffer of the model in exactly one unit: a tensor left out would stay behind on
    the first device (or train nowhere), one in two units would be placed twice."""
    owner: dict[int, str] = {}
    for name, module in units:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in owner:
                raise ValueError(f"{type(net).__name__}.pipeline_units(): a tensor is in both {owner[id(tensor)]} "
                                 f"and {name}")
            owner[id(tensor)] = name
    left_out = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if id(t) not in owner]
    if left_out:
        raise ValueError(f"{type(net).__name__}.pipeline_units() leaves out {', '.join(left_out[:3])}")


# ---- what each unit costs, and the balanced split ------------------------------------------------------


def unit_costs(units: Units, *, balance: str, sample: Optional[torch.Tensor] = None,
               autocast_dtype: Optional[torch.dtype] = None) -> list[float]:
    """Each unit's cost: its parameter count (`params`), or its forward+backward seconds on `sample`, a
    micro-batch on the device the units are on now (`time`, under autocast to `autocast_dtype` if given)."""
    if balance == "params":
        return [float(sum(p.numel() for p in module.parameters())) for _, module in units]
    if balance == "time":
        if sample is None:
            raise ValueError("--pipeline-balance time measures the units on a sample micro-batch; none was given")
        return measured_seconds(units, sample, autocast_dtype=autocast_dtype)
    raise ValueError(f"--pipeline-balance {balance!r} is not one of: {', '.join(BALANCES)}")


def measured_seconds(units: Units, sample: torch.Tensor, *, autocast_dtype: Optional[torch.dtype] = None,
                     repeats: int = 3) -> list[float]:
    """The median over `repeats` (after one warm-up) of each unit's forward+backward seconds in train mode,
    fed what the units before it produce from `sample`. The model is left as it was: BatchNorm statistics are
    restored, no gradient is accumulated (autograd.grad, not backward), the global RNG (dropout) is restored."""
    device = sample.device
    modules = [module for _, module in units]
    buffers = [b for m in modules for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    training = [m.training for m in modules]
    times: list[list[float]] = [[] for _ in modules]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for m in modules:
            m.train()
        for round_ in range(repeats + 1):
            x = sample
            for i, module in enumerate(modules):
                x = x.detach().requires_grad_(i > 0)  # the first stage gets no input gradient in training either
                _synchronize(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    y = module(x)
                inputs = [p for p in module.parameters() if p.requires_grad] + ([x] if i > 0 else [])
                if inputs:
                    torch.autograd.grad(y, inputs, grad_outputs=torch.ones_like(y), allow_unused=True)
                _synchronize(device)
                if round_:  # round 0 warms up (first-call allocations, cuDNN's algorithm search)
                    times[i].append(time.perf_counter() - t0)
                x = y
    with torch.no_grad():
        for b, value in zip(buffers, saved):
            b.copy_(value)
    for m, mode in zip(modules, training):
        m.train(mode)
    return [statistics.median(t) for t in times]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def balanced_stage_sizes(costs: Sequence[float], stages: int) -> list[int]:
    """How many units each of `stages` contiguous, non-empty stages gets so that the costliest stage costs
    least (exact, by dynamic programming: a few dozen units). Among equally good splits, the earliest cuts."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the least possible cost of the costliest stage when the first i units form s stages;
    # cut[s][i]: where the last of those s stages starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for start in range(s - 1, i):
                worst = max(best[s - 1][start], prefix[i] - prefix[start])
                if worst < best[s][i]:
                    best[s][i], cut[s][i] = worst, start
    sizes, end = [], n
    for s in range(stages, 0, -1):
        sizes.append(end - cut[s][end])
        end = cut[s][end]
    return sizes[::-1]


def stage_devices(device: torch.device, stages: int, held: Optional[Sequence[torch.device]] = None) -> list[torch.device]:
    """The devices of a worker's stages: on GPUs, the first `stages` of the GPUs it holds (`held`, `device`
    first: Ray Train's get_devices, whose ids need not be adjacent; without it, `stages` GPUs from `device`
    on); on the CPU, the CPU each time (which tests the split, and speeds nothing up)."""
    if device.type != "cuda":
        return [device] * stages
    if held is None or len(held) <= 1:
        first = device.index or 0
        held = [torch.device("cuda", i) for i in range(first, torch.cuda.device_count())]
    held = [d for d in held if d.type == "cuda"]
    if stages > len(held):
        raise ValueError(f"--model-parallel {stages} places a stage on each of a worker's GPUs, but this worker "
                         f"holds {len(held)} ({', '.join(map(str, held))}); give --gpus-per-worker {stages}")
    return list(held[:stages])


# ---- the pipeline --------------------------------------------------------------------------------------


class Pipeline(nn.Module):
    """The units in `len(devices)` stages, stage i on devices[i], balanced by `costs`; forward splits the
    batch into `micro_batches` parts and runs them GPipe-style (fill, then drain).

    Schedule: at clock t stage s runs micro-batch t - s. Each clock issues the later stages first, each
    taking what the stage before it produced at the previous clock: CUDA launches are asynchronous and
    per device, so the host enqueues every device's work of a clock before any of it must finish, and stage
    s of micro-batch m runs while stage s+1 runs micro-batch m-1 (as in PyTorch's model-parallel tutorial;
    issuing the earlier stage first would queue its device-to-device copy behind its own next micro-batch).
    The outputs are concatenated on the last device; the loss of that concatenation back-propagates through
    every micro-batch, so the gradients are the whole batch's (autograd runs each device's backward in its
    own thread: the backward overlaps the same way).

    What equals what, to float rounding: in eval mode the pipeline is the unsplit model. In train mode
    BatchNorm normalises each micro-batch with that micro-batch's own statistics and updates its running
    statistics once per micro-batch (as in GPipe), so the pipeline equals the unsplit model fed the
    micro-batches one after another, not the unsplit model fed the whole batch. Dropout draws its masks
    in the schedule's order, so those match the unsplit model's in distribution only.
    """

    def __init__(self, units: Units, *, costs: Sequence[float], devices: Sequence[torch.device], micro_batches: int):
        super().__init__()
        if not 1 <= len(devices) <= len(units):
            raise ValueError(f"--model-parallel {len(devices)}: the model has {len(units)} pipeline units "
                             f"({_span([n for n, _ in units])}), so at most {len(units)} stages")
        if micro_batches < 1:
            raise ValueError(f"--micro-batches must be 1 or more, got {micro_batches}")
        if len(costs) != len(units):
            raise ValueError(f"{len(costs)} costs for {len(units)} pipeline units")
        sizes = balanced_stage_sizes(costs, len(devices))
        self.devices = list(devices)
        self.micro_batches = micro_batches
        self.stage_units: list[list[str]] = []  # the unit names of each stage, for describe()
        self.stage_costs: list[float] = []
        stages, start = [], 0
        for size, device in zip(sizes, self.devices):
            names, modules = zip(*units[start:start + size])
            # The model's own modules, moved: the model (and its state dict) sees them on this device too.
            stages.append(nn.Sequential(*modules).to(device))
            self.stage_units.append(list(names))
            self.stage_costs.append(sum(costs[start:start + size]))
            start += size
        self.stages = nn.ModuleList(stages)

    @property
    def output_device(self) -> torch.device:
        return self.devices[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tensor_split gives near-equal parts, never an empty one (a last batch smaller than M gets fewer).
        acts = list(x.tensor_split(min(self.micro_batches, len(x))))
        for clock in range(len(acts) + len(self.stages) - 1):
            for s in reversed(range(len(self.stages))):
                m = clock - s
                if 0 <= m < len(acts):
                    acts[m] = self.stages[s](acts[m].to(self.devices[s]))
        return torch.cat(acts)

    def describe(self, balance: str) -> str:
        """One line: where the boundaries fell, and what each stage holds."""
        unit = "parameters" if balance == "params" else "ms forward+backward per micro-batch"
        scale = 1.0 if balance == "params" else 1e3
        stages = "; ".join(f"stage {i + 1} on {d}: {_span(names)} ({cost * scale:,.0f} {unit})" for i, (names, cost, d)
                           in enumerate(zip(self.stage_units, self.stage_costs, self.devices)))
        return f"model parallel, {len(self.stages)} stages balanced by {balance}: {stages}; {self.micro_batches} " \
               f"micro-batch(es) per batch"


def _span(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
