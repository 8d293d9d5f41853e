"""One worker's training state: the model (DDP, SyncBatchNorm, model parallelism, compile), optimizer and
its parameter groups (transfer learning's stages), schedule, mixed precision and the epoch plan; one epoch
of training, evaluation, and the checkpoint's state dict in and out.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from raydist.config.fields import TrainConfig
from raydist.config.rates import backbone_lr_mult, lr_scale
from raydist.data.sizes import classes_predicted, predicted_class_names
from raydist.data.splits import shard_indices, steps_per_epoch
from raydist.errors import WorkerInputError
from raydist.loop.batchnorm import precise_statistics, rank0_statistics
from raydist.loop.ema import WeightAverage
from raydist.loop.evaluate import EpochSums, evaluate_model, input_pipeline, uses_channels_last
from raydist.loop.mixing import BatchMixer
from raydist.loop.model_split import split_model
from raydist.loop.optimizer import apply_hyperparameters, build_optimizer
from raydist.loop.recipe import EarlyStop, Schedule, autocast_dtype, clip_gradients, lr_factor, with_fused_flag
from raydist.loop.worker_data import data_batches
from raydist.models.registry import sync_batchnorm
from raydist.models.transfer import Unit, build_model, freeze_norms, set_trainable, transfer_units, unfrozen_stages
from raydist.output.console import EpochProgress
from raydist.parallel.elastic import (
    Step,
    batch_layout,
    epoch_order,
    epoch_steps,
    min_tail,
    single_worker_share,
    steps_in_epoch,
    update_at,
)
from raydist.parallel.pipeline import Pipeline

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
                 source=None, devices: Optional[Sequence[torch.device]] = None,
                 on_micro_batch: Optional[Callable[..., None]] = None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.on_micro_batch = on_micro_batch  # WorkerContext.on_micro_batch: every trained micro-batch's images
        self.devices = list(devices) if devices else [device]  # the worker's GPUs, for --model-parallel
        self.train_set, self.val_set = train_set, val_set
        self.augment = input_pipeline(cfg, device, seed=cfg.seed * 1000 + rank)

        # ---- model (identical initial weights on every rank: the caller seeded torch)
        net = build_model(cfg.model, num_classes=classes_predicted(cfg), grey_input=cfg.grey_input, source=source,
                          model_args=cfg.model_args)
        if cfg.sync_batchnorm and world > 1:
            net = sync_batchnorm(net)
        self.channels_last = uses_channels_last(cfg, device)
        self.net = net.to(device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        # --model-parallel K: the model's own modules in K stages on this worker's K devices; self.net stays
        # the whole model (its state dict, checkpoints and optimizer are the unsplit model's).
        self.pipeline: Optional[Pipeline] = (split_model(self.net, cfg, device=device, world=world, held=self.devices,
                                                          channels_last=self.channels_last)
                                              if cfg.model_parallel > 1 else None)
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
        # An elastic run steps through each epoch in global batches (raydist.parallel.elastic), from `position`.
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
        self.optimizer, self._group_mults = build_optimizer(cfg, self.units, peak_lr, self._fused())
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
        self.mixer = BatchMixer.from_config(cfg, self.augment.gen)  # --mixup/--cutmix: the epoch-seeded generator
        self.early_stop = EarlyStop(cfg.target_accuracy, cfg.patience)
        self.epoch = 0  # epochs done
        self.images_before = 0  # training images the finished epochs trained on (all ranks, as trained)
        self.first_train_loss: Optional[float] = None  # what divergence is measured against
        self.first_step_unix: Optional[float] = None
        # --ema: evaluated, kept by the checkpoint policy and saved as the model; the live weights train on
        self.average = WeightAverage(self.net, cfg.ema) if cfg.ema else None
        self.confusion: Optional[torch.Tensor] = None  # the last evaluation's matrix, set by raydist.loop.run
        self._place_schedule()

    # ---- building blocks

    def _fused(self) -> Optional[bool]:
        # On a GPU the fused kernels update every parameter in a few launches instead of several per tensor.
        return True if self.device.type == "cuda" else None

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
        carried = [*self.carried, *[0.0] * (len(sums) - len(self.carried))] if self.carried else None  # older: 5
        return [a + b for a, b in zip(sums, carried)] if carried else sums

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
        if cfg.compile and not first:  # the last stages would pass torch's recompile limit and run uncompiled
            torch._dynamo.reset()  # the earlier stages' graphs: never run again (requires_grad is in their guards)
        if self.world > 1:
            # DDP registers its allreduce hooks for the parameters that require grad when it wraps the
            # model: a new trainable set needs a new wrapper (the old one's hooks go with it).
            self.model = None
            gc.collect()
            # broadcast_buffers=False: DDP would send rank 0's BatchNorm statistics to every rank before each
            # forward; rank 0's come out the same either way, and they are what is evaluated and saved
            # (evaluate() broadcasts them once per epoch). device_ids: a one-device model's device only.
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
        order in global batches from `position` (raydist.parallel.elastic)."""
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
        # The batches drive the loop (not zip, which would stop short of a streamed source's end: its
        # generator says what the epoch decoded only once it is drained).
        for k, (images, labels) in enumerate(pairs):
            progress.step(k)  # a clock read; nothing on the device
            i, j = micro[k]
            step = plan[i]
            update_now = j + 1 == len(step.micro_batches)
            # Accumulating steps skip DDP's allreduce (Horovod's batches-per-allreduce).
            no_sync = model.no_sync() if (isinstance(model, DDP) and not update_now) else contextlib.nullcontext()
            with no_sync:
                loss, correct = self._forward_backward(images, labels, step.weights[j])
            if step.weights[j]:  # a weight-0 image (a rank with none in a short last step) is not counted
                # Accumulate on the device: no host sync per step.
                sums.loss += loss.double() * len(labels)
                sums.correct += correct
                sums.count += len(labels)
                if self.on_micro_batch is not None:  # reads the indices: a host sync, only when asked for
                    self.on_micro_batch(epoch=self.epoch, end=step.end, world=self.world, rank=self.rank,
                                        indices=step.micro_batches[j].tolist())
            if update_now:
                if cfg.clip_grad_norm:  # on the device: a tensor sum, read once at the epoch's end
                    sums.grad_norm = sums.grad_norm + clip_gradients(self.scaler, self.optimizer, cfg.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.average is not None:
                    self.average.update()
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

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float):
        """One micro-batch: augment (and mix, under --mixup/--cutmix), forward, backward of the loss times its
        `weight` in the step. Returns the loss and the correct predictions (the credit against mixed targets,
        raydist.loop.mixing), both detached on the device."""
        x = self.augment(images, train=True)
        mixed = None
        if self.mixer is not None:
            x, mixed = self.mixer(x, labels.to(x.device))
            mixed = mixed.to(self.output_device)
        labels = labels.to(self.output_device)  # a split model's logits are on its last device
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
            loss = mixed.loss(logits, self.cfg.label_smoothing) if mixed else self.criterion(logits, labels)
        self.scaler.scale(loss * weight).backward()
        logits = logits.detach()
        return loss.detach(), mixed.correct(logits) if mixed else (logits.argmax(1) == labels).sum()

    @torch.no_grad()
    def evaluate(self) -> EpochSums:
        """This rank's share of the validation set, evaluated with the weights and statistics that are saved
        (the average's under --ema; --precise-bn re-estimates the statistics of those weights and keeps them)."""
        if self.world > 1:
            rank0_statistics(self.net, self.average)
        with self.average.swapped_in(keep_statistics=True) if self.average is not None else contextlib.nullcontext():
            if self.cfg.precise_bn:
                precise_statistics(self)
            return evaluate_model(self.compiled, self.val_set, self.cfg, device=self.device, rank=self.rank,
                                  world=self.world, augment=self.augment)

    def saved_weights(self) -> dict:
        """The model's weights as saved and evaluated: the average's under --ema, else the live ones."""
        return self.average.weights() if self.average is not None else self.net.state_dict()

    # ---- saving and resuming

    def state_dict(self, metrics: Optional[dict] = None, epoch_sums: Optional[list] = None) -> dict:
        """Everything a resumed run needs (the checkpoint file's content). `epoch_sums`: inside an epoch, its
        train sums so far over all ranks (loss, correct, count, LR sum, updates)."""
        # "model" is always the weights the metrics describe (what predict, --weights and a study's best
        # trial read); under --ema the live weights a resumed run trains on are "live_model".
        average = {"live_model": self.net.state_dict(), "ema": self.average.state_dict()} if self.average else {}
        return {"model": self.saved_weights(), **average, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "early_stop_hits": self.early_stop.hits,
                "stage": self.stage, "first_train_loss": self.first_train_loss, "config": self.cfg.to_dict(),
                "class_names": predicted_class_names(self.cfg), "world_size": self.world,
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
        self.net.load_state_dict(state.get("live_model", state["model"]))
        if self.average is not None:  # from a run without --ema, the average starts at its weights
            self.average.load(state["model"], state.get("ema") or {"updates": 0})
        # keeps the momentum buffers ...
        self.optimizer.load_state_dict(with_fused_flag(state["optimizer"], self._fused()))
        # ... but this run's decay, momentum and LR multipliers
        apply_hyperparameters(self.cfg, self.optimizer, self._group_mults, self._fused())
        # A scaler that was off (bf16, fp32, CPU) saved {}, which an enabled one refuses: fp16 then starts afresh.
        if state.get("scaler"):
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


