"""The per-worker training loop: one code path for `python -m raydist.train`, every Tune trial and benchmarks.

`train_loop_per_worker(config_dict)` is what Ray Train's TorchTrainer runs on each DDP worker; the
lines marked `# RAY` are its only contact with Ray. Everything else, `run(cfg, ctx)`, is plain PyTorch
and also runs in a single process with `LocalContext` (tests, the overhead benchmark's baseline).

Per epoch: train on this rank's shard, evaluate on its share of the validation set, sum the metrics
over all ranks, report once (every rank, as Ray requires), checkpoint from rank 0, check early stopping.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from raydist.data.augment import Augmenter
from raydist.config import TrainConfig, lr_scale
from raydist.parallel.elastic import (FIRST_CHECK_AFTER, Step, batch_layout, check_every, epoch_order, epoch_steps, min_tail, single_worker_share, steps_in_epoch, update_at)
from raydist.runs.checkpoints import CHECKPOINT_PREFIX
from raydist.output.wandb_log import WandbRun
from raydist.output.wandb_log import run_id as wandb_run_id
from raydist.data.registry import DATASETS
from raydist.data.sources import download_lock, load_splits
from raydist.data.splits import shard_indices, steps_per_epoch
from raydist.errors import DatasetNotFound
from raydist.parallel.pipeline import Pipeline, pipeline_units, stage_devices, unit_costs
from raydist.models.transfer import (Unit, build_model, freeze_norms, pretrained_source, read_weights_file, set_trainable, transfer_units, unfrozen_stages)
from raydist.errors import WeightsError
from raydist.errors import CorruptCheckpoint, DataUnavailable, OutOfMemory, WorkerInputError
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE, checkpoint_dir_name, final_model_bytes, load_checkpoint_file
from raydist.storage import filesystem


@dataclass
class WorkerContext:
    """What the loop needs from whoever launched it."""
    rank: int
    world_size: int
    device: torch.device
    # (metrics, checkpoint folder or None), called on every rank; returns the seconds it spent storing the
    # checkpoint before returning (None when that happens in the background, as Ray Train's upload does)
    report: Callable[[dict, Optional[str]], Optional[float]]
    write_file: Callable[[str, bytes], None]  # writes a file into the run folder (rank 0 calls it)
    resume_state: Optional[dict] = None  # a loaded checkpoint to continue from
    log_dir: Optional[str] = None  # TensorBoard folder for rank 0
    publish_logs: Optional[Callable[[], None]] = None  # copies log_dir into the run folder (remote storage)
    node_id: str = "local"  # the machine this rank runs on: the data is checked once per node
    epoch_lines: bool = True  # rank 0 prints a line per epoch (a study's driver prints its own instead)
    progress_every_s: float = 0.0  # rank 0's progress line inside a long epoch this often (0: never)
    # an elastic run's spot-notice check, a barrier every rank calls equally often: None, or
    # {"nodes": [(node id, address)], "ranks": [...], "deadline_unix": float or None}
    preemption_info: Optional[Callable[[], Optional[dict]]] = None
    # every GPU this worker holds, `device` first (Ray Train's get_devices); the stages of --model-parallel
    devices: Optional[list] = None


# ---- building blocks ------------------------------------------------------------------------------


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
    torch.manual_seed(stream)  # also seeds every CUDA device
    augment.gen.manual_seed(stream)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
    return (f"out of memory on {device.type} training {cfg.model} with a per-worker batch of {cfg.batch_size} "
            f"images of {size}x{size} pixels (device memory {memory}, {world} worker(s)); use "
            f"--batch-size {half} --grad-accum {cfg.grad_accum * cfg.batch_size // half} (the same global batch), "
            f"or a smaller batch, --input-size or model")


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


def input_pipeline(cfg: TrainConfig, device, *, seed: int = 0) -> Augmenter:
    """What turns a batch of uint8 images into the model's input: augmentation (training only), the data set's
    normalisation, the channels fed and the --input-size resize."""
    spec = DATASETS[cfg.dataset]
    mean, std = (spec.mean, spec.std) if cfg.normalize == "dataset" else ((0.5,) * 3, (0.5,) * 3)
    if cfg.dataset == "folder":  # stored at 256 for a 224 input: centre crops, or random-resized crops
        return Augmenter(cfg.augment_kind(), mean=mean, std=std, device=device, seed=seed, crop=input_side(cfg))
    return Augmenter(cfg.augment_kind(), mean=mean, std=std, device=device, seed=seed,
                     channels=cfg.input_channels(), size=cfg.input_size)


def input_side(cfg: TrainConfig) -> int:
    """The side in pixels of the images the model reads."""
    if cfg.input_size:
        return cfg.input_size
    return cfg.fake_image_size if cfg.dataset == "fake" else DATASETS[cfg.dataset].image_size


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    # auto: channels_last on a GPU (tensor cores want NHWC) and on the CPU too, where oneDNN's convolutions
    # ran the CIFAR models 5-26% faster in it (docs/benchmarks.md, "Memory format on the CPU").
    return cfg.channels_last in ("on", "auto")


@torch.no_grad()
def evaluate_model(net: nn.Module, dataset, cfg: TrainConfig, *, device: torch.device, rank: int = 0,
                   world: int = 1, augment: Optional[Augmenter] = None) -> "EpochSums":
    """Sums of loss, correct and count over this rank's share of `dataset`: the one evaluation path, for the
    validation split every epoch and for the test split once at the end (raydist.final_eval)."""
    augment = augment or input_pipeline(cfg, device)
    channels_last = uses_channels_last(cfg, device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    net.eval()
    output_device = net.output_device if isinstance(net, Pipeline) else device  # a split model's last device
    sums = EpochSums(*(torch.zeros((), device=output_device, dtype=torch.float64) for _ in range(3)))
    shards = shard_indices(len(dataset), batch_size=cfg.val_batch_size or 2 * cfg.batch_size, rank=rank, world_size=world, shuffle=False,
                           drop_last=False, pad=False, device=device)
    for images, labels in data_batches(dataset, list(shards), train=False):
        x = augment(images, train=False)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        labels = labels.to(output_device)
        sums.loss += criterion(logits.float(), labels).double() * len(labels)
        sums.correct += (logits.argmax(1) == labels).sum()
        sums.count += len(labels)
    return sums


# ---- the loop -------------------------------------------------------------------------------------


@dataclass
class EpochSums:
    """Per-rank sums, turned into global means by one all-reduce."""
    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    lr_sum: float = 0.0  # training only: the head's LRs of the epoch's updates (the same on every rank)
    updates: int = 0
    seconds: float = 0.0


def backbone_lr_mult(cfg: TrainConfig) -> float:
    if cfg.backbone_lr_mult is not None:
        return cfg.backbone_lr_mult
    return 0.1 if cfg.finetune == "lp-ft" else 1.0


# DDP's switch for the per-forward buffer broadcast: `forward_sync_buffers` from torch 2.15 (which deprecates
# `broadcast_buffers`; both keep the broadcast at wrapping, when every rank's buffers are equal anyway).
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                          else {"broadcast_buffers": False})


class TrainingState:
    """One worker's training: the model and its DDP/compiled wrapper, optimizer, LR schedule, grad scaler,
    early stop, epoch and fine-tuning stage, with train_epoch / evaluate / state_dict / load_state_dict.

    Fine-tuning freezes and unfreezes the backbone by units (raydist.models.transfer): a frozen unit has
    requires_grad off, its BatchNorm layers in eval mode, no gradient (so no optimizer state and no
    weight decay) and no allreduce, because DDP is built over the trainable parameters only. When a stage
    unfreezes, the DDP wrapper is built again at that epoch. The optimizer holds every parameter from the
    start, in groups per unit, so its layout is the same in every stage and a checkpoint from any stage
    loads into a run at any other.
    """

    def __init__(self, cfg: TrainConfig, *, device: torch.device, rank: int, world: int, train_set, val_set,
                 source=None, devices: Optional[Sequence[torch.device]] = None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.devices = list(devices) if devices else [device]  # the worker's GPUs, for --model-parallel
        self.train_set, self.val_set = train_set, val_set
        self.augment = input_pipeline(cfg, device, seed=cfg.seed * 1000 + rank)

        # ---- model (identical initial weights on every rank: the caller seeded torch)
        net = build_model(cfg.model, num_classes=cfg.num_classes(), grey_input=cfg.grey_input, source=source,
                          model_args=cfg.model_args)
        if cfg.sync_batchnorm and world > 1:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        self.channels_last = uses_channels_last(cfg, device)
        self.net = net.to(device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        # --model-parallel K: the model's own modules in K stages on this worker's K devices; self.net stays
        # the whole model (its state dict, checkpoints and optimizer are the unsplit model's).
        self.pipeline: Optional[Pipeline] = self._split_model() if cfg.model_parallel > 1 else None
        self.output_device = self.pipeline.output_device if self.pipeline else device  # where the logits are
        self.compiled: nn.Module = torch.compile(self.net) if cfg.compile else (self.pipeline or self.net)
        self.transfer = cfg.starts_pretrained()
        if self.transfer:
            self.units = transfer_units(self.net, new_stem=cfg.grey_input == "reinit")
        else:  # from scratch: one unit, every parameter at the one LR
            self.units = [Unit("all", list(self.net.parameters()), new=True)]
        self.backbone_units = sum(not u.new for u in self.units)
        self.model: nn.Module = self.compiled  # what trains: the DDP wrapper when world > 1
        self.stage: Optional[int] = None  # backbone units training now; set by enter_epoch

        # ---- optimizer and schedule (linear scaling rule: LR given per 256 images)
        # An elastic run steps through each epoch in global batches (raydist.elastic), from `position`.
        self.layout = batch_layout(cfg, world)
        self.elastic = cfg.is_elastic()
        self.position = 0  # images of the current epoch already trained on (a mid-epoch checkpoint's)
        self.carried: Optional[list] = None  # that part of the epoch's train sums: loss, correct, count, lr, updates
        if self.elastic:
            self.updates_per_epoch = steps_in_epoch(len(train_set), self.layout.global_batch, min_tail(cfg))
        else:
            steps = steps_per_epoch(len(train_set), batch_size=cfg.batch_size, world_size=world)
            self.updates_per_epoch = math.ceil(steps / cfg.grad_accum)
        peak_lr = cfg.lr * lr_scale(cfg, self.layout.global_batch)
        self.optimizer = self._build_optimizer(peak_lr)
        warmup = round(cfg.warmup_epochs * self.updates_per_epoch)
        total = (cfg.schedule_epochs or cfg.epochs) * self.updates_per_epoch  # a study under ASHA spans its budget
        step_every = cfg.lr_step_epochs * self.updates_per_epoch
        milestones = [epoch * self.updates_per_epoch for epoch in cfg.milestone_list()]
        warmup_start = single_worker_share(cfg, self.layout) if cfg.warmup_from == "single_worker" else 0.0
        # lp-ft: the probe and the fine-tuning each get a schedule of their own (warmup, then decay), as
        # fastai's fine_tune does; else the backbone would start training late in an already decayed one.
        restart = cfg.freeze_epochs * self.updates_per_epoch if self.transfer and cfg.finetune == "lp-ft" else 0

        def lr_at(update: int) -> float:
            start, span = (restart, total - restart) if restart and update >= restart else (0, restart or total)
            return peak_lr * lr_factor(update - start, warmup=min(warmup, span), total=span, schedule=cfg.lr_schedule,
                                       step_every=step_every, gamma=cfg.lr_step_gamma, milestones=milestones,
                                       warmup_start=warmup_start)

        self.schedule = Schedule(lr_at)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.early_stop = EarlyStop(cfg.target_accuracy, cfg.patience)
        self.epoch = 0  # epochs done
        self.images_before = 0  # training images the finished epochs trained on (all ranks, as trained)
        self.first_train_loss: Optional[float] = None  # what divergence is measured against
        self.first_step_unix: Optional[float] = None
        self._place_schedule()

    # ---- building blocks

    def _split_model(self) -> Pipeline:
        """The model in cfg.model_parallel stages balanced by parameter count or by the forward+backward time
        of each unit, measured here on a micro-batch of this run's input shape."""
        cfg, device = self.cfg, self.device
        units = pipeline_units(self.net)
        sample = None
        if cfg.pipeline_balance == "time":
            side = input_side(cfg)
            generator = torch.Generator(device=device).manual_seed(0)
            sample = torch.randn(math.ceil(cfg.batch_size / cfg.micro_batches), cfg.input_channels(), side, side,
                                 device=device, generator=generator)
            if self.channels_last:
                sample = sample.contiguous(memory_format=torch.channels_last)
        costs = torch.tensor(unit_costs(units, balance=cfg.pipeline_balance, sample=sample,
                                        autocast_dtype=autocast_dtype(cfg.precision, device)),
                             dtype=torch.float64, device=device)
        if self.world > 1:  # measured times differ from rank to rank; DDP needs every rank to cut the model alike
            dist.broadcast(costs, src=0)
        try:
            devices = stage_devices(device, cfg.model_parallel, held=self.devices)
        except ValueError as exc:  # fewer GPUs visible than stages: the user's setting, said in one line
            raise WorkerInputError(str(exc)) from None
        return Pipeline(units, costs=costs.tolist(), devices=devices, micro_batches=cfg.micro_batches)

    def _build_optimizer(self, peak_lr: float) -> torch.optim.Optimizer:
        # No weight decay on BatchNorm and bias parameters: decaying them only hurts (Goyal et al. 2017).
        # Two groups per unit; a unit's LR multiplier is 1 for the new head, backbone_lr_mult for the rest.
        groups = []
        for unit in self.units:
            for decay in (True, False):
                params = [p for p in unit.params if (p.ndim > 1) == decay]
                if params:
                    groups.append({"params": params, "unit": unit.name, "decay": decay})
        self._group_mults = [1.0 if self._unit(g["unit"]).new else backbone_lr_mult(self.cfg) for g in groups]
        cfg = self.cfg
        fused = self._fused()
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(cfg.momentum, 0.999), fused=fused)
        else:
            optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum,
                                        nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
        self._apply_hyperparameters(optimizer)
        return optimizer

    def _fused(self) -> Optional[bool]:
        # On a GPU the fused kernels update every parameter in a few launches instead of several per tensor.
        return True if self.device.type == "cuda" else None

    def _unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    def _apply_hyperparameters(self, optimizer: torch.optim.Optimizer) -> None:
        """This run's weight decay, momentum and LR multipliers in every group (groups loaded from a
        checkpoint carry the old run's; the LR itself is set by the Schedule)."""
        cfg = self.cfg
        fused = self._fused()  # a checkpoint saved on another device says otherwise
        for group, mult in zip(optimizer.param_groups, self._group_mults):
            group["lr_mult"] = mult
            group["fused"] = fused
            group["weight_decay"] = cfg.weight_decay if group["params"][0].ndim > 1 else 0.0
            if cfg.optimizer == "adamw":
                group["betas"] = (cfg.momentum, group["betas"][1])
            else:
                group["momentum"], group["nesterov"] = cfg.momentum, cfg.nesterov and cfg.momentum > 0

    def _place_schedule(self) -> None:
        # The point of training reached is `epoch` epochs plus `position` images of the next: the schedule
        # continues there in this run's own updates, whatever batch size or worker count it has.
        self.schedule.update = self.epoch * self.updates_per_epoch + self.steps_done()
        self.schedule.apply(self.optimizer)  # then each update's step() sets the next one's LR

    def steps_done(self) -> int:
        """The optimizer steps of epoch `epoch` that its `position` (images consumed) has taken, in the
        epoch's own steps (raydist.parallel.elastic.step_ends: the last one may hold the folded tail). A position is
        only ever inside an epoch walked in global batches (epoch_plan), elastic or resumed; else it is 0."""
        return update_at(0, self.position, num_items=len(self.train_set), global_batch=self.layout.global_batch,
                         tail=min_tail(self.cfg))

    def with_carried(self, sums: list) -> list:
        """This attempt's epoch sums (loss, correct, count over all ranks; LR sum, updates) plus the part of
        the epoch a mid-epoch checkpoint carried in."""
        return [a + b for a, b in zip(sums, self.carried)] if self.carried else sums

    def images_seen(self) -> int:
        """Training images trained on so far, all ranks: what the finished epochs trained (a fixed group
        drops each rank's last partial batch and pads the shares, so not always the training set's size)
        and the images of the current epoch a mid-epoch position has consumed."""
        return self.images_before + self.position

    def enter_epoch(self, epoch: int) -> Optional[str]:
        """Freeze or unfreeze for `epoch` (0-based); when the trainable set changes, wrap the model in DDP
        again over it. Returns a line saying what changed, or None."""
        cfg = self.cfg
        stage = unfrozen_stages(cfg.finetune if self.transfer else "full", epoch, stages=self.backbone_units,
                                unfreeze_every=cfg.unfreeze_every, freeze_epochs=cfg.freeze_epochs)
        if stage == self.stage:
            return None
        first = self.stage is None
        self.stage = stage
        set_trainable(self.units, stage)
        if self.world > 1:
            # DDP registers its allreduce hooks for the parameters that require grad when it wraps the
            # model: a new trainable set needs a new wrapper (the old one's hooks go with it).
            self.model = None
            gc.collect()
            # broadcast_buffers=False: DDP would otherwise send rank 0's BatchNorm statistics to every rank
            # before each forward. Rank 0's own statistics come out the same either way (each rank's are
            # overwritten, then updated from its own batch), and they are what is evaluated and saved
            # (evaluate() broadcasts them once per epoch), so that traffic buys nothing.
            # device_ids names the one device of a one-device model; a split model (on several) and a CPU
            # model take None.
            one_gpu = self.device.type == "cuda" and self.pipeline is None
            self.model = DDP(self.compiled, device_ids=[self.device.index] if one_gpu else None,
                             **NO_FORWARD_BUFFER_SYNC)
            if cfg.fp16_allreduce:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                # fp16 only when the loss is scaled (--precision fp16): unscaled gradients (fp32, bf16
                # autocast) have values below fp16's smallest, which bf16, with fp32's range, keeps.
                hook = (default_hooks.fp16_compress_hook if self.amp_dtype is torch.float16
                        else default_hooks.bf16_compress_hook)
                self.model.register_comm_hook(state=None, hook=hook)
        if not self.transfer or (first and stage == self.backbone_units):
            return None
        count = self.trainable_params()
        mult = backbone_lr_mult(cfg)
        at = f"; the backbone at {mult:g}x the head's LR" if mult != 1 and stage else ""
        if stage == self.backbone_units:
            return f"epoch {epoch + 1}: every layer trains ({count:,} parameters{at})"
        training = [u.name for u in self.units if u.new] + [u.name for u in self.units if not u.new][:stage]
        return f"epoch {epoch + 1}: training {', '.join(training)} ({count:,} parameters{at}; the rest frozen)"

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    # ---- the epoch

    def epoch_plan(self) -> list[Step]:
        """This rank's optimizer steps for the rest of epoch `self.epoch`. A fixed group walks its shard in
        per-worker batches (shard_indices); an elastic one, or any run resumed mid-epoch, walks the epoch's
        order in global batches from `position` (raydist.elastic)."""
        cfg = self.cfg
        if self.elastic or self.position:
            order = epoch_order(len(self.train_set), seed=cfg.seed, epoch=self.epoch, device=self.device)
            # min_tail for a fixed group too: one resumed from an elastic run's mid-epoch checkpoint must not
            # end its epoch in a 1-image micro-batch either
            return list(epoch_steps(order, start=self.position, layout=self.layout, rank=self.rank,
                                    tail=min_tail(cfg)))
        batches = list(shard_indices(len(self.train_set), batch_size=cfg.batch_size, rank=self.rank,
                                     world_size=self.world, epoch=self.epoch, seed=cfg.seed, device=self.device))
        groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        return [Step(end=0, images=0, micro_batches=group, weights=[1 / len(group)] * len(group)) for group in groups]

    def train_epoch(self, progress_every_s: float = 0.0,
                    after_step: Optional[Callable[["Step", "EpochSums"], None]] = None) -> EpochSums:
        """The rest of this rank's share of epoch `self.epoch`; a progress line every `progress_every_s`
        seconds once the epoch has run 5 s (0: none). `after_step(step, sums)` runs after every optimizer
        step of an elastic run, with `position` already at the step's end (spot notices, mid-epoch checkpoints)."""
        from raydist.output.console import EpochProgress

        cfg, device, model = self.cfg, self.device, self.model
        t0 = time.perf_counter()
        model.train()
        freeze_norms(self.units, self.stage)  # frozen units keep their pretrained BatchNorm statistics
        sums = EpochSums(*(torch.zeros((), device=self.output_device, dtype=torch.float64) for _ in range(3)))
        plan = self.epoch_plan()
        micro = [(i, j) for i, step in enumerate(plan) for j in range(len(step.micro_batches))]
        progress = EpochProgress(epoch=self.epoch + 1, epochs=cfg.epochs, steps=len(micro),
                                 images_per_step=self.layout.global_batch / self.layout.accumulation,
                                 every_s=progress_every_s)
        pairs = data_batches(self.train_set, [b for step in plan for b in step.micro_batches], train=True,
                             shuffle_seed=cfg.seed * 100_003 + self.epoch)
        trace = image_trace(self)
        # The batches drive the loop (not zip, which would stop short of a streamed source's end: its
        # generator says what the epoch decoded only once it is drained).
        for k, (images, labels) in enumerate(pairs):
            progress.step(k)  # a clock read; nothing on the device
            i, j = micro[k]
            step = plan[i]
            x = self.augment(images, train=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            update_now = j + 1 == len(step.micro_batches)
            # Accumulating steps skip DDP's allreduce (Horovod's batches-per-allreduce).
            no_sync = model.no_sync() if (isinstance(model, DDP) and not update_now) else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = model(x)
                    labels = labels.to(self.output_device)  # a split model's logits are on its last device
                    loss = self.criterion(logits, labels)
                self.scaler.scale(loss * step.weights[j]).backward()
            if step.weights[j]:  # a weight-0 image (a rank with none in a short last step) is not counted
                # Accumulate on the device: no host sync per step.
                sums.loss += loss.detach().double() * len(labels)
                sums.correct += (logits.detach().argmax(1) == labels).sum()
                sums.count += len(labels)
                if trace:
                    trace.write(self, step, step.micro_batches[j])
            if update_now:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                sums.lr_sum += self.optimizer.param_groups[0]["lr"]
                sums.updates += 1
                self.schedule.step(self.optimizer)
                if self.elastic or self.position:
                    self.position = step.end
                    if after_step is not None:
                        after_step(step, sums)
            if self.first_step_unix is None:
                self.first_step_unix = time.time()
        self.position = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sums.seconds = time.perf_counter() - t0
        return sums

    @torch.no_grad()
    def evaluate(self) -> EpochSums:
        """This rank's share of the validation set, evaluated with the weights and statistics that are saved."""
        if self.world > 1:
            # Each rank's last training forward updated its own BatchNorm statistics; evaluate every shard
            # with rank 0's, which are the ones saved, so the reported metric is the saved model's.
            for buffer in self.net.buffers():
                dist.broadcast(buffer, src=0)
        return evaluate_model(self.compiled, self.val_set, self.cfg, device=self.device, rank=self.rank,
                              world=self.world, augment=self.augment)

    # ---- saving and resuming

    def state_dict(self, metrics: Optional[dict] = None, epoch_sums: Optional[list] = None) -> dict:
        """Everything a resumed run needs (the checkpoint file's content). `epoch_sums`: inside an epoch, its
        train sums so far over all ranks (loss, correct, count, LR sum, updates)."""
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "early_stop_hits": self.early_stop.hits,
                "stage": self.stage, "first_train_loss": self.first_train_loss, "config": self.cfg.to_dict(),
                "class_names": self.cfg.class_names(), "world_size": self.world,
                # inside an epoch (a spot notice's checkpoint): the images of epoch `epoch` already trained on,
                # the epoch's train sums so far (all ranks'), and how many images an epoch has
                "position": self.position, "epoch_sums": epoch_sums if self.position else None,
                "epoch_images": len(self.train_set),
                "metrics": metrics}

    def load_state_dict(self, state: dict) -> None:
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(self.optimizer.param_groups):
            # A --pretrained checkpoint saved before raydist kept a group pair per unit has one pair in all.
            raise WorkerInputError(
                f"the checkpoint's optimizer has {saved_groups} parameter groups, this run's "
                f"{len(self.optimizer.param_groups)} (units: {', '.join(u.name for u in self.units)}); it was saved "
                f"by an earlier raydist: start a new run from its weights with --weights <its checkpoint.pt>")
        self.net.load_state_dict(state["model"])
        # keeps the momentum buffers ...
        self.optimizer.load_state_dict(with_fused_flag(state["optimizer"], self._fused()))
        self._apply_hyperparameters(self.optimizer)  # ... but this run's decay, momentum and LR multipliers
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.early_stop.hits = state["epoch"], state.get("early_stop_hits", 0)
        self.first_train_loss = state.get("first_train_loss")
        self.position = int(state.get("position") or 0)
        seen = (state.get("metrics") or {}).get("images_seen")  # a checkpoint before it was saved: epochs x set
        self.images_before = int(seen) - self.position if seen is not None else self.epoch * len(self.train_set)
        if self.position and state.get("epoch_images") != len(self.train_set):
            raise WorkerInputError(f"the checkpoint stopped inside epoch {self.epoch + 1} of a training set of "
                                   f"{state.get('epoch_images')} images; this run's has {len(self.train_set)}: "
                                   f"resume it on the same data")
        self.carried = state.get("epoch_sums") if self.position else None
        self._place_schedule()


def with_fused_flag(optimizer_state: dict, fused: Optional[bool]) -> dict:
    """A saved optimizer state whose groups say this run's `fused`. PyTorch's load_state_dict places each
    Adam `step` by the *saved* groups' flag: a checkpoint written on CPUs (not fused) would leave the steps
    on the CPU for a fused GPU optimizer, whose first update then fails on the device mismatch."""
    groups = [{**group, "fused": fused} for group in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}


def run(cfg: TrainConfig, ctx: WorkerContext) -> list[dict]:
    """Train according to `cfg` on this worker; return the metrics reported each epoch. Running out of
    memory is OutOfMemory, one line naming the model, the batch and the device's memory."""
    from raydist.errors import TooManyBadImages

    try:
        return _run(cfg, ctx)
    except TooManyBadImages as exc:  # met while streaming a folder: the run's one-line cause
        raise DataUnavailable(str(exc)) from exc
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(out_of_memory_message(cfg, ctx.device, ctx.world_size)) from exc
    finally:
        if ctx.publish_logs and ctx.log_dir:  # a local copy of events that are in the run folder now
            shutil.rmtree(ctx.log_dir, ignore_errors=True)


def _run(cfg: TrainConfig, ctx: WorkerContext) -> list[dict]:
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # one thread pool per worker, sized to its share
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN times its kernels once and keeps the best
        # TF32 matmuls and convolutions where fp32 runs, except when fp32 itself is asked for (--precision fp32).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision != "fp32"
    train_set, val_set = load_data_once_per_node(cfg, device=device, rank=rank, world=world, node_id=ctx.node_id)
    # A resumed run takes every weight from its checkpoint: the pretrained source is not needed again.
    source = load_source(cfg, node_id=ctx.node_id) if ctx.resume_state is None else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        state = TrainingState(cfg, device=device, rank=rank, world=world, train_set=train_set, val_set=val_set,
                              devices=ctx.devices,
                              source=source)
    except WeightsError as exc:  # a file the driver could not see (a cluster joined with --address) that does not fit
        raise WorkerInputError(f"{exc} (on node {ctx.node_id})") from None
    if ctx.resume_state is not None:
        state.load_state_dict(ctx.resume_state)

    if rank == 0 and state.pipeline is not None:
        print(state.pipeline.describe(cfg.pipeline_balance), flush=True)
    if rank == 0 and cfg.compile and cfg.sync_batchnorm and world > 1:
        print("note: --sync-batchnorm with --compile: every SyncBatchNorm layer's collective splits the compiled "
              "graph, so compile gains less than it does with plain BatchNorm", flush=True)
    writer = _tensorboard(ctx.log_dir) if rank == 0 and ctx.log_dir else None
    # W&B's files sit beside TensorBoard's events, so a run in remote storage publishes both after each epoch.
    wandb_run = WandbRun.start(cfg.to_dict(), folder=ctx.log_dir, run_name=cfg.name or "raydist",
                               project=cfg.wandb_project,
                               run_id=cfg.wandb_id or wandb_run_id(f"{cfg.storage_path}/{cfg.name}")
                               ) if writer and cfg.wandb else None
    try:  # closed however the loop ends (Tune stops a trial inside its report; a reused process goes on)
        history = _train_epochs(cfg, ctx, state, writer, wandb_run)
    finally:
        if writer:
            writer.close()
        if wandb_run:
            wandb_run.finish()
    if rank == 0 and not (history and history[-1]["stop_reason"] == DIVERGED):
        ctx.write_file(FINAL_MODEL_FILE, final_model_bytes(state.net.state_dict(), cfg.to_dict(),
                                                           history[-1] if history else None))
    return history


def _train_epochs(cfg: TrainConfig, ctx: WorkerContext, state: TrainingState, writer, wandb_run=None) -> list[dict]:
    """The epochs from `state.epoch` on: train, evaluate, sum the metrics over all ranks, report (every
    rank), checkpoint (rank 0), stop on divergence or at the target accuracy. Returns the reported metrics."""
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    history: list[dict] = []
    checkpoint_hinted = False  # the checkpoint-cost hint is said once
    spot = SpotWatch(cfg, ctx, state) if state.elastic else None
    if spot and rank == 0 and ctx.epoch_lines:
        print(resize_line(ctx.resume_state, state), flush=True)
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        change = state.enter_epoch(epoch)
        if change and rank == 0 and ctx.epoch_lines:
            print(change, flush=True)
        seed_epoch(cfg.seed, epoch, rank, state.augment, position=state.position)
        state._place_schedule()  # the same place as after the last epoch, unless a resume moved it
        try:
            train = state.train_epoch(progress_every_s=ctx.progress_every_s if rank == 0 else 0.0,
                                      after_step=spot.after_step if spot else None)
            if spot:
                spot.at_epoch_end(train)  # a notice that came late in the epoch: its checkpoint is this epoch's
            val = state.evaluate()
            totals = torch.stack([train.loss, train.correct, train.count, val.loss, val.correct, val.count,
                                  torch.tensor(train.seconds, device=train.loss.device, dtype=torch.float64)]).double()
            if world > 1:
                dist.all_reduce(totals)
        except RuntimeError as exc:
            if spot and spot.notice and world > 1 and not is_out_of_memory(exc):
                spot.wait_for_restart(exc)  # the reclaimed node's workers are gone: Ray Train restarts the group
            raise
        t_loss, t_correct, t_count, v_loss, v_correct, v_count, time_sum = totals.tolist()
        images_per_s = t_count / (time_sum / world)  # global images over the mean rank's training time
        # with the part of this epoch trained before a resize or a reclaim
        t_loss, t_correct, t_count, lr_sum, updates = state.with_carried(
            [t_loss, t_correct, t_count, train.lr_sum, train.updates])
        state.carried = None
        metrics = {
            "epoch": epoch + 1,
            "train_loss": t_loss / t_count, "train_acc": t_correct / t_count,
            "val_loss": v_loss / v_count, "val_acc": v_correct / v_count,
            "lr": lr_sum / max(updates, 1),  # the mean LR of this epoch's updates (the head's)
            "epoch_time_s": time.perf_counter() - t0,
            "images_per_s": images_per_s,
            "first_step_unix": state.first_step_unix or float("nan"),
            "world_size": world,
            "global_batch": state.layout.global_batch,
            "images_seen": state.images_before + round(t_count),  # what this epoch trained, not the set's size
            "trainable_params": state.trainable_params(),
            "stop_reason": "",
            "divergence": "",  # why the run diverged, when it did
        }
        state.epoch = epoch + 1
        state.images_before = metrics["images_seen"]
        metrics["divergence"] = divergence(metrics, first_train_loss=state.first_train_loss,
                                           num_classes=cfg.num_classes())
        if state.first_train_loss is None and not metrics["divergence"]:
            state.first_train_loss = metrics["train_loss"]
        if metrics["divergence"]:
            metrics["stop_reason"] = DIVERGED
        elif state.early_stop.update(metrics["val_acc"]):
            metrics["stop_reason"] = "target_accuracy"
        last = epoch + 1 == cfg.epochs or bool(metrics["stop_reason"])
        save = last or (cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0) or bool(
            spot and spot.notice)  # a node is being reclaimed: this epoch's checkpoint is the one to resume from

        if rank == 0:
            if ctx.epoch_lines:
                print(_epoch_line(metrics, cfg.epochs), flush=True)
            if writer:
                for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "epoch_time_s"):
                    writer.add_scalar(key, metrics[key], epoch + 1)
                writer.flush()
                if wandb_run:
                    wandb_run.log(metrics)
                if ctx.publish_logs:
                    ctx.publish_logs()
        if save and metrics["stop_reason"] != DIVERGED:  # a diverged model is not worth keeping
            save_s = _report_with_checkpoint(ctx, metrics, state.state_dict(metrics) if rank == 0 else None)
            hint = checkpoint_hint(save_s, metrics["epoch_time_s"], cfg.checkpoint_every or 1)
            if rank == 0 and hint and not checkpoint_hinted:
                print(hint, flush=True)
                checkpoint_hinted = True
        else:
            ctx.report(metrics, None)
        history.append(metrics)
        if metrics["stop_reason"]:
            if rank == 0 and ctx.epoch_lines:
                print(_stop_message(metrics, cfg), flush=True)
            break
    return history


def load_source(cfg: TrainConfig, *, node_id: str):
    """The pretrained weights a run starts from (None from scratch), read on this worker's node; missing
    weights are the run's one-line cause, naming the node."""
    if not cfg.starts_pretrained():
        return None
    try:
        if cfg.weights:
            return read_weights_file(cfg.weights)
        try:
            lock = download_lock(torch.hub.get_dir())  # the node's ranks download once, into one cache
        except OSError:  # a read-only cache: nothing will be downloaded into it anyway
            lock = contextlib.nullcontext()
        with lock:
            return pretrained_source(cfg.model, where=f" of node {node_id}")
    except WeightsError as exc:
        raise WorkerInputError(f"{exc} (on node {node_id})" if cfg.weights else str(exc)) from None


def load_data_once_per_node(cfg: TrainConfig, *, device, rank: int, world: int, node_id: str):
    """Both splits on this rank's device. The first rank of each node loads them first (downloading them
    once per node with --download), so a data set missing on a node is found there, once, and every rank
    raises the same one-line error naming each node that lacks it, instead of N tracebacks."""
    spec = DATASETS[cfg.dataset]
    options = dict(data_dir=cfg.data_dir, download=cfg.download, val_fraction=cfg.val_fraction,
                   fake_image_size=cfg.fake_image_size, fake_num_classes=cfg.fake_num_classes,
                   fake_train_size=cfg.fake_train_size, fake_val_size=cfg.fake_val_size,
                   classes=cfg.class_list(), train_fraction=cfg.train_fraction, train_per_class=cfg.train_per_class,
                   channels=cfg.input_channels(), input_size=cfg.input_size, max_bad_images=cfg.max_bad_images)

    def load(log=None):
        if streamed:
            return stream_splits(cfg, device=device, log=log, rank=rank)
        with download_lock(cfg.data_dir) if (cfg.download and spec.needs_files) else contextlib.nullcontext():
            return load_splits(cfg.dataset, ("train", "val"), device=device, log=log, **options)

    streamed = False
    if not spec.needs_files:  # embedded or generated: nothing to find on the node
        return load()
    nodes = [node_id]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node_id)
    if cfg.dataset == "folder":
        # One choice for the whole group: a folder held in memory leaves out the files that do not decode,
        # a streamed one tops up their holes, so the two could count different steps per epoch.
        streamed = streams_folder(cfg, workers_here=nodes.count(node_id))
        if world > 1:
            choices = [None] * world
            dist.all_gather_object(choices, streamed)
            streamed = any(choices)
    splits, problem, user_side = None, "", True
    if nodes.index(node_id) == rank:  # this node's first rank
        try:
            splits = load(log=lambda line: print(f"data: {line}", flush=True) if rank == 0 else None)
            print(f"data: {cfg.dataset} ready in {os.path.expanduser(cfg.data_dir)} on node {node_id}", flush=True)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below, whatever failed
            from raydist.errors import FolderError

            # missing, a download that failed, an image folder this node cannot use
            user_side = isinstance(exc, (DatasetNotFound, OSError, FolderError))
            text = str(exc).splitlines()[0] if str(exc) else ""
            problem = text if user_side else f"{type(exc).__name__} while loading {cfg.dataset}: {text}"
    outcomes = [(node_id, problem, user_side)]
    if world > 1:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, (node_id, problem, user_side))
    failed = sorted({outcome for outcome in outcomes if outcome[1]})
    if failed:
        message = "; ".join(f"on node {node}: {why}" for node, why, _ in failed)
        # Data missing, damaged or not downloadable on a node (raydist.data_files' errors are OSErrors) is the
        # run's one-line cause; anything else (out of memory, a bug) is raised as an error of the program,
        # still named per node, by every rank alike.
        raise (DataUnavailable if all(user for _, _, user in failed) else RuntimeError)(message)
    return splits or load()


def folder_copy_bytes(cfg: TrainConfig) -> int:
    """What one worker holds of cfg's image folder decoded, on the memory path."""
    from raydist.data.sources import folder_index
    from raydist.data.folder import decoded_bytes, stored_size

    return decoded_bytes(folder_index(cfg.data_dir, cfg.val_fraction), stored_size(input_side(cfg)))


def streams_folder(cfg: TrainConfig, *, workers_here: int, memory_bytes: Optional[int] = None) -> bool:
    """Whether a machine (of `memory_bytes`, default this one) streams the image folder (raydist.folder_stream)
    rather than hold it decoded: asked for, or auto's choice when the copies of its `workers_here` workers
    would not fit in half its memory. The one rule for the workers, the checks before Ray and a study's plan."""
    if cfg.data_loader != "auto":
        return cfg.data_loader == "stream"
    from raydist.data.folder import fits_in_memory

    return not fits_in_memory(folder_copy_bytes(cfg), workers_here, memory_bytes)


def stream_splits(cfg: TrainConfig, *, device, log=None, rank: int = 0):
    """The image folder's train and val splits as Ray Data streams (raydist.ray_edge.stream.StreamSource)."""
    from raydist.data.sources import folder_index
    from raydist.ray_edge.stream import StreamSource
    from raydist.data.folder import bad_image_limit, stored_size

    if cfg.classes or cfg.train_fraction != 1.0 or cfg.train_per_class:
        raise DataUnavailable("--classes, --train-fraction and --train-per-class select images of a folder held in "
                              "memory; the streamed path reads the whole folder (use --data-loader memory)")
    index = folder_index(cfg.data_dir, cfg.val_fraction)
    max_bad = bad_image_limit(index, cfg.max_bad_images)
    if log is not None:
        log(f"streaming {len(index.splits['train'])} training and {len(index.splits['val'])} validation images "
            f"through Ray Data")
    return tuple(StreamSource(index, split, stored=stored_size(input_side(cfg)), device=device, max_bad=max_bad,
                              rank=rank) for split in ("train", "val"))


def data_batches(source, index_batches, *, train: bool, shuffle_seed: Optional[int] = None):
    """(images, labels) for each batch of indices: indexed on the device, or read from a Ray Data stream."""
    if getattr(source, "streamed", False):
        return source.batches(index_batches, train=train, shuffle_seed=shuffle_seed)
    return (source.batch(indices) for indices in index_batches)


def _report_with_checkpoint(ctx: WorkerContext, metrics: dict, state: Optional[dict]) -> float:
    """Report `metrics` with a checkpoint of `state` (rank 0; the other ranks pass None). The report owns
    the local folder and removes it once the checkpoint is stored (Ray Train: after its background upload;
    a one-worker trial: copied into storage before the report returns). Returns the seconds the checkpoint
    held training up: serialising and writing it, plus a synchronous copy into storage (not the time the
    report may wait for Tune)."""
    if state is None:  # ranks other than 0 report metrics only
        ctx.report(metrics, None)
        return 0.0
    t0 = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="raydist-ckpt-")
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
    seconds = time.perf_counter() - t0
    stored_s = ctx.report(metrics, folder)
    return seconds + (stored_s if isinstance(stored_s, (int, float)) else 0.0)


# ---- spot notices and resizes (elastic runs) -----------------------------------------------------------


class SpotWatch:
    """An elastic run's spot notices. Every rank asks (ctx.preemption_info, a barrier in Ray Train) every
    K optimizer steps and at each epoch end. On a notice every rank writes a just-in-time checkpoint at that
    step boundary, reports it, and trains on; while the notice lasts each later check writes a newer one, so
    a reclaim repeats at most K steps. Ray Train then restarts the group without the reclaimed node, from
    the latest checkpoint, on its own budget (FailureConfig.max_preemption_failures).

    K (--preemption-check-every 0, the default) is chosen after timing FIRST_CHECK_AFTER steps and one check,
    so that the checks cost under 1% of the training time; every rank agrees on the slowest rank's figures."""

    def __init__(self, cfg: TrainConfig, ctx: WorkerContext, state: "TrainingState"):
        self.cfg, self.ctx, self.state = cfg, ctx, state
        self.every = cfg.preemption_check_every
        self.steps = 0  # since the last check (or since timing started)
        self.timing_from: Optional[float] = None
        self.notice: Optional[dict] = None
        self.checkpoints = 0  # just-in-time checkpoints written for the current notice
        self.check_s: list[float] = []  # how long each check took (for the record)

    def _check(self) -> Optional[dict]:
        if self.ctx.preemption_info is None:
            return None
        t0 = time.perf_counter()
        info = self.ctx.preemption_info()
        self.check_s.append(time.perf_counter() - t0)
        return info

    def after_step(self, step: Step, sums: EpochSums) -> None:
        if self.ctx.preemption_info is None:  # one process, no Ray: nothing reclaims it
            return
        if self.every == 0:  # automatic: time some steps and one check, then choose K
            if self.timing_from is None:
                self.timing_from, self.steps = time.perf_counter(), 0
                return
            self.steps += 1
            if self.steps < FIRST_CHECK_AFTER:
                return
            step_s = (time.perf_counter() - self.timing_from) / self.steps
            info = self._check()
            self.every = self._agree(self.check_s[-1], step_s)
            self.steps = 0
            self._on(info, sums)
            return
        self.steps += 1
        if self.steps >= self.every:
            self.steps = 0
            self._on(self._check(), sums)

    def at_epoch_end(self, sums: EpochSums) -> None:
        info = self._check()
        if info is None:
            self.notice, self.checkpoints = None, 0
        elif self.notice is None:
            self.notice = info  # the epoch's own checkpoint, written next, is the just-in-time one
            self._say(info, f"checkpoint at the end of epoch {self.state.epoch + 1}")

    def _agree(self, check_s: float, step_s: float) -> int:
        every = check_every(check_s, step_s)
        if self.state.world > 1:  # every rank must check at the same steps: the slowest rank's cadence
            figures = torch.tensor([check_s, step_s], dtype=torch.float64, device=self.state.device)
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
            check_s, step_s = figures.tolist()
            every = check_every(check_s, step_s)
        if self.state.rank == 0 and self.ctx.epoch_lines:
            print(f"spot notices: checked every {every} step(s) (a check takes {check_s * 1000:.1f} ms, a step "
                  f"{step_s * 1000:.1f} ms)", flush=True)
        return every

    def _on(self, info: Optional[dict], sums: EpochSums) -> None:
        if info is None:
            self.notice, self.checkpoints = None, 0
            return
        t0 = time.perf_counter()
        state, ctx = self.state, self.ctx
        totals = torch.stack([sums.loss, sums.correct, sums.count]).double()
        if state.world > 1:
            dist.all_reduce(totals)
        loss, correct, count, lr_sum, updates = state.with_carried([*totals.tolist(), sums.lr_sum, sums.updates])
        nan = float("nan")
        metrics = {"epoch": state.epoch, "position": state.position, "images_seen": state.images_seen(),
                   "partial_epoch": True, "world_size": state.world, "global_batch": state.layout.global_batch,
                   "train_loss": loss / max(count, 1), "train_acc": correct / max(count, 1),
                   "val_loss": nan, "val_acc": nan, "lr": lr_sum / max(updates, 1), "stop_reason": "",
                   self.cfg.keep_by: nan}  # never ranked above an epoch's checkpoint; kept while the latest
        checkpoint = state.state_dict(metrics, epoch_sums=[loss, correct, count, lr_sum, updates]) \
            if state.rank == 0 else None
        _report_with_checkpoint(ctx, metrics, checkpoint)
        self.checkpoints += 1
        if self.notice is None:
            self.notice = info
            self._say(info, f"checkpoint at epoch {state.epoch + 1}, step {state.steps_done()}/"
                            f"{state.updates_per_epoch} "
                            f"written in {time.perf_counter() - t0:.1f} s")

    def wait_for_restart(self, exc: BaseException) -> None:
        """After a notice, a collective that fails (the reclaimed node's workers went, and gloo or NCCL says
        so) is the reclaim, not a fault: raising it would make Ray Train count a failure against
        --max-failures. This rank waits instead, while Ray Train sees the reclaimed workers die and, at the
        notice's deadline, restarts the group from the latest checkpoint on its preemption budget."""
        if self.state.rank == 0 or self.state.rank in self.notice.get("ranks", []):
            print(f"rank {self.state.rank}: the group lost contact after the spot notice "
                  f"({str(exc).splitlines()[0][:120]}); waiting for Ray Train to restart it", flush=True)
        deadline = self.notice.get("deadline_unix") or time.time() + 120
        while time.time() < deadline + 300:  # Ray Train tears the group down at the deadline
            time.sleep(1.0)

    def _say(self, info: dict, what: str) -> None:
        if self.state.rank != 0 or not self.ctx.epoch_lines:
            return
        nodes = ", ".join(address for _, address in info["nodes"])
        left = (f", {max(0.0, info['deadline_unix'] - time.time()):.0f} s left"
                if info.get("deadline_unix") else "")
        print(f"node {nodes} reclaimed (spot notice{left}; ranks {', '.join(map(str, info['ranks']))}): {what}; "
              f"training on until Ray Train restarts without it", flush=True)


def resize_line(resumed: Optional[dict], state: "TrainingState") -> str:
    """What an elastic run says when its group (re)starts: the workers it trains on, where in the run, and
    the batch layout, e.g. "2 worker(s) joined: continuing on 4 workers at epoch 5, step 0/23; ..."."""
    where = (f"at epoch {state.epoch + 1}, step {state.steps_done()}/"
             f"{state.updates_per_epoch}")
    before = (resumed or {}).get("world_size")
    if before is None or before == state.world:
        head = f"elastic: training on {state.world} worker(s) {where}" if resumed else \
            f"elastic: starting on {state.world} worker(s) (between {state.cfg.fewest_workers()} and {state.cfg.num_workers})"
    elif state.world > before:
        head = f"{state.world - before} worker(s) joined: continuing on {state.world} workers {where}"
    else:
        head = f"{before - state.world} worker(s) gone: continuing on {state.world} worker(s) {where}"
    return f"{head}; {state.layout.describe()}"


IMAGE_TRACE_ENV = "RAYDIST_IMAGE_TRACE"  # a folder: every rank appends the training images it used (tests)


class ImageTrace:
    """An instrument for tests: one JSON line per micro-batch trained on (pid, epoch, the step's end
    position, world size, rank, image indices), so a test can count every image of an epoch across a
    resize. Reading the indices syncs with the device: never on unless the variable is set."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"trace-{os.getpid()}.jsonl")

    def write(self, state: "TrainingState", step: Step, indices: torch.Tensor) -> None:
        import json

        with open(self.path, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "epoch": state.epoch, "end": step.end, "world": state.world,
                                 "rank": state.rank, "indices": indices.tolist()}) + "\n")


def read_image_trace(folder: str) -> list[dict]:
    """Every record that ImageTrace wrote into `folder`, all processes' files together (a missing folder:
    none)."""
    import json

    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("trace-") and name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as fh:
                records += [json.loads(line) for line in fh]
    return records


def image_trace(state: "TrainingState") -> Optional[ImageTrace]:
    folder = os.environ.get(IMAGE_TRACE_ENV)
    return ImageTrace(folder) if folder and (state.elastic or state.position) else None


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


def _tensorboard(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def _epoch_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:6.2%}  "
            f"val loss {m['val_loss']:.4f} acc {m['val_acc']:6.2%}  lr {m['lr']:.4g}  "
            f"{m['epoch_time_s']:.1f}s  {m['images_per_s']:,.0f} img/s")


def _stop_message(m: dict, cfg: TrainConfig) -> str:
    if m["stop_reason"] == DIVERGED:
        return (f"stopped at epoch {m['epoch']}: diverged ({m['divergence']}); lower --lr (now {cfg.lr:g}), "
                f"add --warmup-epochs or use --precision fp32")
    return (f"stopped early at epoch {m['epoch']}: validation accuracy {m['val_acc']:.2%} met the target "
            f"{cfg.target_accuracy:.2%} for {cfg.patience} consecutive epoch(s)")


# ---- launchers ------------------------------------------------------------------------------------


@dataclass
class LocalContext(WorkerContext):
    """A single process, no Ray: checkpoints go to <run_dir>/epoch_NNNN/, reports to `reported`."""
    run_dir: str = ""
    reported: list = field(default_factory=list)


def local_context(run_dir: str, device: str = "cpu", resume_state: Optional[dict] = None,
                  log_dir: Optional[str] = None) -> LocalContext:
    os.makedirs(run_dir, exist_ok=True)
    ctx: LocalContext

    def report(metrics: dict, checkpoint_folder: Optional[str]) -> None:
        ctx.reported.append(dict(metrics))
        if checkpoint_folder:
            shutil.copytree(checkpoint_folder, os.path.join(run_dir, f"epoch_{metrics['epoch']:04d}"),
                            dirs_exist_ok=True)
            shutil.rmtree(checkpoint_folder, ignore_errors=True)

    def write_file(name: str, data: bytes) -> None:
        from raydist.storage import write_atomically

        write_atomically(os.path.join(run_dir, name), data)

    ctx = LocalContext(rank=0, world_size=1, device=torch.device(device), report=report, write_file=write_file,
                       resume_state=resume_state, log_dir=log_dir, run_dir=run_dir)
    return ctx


def local_tensorboard_for(filesystem, target: str) -> tuple[str, Callable[[], None]]:
    """TensorBoard for a run in remote storage (s3://...), which it cannot write to: a local folder for the
    events, and the function that copies them to `target` (<run>/tensorboard on `filesystem`) after every
    epoch (event files are small), so a URI run has its curves beside its checkpoints. `run` removes the
    local folder when the run ends."""
    import pyarrow.fs

    log_dir = tempfile.mkdtemp(prefix="raydist-tensorboard-")

    def publish_logs() -> None:
        filesystem.create_dir(target, recursive=True)  # a local filesystem (file://) needs it made
        pyarrow.fs.copy_files(log_dir, target, destination_filesystem=filesystem)

    return log_dir, publish_logs


def run_folder_context(cfg: TrainConfig, *, run_dir: str, device: torch.device, node_id: str,
                       report: Callable[[dict, Optional[str]], None], resume_state: Optional[dict] = None,
                       kept: Optional[list[tuple[dict, str]]] = None, epoch_lines: bool = True) -> WorkerContext:
    """One process that trains alone and keeps its run folder itself, as Ray Train does for a multi-worker
    run (a one-worker Tune trial: no worker group): each checkpoint goes to `run_dir`/checkpoint_epoch_NNNN/
    (a local path or a URI), the best `keep_checkpoints` by `keep_by` and the latest are kept, and
    `report(metrics, checkpoint_path or None)` passes every epoch on. `kept`: the (metrics, path) of the
    checkpoints already in the folder, when a trial resumes there. `epoch_lines`: print a line per epoch
    (a study's driver prints its own lines instead)."""
    import posixpath


    from raydist.config import metric_mode
    from raydist.storage import write_atomically

    checkpoints = list(kept or [])
    sign = 1 if metric_mode(cfg.keep_by) == "max" else -1

    def merit(metrics: dict) -> float:
        value = metrics.get(cfg.keep_by)
        return sign * value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf

    def prune() -> None:
        latest = max(checkpoints, key=lambda c: c[0]["epoch"])
        best = sorted(checkpoints, key=lambda c: (merit(c[0]), c[0]["epoch"]), reverse=True)[:cfg.keep_checkpoints]
        keep = {path for _, path in best} | {latest[1]}
        for _, path in checkpoints:
            if path not in keep:
                fs, inner = filesystem(path)
                fs.delete_dir(inner)
        checkpoints[:] = [c for c in checkpoints if c[1] in keep]

    def report_and_keep(metrics: dict, folder: Optional[str]) -> float:
        path, t0 = None, time.perf_counter()
        if folder:
            path = posixpath.join(run_dir, checkpoint_dir_name(metrics["epoch"]))
            with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as fh:
                write_atomically(posixpath.join(path, CHECKPOINT_FILE), fh.read())
            shutil.rmtree(folder, ignore_errors=True)
            checkpoints[:] = [c for c in checkpoints if c[1] != path] + [(metrics, path)]
            prune()
        stored_s = time.perf_counter() - t0  # training waits for this copy; not for Tune's handling below
        report(metrics, path)
        return stored_s

    def write_file(name: str, data: bytes) -> None:
        write_atomically(posixpath.join(run_dir, name), data)

    log_dir, publish_logs = cfg.log_dir, None
    if log_dir is None:  # remote storage
        fs, inner = filesystem(posixpath.join(run_dir, "tensorboard"))
        log_dir, publish_logs = local_tensorboard_for(fs, inner)
    return WorkerContext(rank=0, world_size=1, device=device, report=report_and_keep, write_file=write_file,
                         resume_state=resume_state, log_dir=log_dir, publish_logs=publish_logs, node_id=node_id,
                         epoch_lines=epoch_lines)


def _quiet_ray_train_reports() -> None:
    """Ray 2.60 logs every report of every rank at INFO through a logger named after its file, which
    LoggingConfig(log_level) does not reach; rank 0's epoch line says the same in one line."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context  # RAY (internal; may move)

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def read_resume_checkpoint(path: str, *, node_id: str) -> Optional[dict]:
    """The checkpoint `--resume` names, read through Ray's storage layer (a local path or a URI such as
    s3://...) on this worker's node. A run folder that holds no checkpoint yet starts from scratch; a path
    this node cannot see is an error naming the node, never a silent fresh start."""
    import posixpath

    import pyarrow.fs
    from ray.train import Checkpoint  # RAY

    checkpoint = Checkpoint(path)  # RAY: picks the filesystem for the path
    fs = checkpoint.filesystem
    if fs.get_file_info(posixpath.join(checkpoint.path, CHECKPOINT_FILE)).type == pyarrow.fs.FileType.File:
        with checkpoint.as_directory() as folder:  # a remote one is downloaded once per node
            return load_checkpoint_file(os.path.join(folder, CHECKPOINT_FILE),
                                        name=posixpath.join(path, CHECKPOINT_FILE))
    if fs.get_file_info(posixpath.join(checkpoint.path, "config.yaml")).type == pyarrow.fs.FileType.File:
        return None  # a run folder continued in place before its first checkpoint
    raise WorkerInputError(f"--resume {path}: no {CHECKPOINT_FILE} there as seen from node {node_id}; give a "
                           f"path every node can read (shared storage such as s3://... or an NFS mount)")


def load_latest_good_checkpoint(checkpoint, *, announce: bool) -> dict:
    """The content of the run's latest checkpoint that can be read: Ray hands the latest one it recorded,
    which a crash while writing it can have left cut short; then the older checkpoint folders beside it
    are tried, newest first, and rank 0 (`announce`) says in one line which file was skipped."""
    import posixpath

    import pyarrow.fs
    from ray.train import Checkpoint  # RAY

    fs, latest = checkpoint.filesystem, checkpoint.path
    parent, name = posixpath.split(latest)
    older = sorted((posixpath.basename(info.path) for info in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                    if info.type == pyarrow.fs.FileType.Directory
                    and posixpath.basename(info.path).startswith(CHECKPOINT_PREFIX)
                    and posixpath.basename(info.path) < name), reverse=True)
    skipped = []
    for folder_name in [name] + older:
        path = posixpath.join(parent, folder_name)
        try:
            with Checkpoint(path, filesystem=fs).as_directory() as folder:  # RAY: a remote one is downloaded
                state = load_checkpoint_file(os.path.join(folder, CHECKPOINT_FILE),
                                             name=posixpath.join(path, CHECKPOINT_FILE))
        except (CorruptCheckpoint, FileNotFoundError) as exc:
            skipped.append(str(exc) if isinstance(exc, CorruptCheckpoint) else f"{path}: no {CHECKPOINT_FILE}")
            continue
        if skipped and announce:
            print(f"warning: {skipped[0]}; resuming from {path} instead", flush=True)
        return state
    raise CorruptCheckpoint(f"no readable checkpoint in {parent}: {skipped[0]}")


# The key of train_loop_config that carries the driver's console wishes beside the config's fields:
# {"epoch_lines": bool, "progress_every_s": float, "labels": {"run": ..., "study": ..., "trial": ...}}.
CONSOLE_KEY = "_console"


def train_loop_per_worker(config: dict) -> list[dict]:
    """Entry point of every Ray Train worker (TorchTrainer has already set up the process group)."""
    import ray.train  # RAY
    import ray.train.torch  # RAY

    console = config.get(CONSOLE_KEY) or {}  # how the driver wants this run's console (not a training knob)
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != CONSOLE_KEY})
    _quiet_ray_train_reports()
    train_ctx = ray.train.get_context()  # RAY
    exported = None
    if train_ctx.get_world_rank() == 0:  # RAY
        from raydist.cluster import RunMetrics

        exported = RunMetrics(console.get("labels") or {"run": cfg.name or ""})  # RAY: the dashboard's Metrics view
    node_id = ray.get_runtime_context().get_node_id()  # RAY
    checkpoint = ray.train.get_checkpoint()  # RAY: this run's latest, after a restart or --resume RUN_DIR
    resume_state = None
    if checkpoint is not None:
        resume_state = load_latest_good_checkpoint(checkpoint, announce=train_ctx.get_world_rank() == 0)  # RAY
    elif cfg.resume:  # --resume CHECKPOINT_DIR, or a run folder with no checkpoint yet
        resume_state = read_resume_checkpoint(cfg.resume, node_id=node_id)

    def report(metrics: dict, checkpoint_folder: Optional[str]) -> None:
        if exported and not metrics.get("partial_epoch"):
            exported.record(metrics)
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None  # RAY
        # ASYNC: the upload (to S3 it can take longer than an epoch) runs in Ray's background thread while
        # training goes on, and Ray deletes the local folder once it is stored; the report reaches the
        # controller (and Tune) when its checkpoint is safe, in order.
        name = checkpoint_dir_name(metrics["epoch"], metrics.get("position", 0)) if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name,  # RAY
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)  # RAY

    def preemption_info() -> Optional[dict]:
        info = ray.train.get_preemption_info()  # RAY (alpha): a barrier; SpotWatch is its only caller
        if info is None:
            return None
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()} if train_ctx.get_world_rank() == 0 \
            else {}  # RAY: rank 0 names the nodes
        return {"nodes": [(node, f"{addresses.get(node, '?')} ({node[:8]})") for node in info.preempted_node_ids],
                "ranks": info.preempted_ranks,
                "deadline_unix": info.deadline_ms / 1000 if info.deadline_ms else None}

    def write_file(name: str, data: bytes) -> None:
        import pyarrow.fs

        from raydist.storage import write_atomically

        storage = train_ctx.get_storage()  # RAY: the run folder, local or remote (S3, NFS)
        path = f"{storage.experiment_fs_path}/{name}"
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            write_atomically(path, data)  # never a half-written model for a reader to find
        else:  # an object store publishes an object only once its upload completes
            with storage.storage_filesystem.open_output_stream(path) as out:
                out.write(data)

    log_dir, publish_logs = cfg.log_dir, None
    if log_dir is None and train_ctx.get_world_rank() == 0:  # RAY: remote storage (s3://...)
        storage = train_ctx.get_storage()  # RAY
        log_dir, publish_logs = local_tensorboard_for(storage.storage_filesystem,
                                                      f"{storage.experiment_fs_path}/tensorboard")
    ctx = WorkerContext(rank=train_ctx.get_world_rank(), world_size=train_ctx.get_world_size(),  # RAY
                        device=ray.train.torch.get_device(), report=report, write_file=write_file,  # RAY
                        resume_state=resume_state, log_dir=log_dir, publish_logs=publish_logs, node_id=node_id,
                        epoch_lines=console.get("epoch_lines", True),
                        progress_every_s=console.get("progress_every_s", 0.0),
                        preemption_info=preemption_info if cfg.is_elastic() else None,
                        devices=ray.train.torch.get_devices())  # RAY: the worker's GPUs (their ids need not be adjacent)
    try:
        return run(cfg, ctx)  # rank 0's history becomes Result.return_value
    except BaseException as exc:
        # Ray hands the driver the exception without its traceback (and cuts the text it shows): keep the
        # whole of it on the exception, for the run's error.log (raydist.ray_edge.failures.error_report).
        from raydist.errors import keep_traceback

        keep_traceback(exc, where=f"rank {ctx.rank} on node {node_id}")
        raise
