"""The typed training config: every knob with its unit and default, its validation, and the CLI built from it.

`TrainConfig` is the single source for `python -m raydist.train`'s flags (grouped: data, model,
optimization, schedule, scaling, output), for what is checked before any cluster starts, for what is
saved beside every run and inside every checkpoint, and for the fields a Tune study may search.

    cfg = parse_cli(["--epochs", "5", "--lr", "0.2"])     # defaults < --preset < --config YAML < flags
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import re
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from raydist.errors import ConfigError

from raydist.data.registry import DATASETS

MIN_MICRO_BATCH = 2  # images an elastic run feeds a worker at once, at least: BatchNorm needs more than one

GROUPS = ("data", "model", "optimization", "schedule", "scaling", "output")


def _field(group: str, default: Any, help: str, choices: Optional[tuple] = None):
    return field(default=default, metadata={"group": group, "help": help, "choices": choices})


@dataclass
class TrainConfig:
    # ---- data -------------------------------------------------------------------------------
    dataset: str = _field("data", "digits", "data set name (see --dataset choices); digits is embedded, no download; "
                          "folder: your own images in --data-dir")
    data_dir: str = _field("data", "./data", "folder holding (or receiving) the downloaded data sets; with --dataset "
                           "folder, the image folder (one subfolder per class; a path, or s3://, gs://)")
    download: bool = _field("data", False, "download the data set into --data-dir if it is missing")
    val_fraction: Optional[float] = _field("data", None, "share of the training images held out for validation "
                                           "(a fixed, seeded split; per class for CIFAR and Fashion-MNIST); default: "
                                           "the data set's (digits 0.2, CIFAR-10/100 and Fashion-MNIST 0.1)")
    augment: str = _field("data", "auto", "batched on-device augmentation: auto (resized_crop for an image "
                          "folder, else crop_flip), none, crop_flip (pad-4 crop + flip), resized_crop (ImageNet's "
                          "random-resized crop, 8-100%% of the area, + flip) or dli (flip, rotation 10 deg, shear "
                          "10 deg, scale 0.8-1.2, colour jitter 0.2)", ("auto", "none", "crop_flip", "resized_crop", "dli"))
    fake_image_size: int = _field("data", 224, "fake data: image side in pixels (images are 3 x N x N)")
    fake_num_classes: int = _field("data", 1000, "fake data: number of classes")
    fake_train_size: int = _field("data", 12800, "fake data: training images per epoch (generated lazily)")
    fake_val_size: int = _field("data", 1280, "fake data: validation images (generated lazily)")
    seed: int = _field("data", 0, "seed for shuffling, augmentation, dropout and weight init (the train/val "
                       "split is fixed: the same for every seed)")
    classes: Optional[str] = _field("data", None, "train and validate on these classes only, e.g. 0-4 or 5,7,9 "
                                    "(labels renumbered 0..k-1 in this order)")
    train_fraction: float = _field("data", 1.0, "train on this share of each class's training images (a fixed "
                                   "choice, the same whatever --seed says); validation keeps them all")
    train_per_class: Optional[int] = _field("data", None, "train on at most this many images of each class "
                                            "(a fixed choice, as --train-fraction)")
    data_loader: str = _field("data", "auto", "image folder: memory (decoded once per node, held by every worker), "
                              "stream (read and decoded by Ray Data on the cluster's free CPUs as it trains) or auto "
                              "(memory when every worker's copy fits in half the node's memory)",
                              ("auto", "memory", "stream"))
    max_bad_images: Optional[int] = _field("data", None, "image folder: stop the run when more image files than "
                                           "this cannot be decoded (they are skipped and named in the log); "
                                           "default: 0.1%% of the folder's images")
    input_size: Optional[int] = _field("data", None, "resize every batch on the device to N x N pixels (e.g. 64, "
                                       "128, 224 for ImageNet models on 32x32 data); default: the data's own size")
    normalize: str = _field("data", "dataset", "per-channel normalisation of the model's input: dataset (the data "
                            "set's own mean and std) or 0.5 (mean 0.5, std 0.5: pixels to [-1, 1], as the DLI "
                            "notebook's Normalize((0.5,)*3, (0.5,)*3))", ("dataset", "0.5"))

    # ---- model ------------------------------------------------------------------------------
    model: str = _field("model", "resnet8", "model name (see --model choices)")
    model_args: dict = field(default_factory=dict, metadata={
        "group": "model", "choices": None,
        "help": "the model's own arguments, e.g. --model-arg l1=64 --model-arg l2=16 for tune_cnn, depth=28 widen=10 "
                "for wrn (repeatable; YAML: model_args: {l1: 64}; a study searches model_args.l1); checked against "
                "the model's builder, saved with its weights"})
    pretrained: bool = _field("model", False, "start from published ImageNet weights (resnet18_imagenet, "
                              "resnet50_imagenet; "
                              "torchvision's cache under $TORCH_HOME, downloaded once if missing)")
    weights: Optional[str] = _field("model", None, "start from the weights in this file: a state dict, a "
                                    "torchvision weights file, or a raydist checkpoint.pt / model_final.pt / "
                                    "best_model.pt (local path or URI); the head is new")
    finetune: str = _field("model", "full", "with --pretrained/--weights: full (every layer trains), linear "
                           "(frozen backbone, only the head trains), gradual (one more stage unfrozen every "
                           "--unfreeze-every epochs, from the top), lp-ft (linear probe for --freeze-epochs, "
                           "then everything at the backbone LR)", ("full", "linear", "gradual", "lp-ft"))
    unfreeze_every: int = _field("model", 1, "gradual: epochs between unfreezing one more stage")
    freeze_epochs: int = _field("model", 1, "lp-ft: epochs of linear probing before everything trains")
    backbone_lr_mult: Optional[float] = _field("model", None, "backbone LR = head LR x this at every step of the "
                                               "schedule (default: 0.1 with lp-ft, else 1)")
    grey_input: str = _field("model", "replicate", "grey data sets (digits, fashion_mnist): replicate (3 equal "
                             "channels), sum (1 channel; the first conv's RGB filters summed: the same output, "
                             "that conv at a third of its cost) or reinit (1 channel; a new first conv)",
                             ("replicate", "sum", "reinit"))
    sync_batchnorm: bool = _field("model", False, "convert BatchNorm to SyncBatchNorm (statistics over all workers; GPU workers only)")
    compile: bool = _field("model", False, "torch.compile the model (slower start, faster steps on GPU)")
    model_parallel: int = _field("model", 1, "split the model into K stages on the K GPUs a worker holds (give "
                                 "--gpus-per-worker K); DDP runs across workers over the split model. On CPU the "
                                 "K stages share the CPU (a test of the split, no speed-up)")
    micro_batches: int = _field("model", 1, "with --model-parallel: split each worker batch into M micro-batches "
                                "that flow through the stages as a pipeline (GPipe), so the GPUs work at once; "
                                "BatchNorm then normalises each micro-batch on its own, which changes the "
                                "optimisation of models that have it")
    pipeline_balance: str = _field("model", "params", "with --model-parallel: where the stage boundaries fall: "
                                   "params (equal parameter counts) or time (equal measured step time per stage)",
                                   ("params", "time"))
    channels_last: str = _field("model", "auto", "memory format: auto (channels_last on GPUs, whose tensor cores "
                                "want it, and CPUs, where the CIFAR models trained 5-26%% faster in it here), on, off",
                                ("auto", "on", "off"))

    # ---- optimization -----------------------------------------------------------------------
    optimizer: str = _field("optimization", "sgd", "sgd (momentum, Nesterov) or adamw", ("sgd", "adamw"))
    lr: float = _field("optimization", 0.4, "peak learning rate per 256 images; scaled linearly by the global batch "
                       "(see --lr-scaling)")
    lr_scaling: str = _field("optimization", "per_256", "what --lr is: per_256 (the LR of a 256-image batch, scaled "
                             "by global batch / 256: Goyal et al.'s linear rule), per_worker (one worker's LR, scaled "
                             "by workers x --grad-accum: Horovod's examples) or none (the optimizer's LR at any batch: "
                             "Ray Tune's tutorials)", ("per_256", "per_worker", "none"))
    momentum: float = _field("optimization", 0.9, "SGD momentum (AdamW: beta1), in [0, 1)")
    nesterov: bool = _field("optimization", True, "Nesterov momentum for SGD")
    weight_decay: float = _field("optimization", 5e-4, "L2 weight decay on convolution and linear weights; "
                                 "BatchNorm and bias parameters get none (AdamW: decoupled)")
    label_smoothing: float = _field("optimization", 0.0, "label smoothing in [0, 1)")
    batch_size: int = _field("optimization", 64, "images per worker per step (global batch = this x workers x grad-accum)")
    val_batch_size: Optional[int] = _field("optimization", None, "images per worker per validation step "
                                           "(default: 2 x --batch-size; evaluation keeps no gradients)")
    grad_accum: int = _field("optimization", 1, "steps accumulated per optimizer update; the allreduce runs on the last only")
    precision: str = _field("optimization", "auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16",
                            ("auto", "fp32", "bf16", "fp16"))
    fp16_allreduce: bool = _field("optimization", False, "compress gradients to 16 bits for the allreduce: fp16 "
                                  "with --precision fp16 (its loss is scaled), else bf16 (fp32's range: unscaled "
                                  "small gradients would underflow in fp16)")

    # ---- schedule ---------------------------------------------------------------------------
    epochs: int = _field("schedule", 15, "training epochs (passes over the training set)")
    schedule_epochs: Optional[int] = _field("schedule", None, "epochs the LR schedule spans (default: --epochs); "
                                            "a study under ASHA sets it to the scheduler's budget so trials at a "
                                            "rung sit at the same point of their schedules")
    warmup_epochs: float = _field("schedule", 1.0, "epochs of linear LR warmup from 0 (see --warmup-from) to the peak")
    warmup_from: str = _field("schedule", "zero", "where the warmup starts: zero, or single_worker (the peak / "
                              "workers, the most workers of an elastic run: one worker's LR, rising per step to "
                              "the scaled one, as in Horovod's examples)", ("zero", "single_worker"))
    lr_schedule: str = _field("schedule", "cosine", "decay after warmup: cosine (to 0), step, constant",
                              ("cosine", "step", "constant"))
    lr_step_epochs: int = _field("schedule", 30, "step schedule: epochs between LR drops")
    lr_step_gamma: float = _field("schedule", 0.1, "step schedule: LR factor at each drop")
    lr_milestones: Optional[str] = _field("schedule", None, "step schedule: the LR drops after these many epochs, "
                                          "e.g. 30,60,80 (Horovod's ImageNet example: epoch 31 of the console is the "
                                          "first at 0.1x), instead of every --lr-step-epochs")
    target_accuracy: Optional[float] = _field("schedule", None, "stop early once validation accuracy (0-1] reaches this")
    patience: int = _field("schedule", 1, "consecutive epochs at or above --target-accuracy before stopping")

    # ---- scaling ----------------------------------------------------------------------------
    num_workers: int = _field("scaling", 2, "DDP workers (processes), one per GPU when training on GPUs; a range "
                              "MIN-MAX (e.g. 2-8) trains elastically: it starts once MIN fit, grows as nodes join "
                              "and goes on with fewer when nodes go (spot instances)")
    min_workers: Optional[int] = _field("scaling", None, "elastic: the fewest workers to train on (set by "
                                        "--num-workers MIN-MAX; unset: a fixed group of --num-workers)")
    elastic_batch: str = _field("scaling", "global", "elastic: global keeps the images per optimizer step (and so the "
                                "LR schedule and results) whatever the worker count, recomputing each worker's "
                                "batch and accumulation at every resize; per_worker keeps --batch-size per worker "
                                "and scales the LR to the new global batch", ("global", "per_worker"))
    global_batch: Optional[int] = _field("scaling", None, "elastic, --elastic-batch global: images per optimizer "
                                         "step (default: --batch-size x --grad-accum x the most workers)")
    resize_check_s: float = _field("scaling", 30.0, "elastic: seconds between Ray Train's looks for room to add "
                                   "workers")
    preemption_check_every: int = _field("scaling", 0, "elastic: optimizer steps between checks for a spot "
                                         "reclaim notice (a barrier on every rank); 0: chosen so the checks cost "
                                         "under 1%% of the training time")
    max_preemptions: int = _field("scaling", -1, "restarts after a node is reclaimed with notice (spot), a budget "
                                  "of their own beside --max-failures; -1: unlimited")
    use_gpu: Optional[bool] = _field("scaling", None, "train on GPUs (default: when the cluster has GPUs)")
    cpus_per_worker: float = _field("scaling", 1.0, "CPU cores reserved per worker (sizes its thread pool)")
    gpus_per_worker: float = _field("scaling", 1.0, "GPUs per worker when --use-gpu")
    address: Optional[str] = _field("scaling", None, "Ray cluster to join ('auto' or host:port); default: start one")
    max_failures: int = _field("scaling", 0, "worker-group restarts after a failure; each resumes from the last checkpoint")

    # ---- output -----------------------------------------------------------------------------
    storage_path: str = _field("output", "./runs", "where runs, checkpoints, logs and results go (local path or URI)")
    name: Optional[str] = _field("output", None, "run name (default: <dataset>-<model>-<timestamp>)")
    log_dir: Optional[str] = _field("output", None, "TensorBoard folder (default: <run dir>/tensorboard)")
    wandb: bool = _field("output", False, "log each epoch's metrics to Weights & Biases from rank 0 (needs the "
                         "wandb package; offline into the run folder when no API key is set)")
    wandb_project: Optional[str] = _field("output", None, "W&B project (default: raydist)")
    wandb_id: Optional[str] = _field("output", None, "W&B run id (default: a new one for each run, kept by its "
                                     "restarts, resizes and --resume of its run folder); give one to continue "
                                     "that W&B run")
    checkpoint_every: int = _field("output", 1, "epochs between checkpoints (the last epoch is always saved)")
    keep_checkpoints: int = _field("output", 2, "checkpoints kept, the best by --keep-by (plus the latest)")
    keep_by: str = _field("output", "val_acc", "metric that ranks checkpoints for keeping: val_acc, val_loss, "
                          "train_acc, train_loss (accuracies: higher is better; losses: lower)",
                          ("val_acc", "val_loss", "train_acc", "train_loss"))
    resume: Optional[str] = _field("output", None, "continue an earlier run: its run folder or a checkpoint folder")
    verbose: bool = _field("output", False, "the console shows Ray's own output: every worker line with Ray's "
                           "(RayTrainWorker pid=...) prefix, and Ray's internal lines (Ray's logs keep them anyway)")

    # -------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad value and what is accepted."""
        from raydist.data.registry import DATASETS
        from raydist.models import MODELS

        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{_flag(f.name)} {getattr(self, f.name)!r} is not one of: {', '.join(choices)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; known: {', '.join(sorted(DATASETS))}")
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; known: {', '.join(sorted(MODELS))}")
        if self.wandb_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(self.wandb_id)):
            raise ConfigError(f"--wandb-id {self.wandb_id!r}: W&B run ids are 1-64 letters, digits, - and _")
        self._validate_model_args()
        for name in ("lr", "batch_size", "epochs", "grad_accum", "num_workers", "cpus_per_worker",
                     "fake_image_size", "fake_num_classes", "fake_train_size", "fake_val_size",
                     "patience", "keep_checkpoints", "lr_step_epochs", "unfreeze_every", "freeze_epochs",
                     "train_fraction", "train_per_class", "input_size", "backbone_lr_mult", "val_batch_size",
                     "model_parallel", "micro_batches"):
            value = getattr(self, name)
            if value is None and name in ("train_per_class", "input_size", "backbone_lr_mult", "val_batch_size"):
                continue
            if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{_flag(name)} must be positive, got {value!r}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "checkpoint_every", "max_failures",
                     "gpus_per_worker", "lr_step_gamma"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ConfigError(f"{_flag(name)} must be zero or more, got {value!r}")
        self._validate_elastic()
        self._validate_model_parallel()
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1) (SGD momentum; AdamW's beta1), got {self.momentum!r}")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"--target-accuracy must be in (0, 1], got {self.target_accuracy!r}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs}")
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ConfigError(f"--schedule-epochs {self.schedule_epochs} is below --epochs {self.epochs}: the last "
                              f"epochs would train at LR 0; use at least {self.epochs} (or leave it unset)")
        if self.dataset == "folder":
            self._validate_folder()
        elif self.max_bad_images is not None:
            raise ConfigError(f"--max-bad-images {self.max_bad_images} applies to --dataset folder only")
        elif self.data_loader != "auto":
            raise ConfigError(f"--data-loader {self.data_loader} applies to --dataset folder only (the other data "
                              f"sets are held in memory)")
        self._validate_transfer()
        from raydist.data.sizes import train_size

        items = train_size(self.dataset, val_fraction=self.val_fraction, fake_train_size=self.fake_train_size,
                           classes=self.class_list(), train_fraction=self.train_fraction,
                           train_per_class=self.train_per_class, data_dir=self.data_dir)
        if self.is_elastic() and self.global_batch_at(self.num_workers) > items:
            raise ConfigError(f"a global batch of {self.global_batch_at(self.num_workers)} images per step is more than "
                              f"the {items} training images of {self.dataset}; give --global-batch {items} or less")
        if not self.is_elastic() and self.num_workers * self.batch_size > items:
            # Each rank must hold a full batch: a smaller one would train with a batch (and so an LR scale)
            # other than the one asked for, and ranks could end up with unequal step counts (DDP hangs).
            raise ConfigError(f"--batch-size {self.batch_size} x --num-workers {self.num_workers} = "
                              f"{self.num_workers * self.batch_size} images per step, but {self.dataset} has "
                              f"{items} training images; at most {items // self.num_workers} per worker with "
                              f"{self.num_workers} workers")
        from raydist.data.sizes import val_size

        if val_size(self.dataset, val_fraction=self.val_fraction, fake_val_size=self.fake_val_size,
                    classes=self.class_list(), data_dir=self.data_dir) == 0:
            raise ConfigError(f"--val-fraction {self.val_fraction} leaves no validation image of {self.dataset}"
                              f"{' in --classes ' + self.classes if self.classes else ''}; give a larger share")
        if self.use_gpu is not False and not float(self.gpus_per_worker).is_integer():
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker:g}: each DDP rank needs a GPU of its own "
                              f"(NCCL refuses two ranks on one GPU); use a whole number, usually 1")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError(f"--gpus-per-worker must be positive with --use-gpu, got {self.gpus_per_worker!r}")
        if self.pretrained and not MODELS[self.model].pretrained_weights:
            with_weights = sorted(n for n, m in MODELS.items() if m.pretrained_weights)
            raise ConfigError(f"--pretrained: model {self.model!r} has no published weights; models with them: "
                              f"{', '.join(with_weights)}")
        if self.name is not None:
            check_folder_name(self.name, "--name")
        if self.address is not None:
            check_address(self.address)
        if self.fake_num_classes < 2:
            raise ConfigError(f"--fake-num-classes must be at least 2 (a classifier needs 2 classes), "
                              f"got {self.fake_num_classes}")
        if not 8 <= self.fake_image_size <= 1024:
            raise ConfigError(f"--fake-image-size {self.fake_image_size} must be between 8 and 1024 pixels")
        self.milestone_list()  # raises on a bad --lr-milestones
        if self.lr_milestones is not None and self.lr_schedule != "step":
            raise ConfigError(f"--lr-milestones {self.lr_milestones} applies to --lr-schedule step, not "
                              f"{self.lr_schedule}")
        if not 0.0 < self.lr_step_gamma <= 1.0:
            raise ConfigError(f"--lr-step-gamma must be in (0, 1] (the LR factor at each step drop), "
                              f"got {self.lr_step_gamma!r}")
        return self

    def _validate_model_args(self) -> None:
        """--model-arg against the builder's signature (types converted), the builder's own checks run on
        the meta device (no memory, no time), and the image side a fixed-size network accepts."""
        import torch

        from raydist.models import MODELS, check_model_args
        from raydist.errors import ModelArgError

        try:
            self.model_args = check_model_args(self.model, self.model_args)
        except ModelArgError as exc:
            raise ConfigError(str(exc)) from None
        if self.model_args:
            try:
                with torch.device("meta"):
                    MODELS[self.model].builder(num_classes=2, **self.model_args)
            except ValueError as exc:
                args = " ".join(f"--model-arg {k}={v}" for k, v in self.model_args.items())
                raise ConfigError(f"{args}: {exc}") from None
        sides = MODELS[self.model].input_sides
        if sides:

            side = input_side(self)
            if not sides[0] <= side <= sides[1]:
                raise ConfigError(f"--model {self.model} reads images of {sides[0]} to {sides[1]} pixels a side, but "
                                  f"this run feeds it {side}: give --input-size 32 (or another model)")

    def _validate_model_parallel(self) -> None:
        """--model-parallel K and --micro-batches M: stages on the worker's K GPUs, its batch in M parts."""
        if self.model_parallel == 1:
            if self.micro_batches != 1 or self.pipeline_balance != "params":
                what = (f"--micro-batches {self.micro_batches}" if self.micro_batches != 1
                        else f"--pipeline-balance {self.pipeline_balance}")
                raise ConfigError(f"{what} pipelines a model split over devices; give --model-parallel 2 or more too")
            return
        if self.use_gpu is not False and self.gpus_per_worker != self.model_parallel:
            raise ConfigError(f"--model-parallel {self.model_parallel} places a stage on each of a worker's GPUs: "
                              f"give --gpus-per-worker {self.model_parallel} (got {self.gpus_per_worker:g}), or "
                              f"--no-use-gpu to test the split on CPUs")
        if self.micro_batches > self.batch_size:
            raise ConfigError(f"--micro-batches {self.micro_batches} is more than the {self.batch_size} images of "
                              f"--batch-size; give at most {self.batch_size}")
        # torch.compile traces one module on one device; the pipeline's clock schedule of stages on several
        # devices is Python that a graph would have to keep in order (compiling each stage is not built).
        if self.compile:
            raise ConfigError(f"--compile with --model-parallel {self.model_parallel}: not supported (the pipeline "
                              f"runs its stages on several devices in a Python schedule); drop --compile, or give "
                              f"--model-parallel 1")
        # SyncBatchNorm's collectives in every layer of every micro-batch, from the autograd threads of a
        # worker's K devices at once: never run, so not offered (and on CPUs SyncBatchNorm does not run at all).
        if self.sync_batchnorm:
            raise ConfigError(f"--sync-batchnorm with --model-parallel {self.model_parallel}: not supported (its "
                              f"collectives in every layer from a worker's {self.model_parallel} devices at once are "
                              f"untested); drop --sync-batchnorm, or give --model-parallel 1")
        import torch

        from raydist.models import create_model
        from raydist.parallel.pipeline import pipeline_units

        with torch.device("meta"):  # the model's units, without memory or time
            units = [name for name, _ in pipeline_units(create_model(self.model, num_classes=2, **self.model_args))]
        if self.model_parallel > len(units):
            raise ConfigError(f"--model-parallel {self.model_parallel}: --model {self.model} has {len(units)} pipeline "
                              f"units ({units[0]}..{units[-1]}), so at most {len(units)} stages")

    def _validate_elastic(self) -> None:
        """--num-workers MIN-MAX and the settings that only an elastic run reads."""
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"--num-workers {self.min_workers}-{self.num_workers}: {WORKER_RANGE_RULE}")
        if not self.is_elastic():
            if self.global_batch is not None or self.elastic_batch != "global":
                what = "--global-batch" if self.global_batch is not None else f"--elastic-batch {self.elastic_batch}"
                raise ConfigError(f"{what} applies to an elastic run only (--num-workers MIN-MAX, e.g. 2-8); this "
                                  f"one has a fixed {self.num_workers} worker(s)")
            return
        if self.global_batch is not None:
            if self.elastic_batch == "per_worker":
                raise ConfigError(f"--global-batch {self.global_batch} fixes the global batch, which --elastic-batch "
                                  f"per_worker lets grow and shrink with the workers; give one of the two")
            if self.global_batch < MIN_MICRO_BATCH * self.num_workers:
                raise ConfigError(f"--global-batch {self.global_batch} gives some of the {self.num_workers} workers "
                                  f"fewer than {MIN_MICRO_BATCH} images a step (BatchNorm needs more than one); give "
                                  f"at least {MIN_MICRO_BATCH * self.num_workers}")
        if self.batch_size < MIN_MICRO_BATCH:
            raise ConfigError(f"--batch-size {self.batch_size}: an elastic run feeds each worker at least "
                              f"{MIN_MICRO_BATCH} images at a time (BatchNorm needs more than one); give "
                              f"{MIN_MICRO_BATCH} or more")
        if not self.resize_check_s > 0 or not math.isfinite(self.resize_check_s):
            raise ConfigError(f"--resize-check-s must be positive, got {self.resize_check_s!r}")
        if self.preemption_check_every < 0:
            raise ConfigError(f"--preemption-check-every must be 0 (automatic) or more steps, got "
                              f"{self.preemption_check_every}")
        if self.max_preemptions < -1:
            raise ConfigError(f"--max-preemptions must be -1 (unlimited) or zero or more, got {self.max_preemptions}")
        if self.dataset == "folder" and self.data_loader == "stream":
            raise ConfigError(f"--num-workers {self.workers_text()}: an elastic run holds its image folder in memory; "
                              f"--data-loader stream is for fixed worker counts (give one number, or "
                              f"--data-loader memory)")

    def is_elastic(self) -> bool:
        """Trains on between min_workers and num_workers workers, resizing as nodes come and go."""
        return self.min_workers is not None

    def workers_text(self) -> str:
        return f"{self.min_workers}-{self.num_workers}" if self.is_elastic() else str(self.num_workers)

    def fewest_workers(self) -> int:
        """The workers the run needs to start (and to go on)."""
        return self.min_workers if self.is_elastic() else self.num_workers

    def global_batch_at(self, world: int) -> int:
        """Images per optimizer step on `world` workers."""
        if self.is_elastic() and self.elastic_batch == "global":
            return self.global_batch or self.batch_size * self.grad_accum * self.num_workers
        return self.batch_size * self.grad_accum * world

    def _validate_folder(self) -> None:
        """--dataset folder: --data-dir must be a folder of class folders (listed here, before any cluster)."""
        from raydist.data.sources import folder_index
        from raydist.errors import FolderError

        if self.download:
            raise ConfigError(f"--download fetches the published data sets; an image folder is read as it is "
                              f"from --data-dir {self.data_dir} (drop --download)")
        if self.data_loader == "stream" and (self.classes or self.train_fraction != 1.0 or self.train_per_class):
            raise ConfigError("--classes, --train-fraction and --train-per-class select images of a folder held in "
                              "memory; the streamed path reads the whole folder (use --data-loader memory)")
        if self.max_bad_images is not None and self.max_bad_images < 0:
            raise ConfigError(f"--max-bad-images must be zero or more, got {self.max_bad_images}")
        try:
            folder_index(self.data_dir, self.val_fraction)
        except FolderError as exc:
            raise ConfigError(str(exc)) from None

    def augment_kind(self) -> str:
        """--augment with auto resolved: ImageNet's random-resized crop for photos, CIFAR's pad-crop otherwise."""
        if self.augment != "auto":
            return self.augment
        return "resized_crop" if self.dataset == "folder" else "crop_flip"

    def _validate_transfer(self) -> None:
        from raydist.data.registry import DATASETS

        if self.pretrained and self.weights:
            raise ConfigError(f"--pretrained and --weights {self.weights} both name the starting weights; give one")
        if not self.starts_pretrained():
            if self.finetune != "full":
                raise ConfigError(f"--finetune {self.finetune} freezes pretrained layers, but this run starts from "
                                  f"scratch; add --pretrained or --weights FILE (or use --finetune full)")
            if self.backbone_lr_mult is not None:
                raise ConfigError(f"--backbone-lr-mult {self.backbone_lr_mult:g} sets a pretrained backbone's LR, "
                                  f"but this run starts from scratch; add --pretrained or --weights FILE")
        if self.finetune == "gradual" and self.unfreeze_every >= self.epochs:
            raise ConfigError(f"--unfreeze-every {self.unfreeze_every} with --epochs {self.epochs} never unfreezes "
                              f"a stage (that is --finetune linear); use at most {max(1, self.epochs - 1)}")
        if self.finetune == "lp-ft" and self.freeze_epochs >= self.epochs:
            raise ConfigError(f"--freeze-epochs {self.freeze_epochs} with --epochs {self.epochs} leaves no epoch "
                              f"to fine-tune in (that is --finetune linear); use at most {max(1, self.epochs - 1)}")
        if self.grey_input != "replicate" and not DATASETS[self.dataset].grey:
            grey = sorted(n for n, d in DATASETS.items() if d.grey)
            raise ConfigError(f"--grey-input {self.grey_input} feeds grey images as one channel; {self.dataset} is "
                              f"in colour (grey data sets: {', '.join(grey)})")
        if self.input_size is not None and not 8 <= self.input_size <= 1024:
            raise ConfigError(f"--input-size {self.input_size} must be between 8 and 1024 pixels")
        if self.dataset == "fake" and (self.classes or self.train_fraction != 1.0 or self.train_per_class):
            raise ConfigError("--classes, --train-fraction and --train-per-class select real images; fake data "
                              "has --fake-num-classes and --fake-train-size instead")
        if self.train_fraction > 1.0:
            raise ConfigError(f"--train-fraction must be in (0, 1], got {self.train_fraction!r}")
        if self.train_fraction != 1.0 and self.train_per_class:
            raise ConfigError("--train-fraction and --train-per-class both shrink the training set; give one")
        self.class_list()  # raises on a bad --classes

    def milestone_list(self) -> list[int]:
        """--lr-milestones as increasing epochs ([] when unset)."""
        if self.lr_milestones is None:
            return []
        try:
            epochs = [int(part) for part in self.lr_milestones.split(",")]
        except ValueError:
            epochs = []
        if not epochs or any(e < 1 for e in epochs) or epochs != sorted(set(epochs)):
            raise ConfigError(f"--lr-milestones {self.lr_milestones!r} must be increasing whole epochs separated by "
                              f"commas, e.g. 30,60,80")
        return epochs

    def class_list(self) -> Optional[list[int]]:
        """--classes as a list of class indices, or None for all of them."""
        if self.classes is None:
            return None
        from raydist.data.registry import parse_classes

        try:
            return parse_classes(self.classes, num_classes=self._all_classes())
        except ValueError as exc:
            raise ConfigError(f"--classes {self.classes!r}: {exc}") from None

    def _all_classes(self) -> int:
        from raydist.data.sizes import num_classes

        return num_classes(self.dataset, self.fake_num_classes, data_dir=self.data_dir, val_fraction=self.val_fraction)

    def starts_pretrained(self) -> bool:
        """A transfer run (--pretrained or --weights): its optimizer keeps a group pair per unit."""
        return bool(self.pretrained or self.weights)

    def input_channels(self) -> int:
        """Image channels the model reads: 1 when grey data is fed as one channel (--grey-input sum/reinit)."""
        return 3 if self.grey_input == "replicate" else 1

    def num_classes(self) -> int:
        """Classes the model predicts: those of --classes, else the data set's."""
        selected = self.class_list()
        return len(selected) if selected else self._all_classes()

    def class_names(self) -> list[str]:
        """Index -> name of the classes the model predicts (an image folder's subfolder names, in the
        order of --classes when given)."""
        from raydist.data.sizes import class_names

        names = class_names(self.dataset, data_dir=self.data_dir, val_fraction=self.val_fraction,
                            fake_num_classes=self.fake_num_classes)
        selected = self.class_list()
        return [names[c] for c in selected] if selected and names else names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        """Build from a mapping (YAML file, checkpoint, Tune sample), checking keys and value types."""
        return cls(**_coerce_all(values, source))


# ------------------------------------------------------------------------------------------------
# Types and coercion: YAML and Tune hand us ints for floats, strings for numbers, and so on.

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> tuple[type, bool]:
    """(scalar type, optional?) of a config field."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], True
    return hint, False


def _coerce(name: str, value: Any, source: str) -> Any:
    kind, optional = _base_type(name)
    if kind is dict:  # model_args: names -> plain values (the model's builder checks them in validate)
        if value is None:
            return {}
        if isinstance(value, dict):  # numpy scalars (a searcher's samples) as Python numbers
            value = {k: v.item() if hasattr(v, "item") and not _is_plain(v) else v for k, v in value.items()}
        if not isinstance(value, dict) or not all(isinstance(k, str) and _is_plain(v) for k, v in value.items()):
            raise ConfigError(f"{source}: {name} = {value!r} must be a mapping of argument names to numbers, "
                              f"booleans or text, e.g. {{l1: 64, l2: 16}}")
        return dict(value)
    if name == "num_workers" and is_worker_range(value):  # _coerce_all splits a range before it gets here
        raise ConfigError(f"{source}: num_workers {value!r}: a worker range (an elastic run) is given once, as "
                          f"--num-workers or a study's fixed num_workers; here give one number")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be empty (expected {kind.__name__}; YAML reads ~ and an "
                          f"empty value as empty: quote a path, e.g. '~/data')")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if kind is int:
            if isinstance(value, str):  # PyYAML reads 1e3 as text (YAML 1.1 wants 1.0e+3)
                value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (datetime.date, datetime.datetime)):  # `name: 2024-01-01`
                return value.isoformat()
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{source}: {name} = {value!r} is not a valid {kind.__name__}")


def _coerce_all(values: dict, source: str) -> dict:
    """Checked config values; `model_args.NAME` keys (a study's, --model-arg's) folded into model_args."""
    unknown = sorted(k for k in set(values) - set(_FIELDS) if not is_model_arg_key(k))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(_FIELDS)}")
    values = fold_model_args(split_worker_range(values, f"{source}: num_workers"))
    return {k: _coerce(k, v, source) for k, v in values.items()}


MODEL_ARG_PREFIX = "model_args."


def is_model_arg_key(key: Any) -> bool:
    """`model_args.l1`: one of the model's arguments, as a study searches or --set fixes it."""
    return isinstance(key, str) and key.startswith(MODEL_ARG_PREFIX) and len(key) > len(MODEL_ARG_PREFIX)


def fold_model_args(values: dict) -> dict:
    """`model_args.NAME` keys gathered into the model_args mapping, over any that `values` holds."""
    dotted = {k[len(MODEL_ARG_PREFIX):]: v for k, v in values.items() if is_model_arg_key(k)}
    plain = {k: v for k, v in values.items() if not is_model_arg_key(k)}
    return merge_config_values(plain, {"model_args": dotted}) if dotted else plain


def merge_config_values(base: dict, top: dict) -> dict:
    """`top` over `base`, argument by argument for model_args (a flag's l1 keeps a file's l2)."""
    out = {**base, **top}
    if "model_args" in base and "model_args" in top:
        out["model_args"] = {**(base["model_args"] or {}), **(top["model_args"] or {})}
    return out


def _is_plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


WORKER_RANGE_RULE = "give a number of workers, or a range MIN-MAX of whole numbers with 1 <= MIN <= MAX (e.g. 2-8)"


def is_worker_range(value: Any) -> bool:
    return isinstance(value, str) and "-" in value.strip()[1:]


def split_worker_range(values: dict, what: str) -> dict:
    """`num_workers: "2-8"` -> num_workers 8, min_workers 2 (an elastic run); other values unchanged."""
    value = values.get("num_workers")
    if not is_worker_range(value):
        return values
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"{what} {value!r}: {WORKER_RANGE_RULE}")
    if values.get("min_workers") is not None:  # given beside the range in the same place: which one counts?
        other = "--min-workers" if what.startswith("--") else "min_workers"
        raise ConfigError(f"{what} {value!r} with {other} {values['min_workers']}: the range already sets the "
                          f"fewest workers ({match.group(1)}); give the range alone")
    return {**values, "num_workers": int(match.group(2)), "min_workers": int(match.group(1))}


def check_folder_name(name: Any, what: str) -> str:
    """One rule for every name that becomes a folder (a run's, a study's): visible text, no path."""
    if (not isinstance(name, str) or not name.strip() or name != name.strip() or "/" in name or "\\" in name
            or name.startswith(".") or not name.isprintable()):
        raise ConfigError(f"{what} {name!r} must be a plain folder name (visible text without spaces around "
                          f"it, no '/' or '\\', not starting with '.')")
    return name


def host_port(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a 'host:port' cluster address with a port in 1-65535, else None."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_address(address: str, flag: str = "--address") -> str:
    """'auto' or the head's host:port, for a run or a study. Not Ray Client (ray://): the driver writes
    the run's config and reads its results where it runs, so it runs on the cluster (ray job submit)."""
    if "://" in address:
        raise ConfigError(f"{flag} {address}: Ray Client addresses are not supported; run on the head node "
                          f"(ray attach, or ray job submit) with {flag} auto, or give the head's host:port")
    if address != "auto" and host_port(address) is None:
        raise ConfigError(f"{flag} {address!r} is not a cluster address; expected 'auto' or the head node's "
                          f"host:port with a port in 1-65535 (e.g. 10.0.0.10:6379)")
    return address


def require_package(module: str, flag: str) -> None:
    """A flag that needs an optional package: one ConfigError naming how to install it, before any cluster."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} needs the {module} package: pip install {module}")


def lr_scale(cfg: TrainConfig, global_batch: int) -> float:
    """The factor --lr is multiplied by at this global batch (--lr-scaling): the training loop's peak LR is
    cfg.lr * lr_scale(cfg, global batch), and every figure that states a peak LR computes it here."""
    if cfg.lr_scaling == "none":
        return 1.0
    if cfg.lr_scaling == "per_worker":  # one worker's batch (with its accumulation) gets --lr as it is
        return global_batch / cfg.batch_size
    return global_batch / 256


def metric_mode(metric: str) -> str:
    """Which way a reported metric is better: losses lower ("min"), accuracies higher ("max")."""
    return "min" if metric.endswith("loss") else "max"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (YAML itself keeps the last one, silently)."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes for every file and value raydist reads:
    - numbers as YAML 1.2 writes them: `1e-3` is a float (YAML 1.1, which PyYAML follows, wants `1.0e-3` and
      reads `1e-3` as text, so one study file accepted `5e-4` for a fixed value and refused it as a bound);
    - a key given twice in one mapping is an error naming it (YAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges a mapping whose keys this one may override
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    lines = sorted({seen[key] + 1, key_node.start_mark.line + 1})
                    where = f"lines {lines[0]} and {lines[1]}" if len(lines) == 2 else f"line {lines[0]}"
                    raise DuplicateKeyError(f"key {key!r} is given twice ({where}); keep one")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_FLOAT_TAG = "tag:yaml.org,2002:float"
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml_text(text):
    """YAML text (or an open file) read with YamlLoader."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def read_yaml_mapping(path: str, kind: str, holds: str) -> dict:
    """A YAML file holding a mapping ({} when empty); any problem is a one-line ConfigError naming the file."""
    try:
        with open(os.path.expanduser(path)) as fh:
            data = load_yaml_text(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} {path}: {exc.strerror or exc}") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{kind} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{kind} {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path} must hold a mapping of {holds}, got {type(data).__name__}")
    return data


def load_yaml(path: str) -> dict:
    """Read a YAML mapping of config fields, checked against TrainConfig."""
    return _coerce_all(read_yaml_mapping(path, "config file", "config keys"), path)


# ------------------------------------------------------------------------------------------------
# CLI: flags generated from the dataclass, grouped as the dataclass is.

class _Parser(argparse.ArgumentParser):
    """Every raydist command's parser: one-line errors (exit 2, like ConfigError), and a description kept
    as written (what the command does, then an example), not re-wrapped."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line and exit 2, like ConfigError
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        """argparse's help with the description first: what the command does before how to type it."""
        formatter = self._get_formatter()
        formatter.add_text(self.description)
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        for group in self._action_groups:
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each flag's default added to its help, unless the help already says its
    default in its own words ("default: the study's"), which argparse would follow with "(default: None)"."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


TRAIN_DESCRIPTION = """\
Train one image classifier with PyTorch DDP on a Ray cluster: N workers (GPUs or CPUs, one machine or many),
a line per epoch, checkpoints, model_final.pt and curves.png in the run folder. Without --address it starts
a local cluster itself.

example:
  python -m raydist.train --dataset cifar10 --data-dir ~/data --download --model resnet18 --num-workers 4 --use-gpu"""


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from raydist.data.registry import DATASETS
    from raydist.models import MODELS

    registry_choices = {"dataset": sorted(DATASETS), "model": sorted(MODELS)}
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--config FILE.yaml] [FLAG VALUE ...]   (every flag is below)")
    parser.add_argument("--preset", metavar="NAME",
                        help="start from a workflow's settings (dli, horovod-resnet18, workload, "
                             "cifar100-resnet50; --preset list says what each reproduces); --config files and "
                             "flags override it")
    parser.add_argument("--config", metavar="FILE.yaml", action="append",
                        help="YAML file of config keys used as defaults; flags override (repeatable: later files "
                             "override earlier ones)")
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        kind, _ = _base_type(f.name)
        if kind is dict:  # --model-arg NAME=VALUE, repeatable (parse_cli folds them into model_args)
            groups[f.metadata["group"]].add_argument("--model-arg", dest="model_arg", action="append",
                                                     metavar="NAME=VALUE", help=f.metadata["help"])
            continue
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        choices = f.metadata["choices"] or registry_choices.get(f.name)
        if choices and f.name in registry_choices:
            help_text += "; one of: " + ", ".join(choices)
        group = groups[f.metadata["group"]]
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            # Registry names are checked in validate() so the error lists them in one line.
            group.add_argument(_flag(f.name), dest=f.name, type=_cli_type(f.name, kind), help=help_text,
                               metavar=("N|MIN-MAX" if f.name == "num_workers" else kind.__name__.upper())
                               if not f.metadata["choices"] else None,
                               choices=f.metadata["choices"])
    return parser


def _cli_type(name: str, kind: type):
    def convert(text: str):
        if name == "num_workers" and is_worker_range(text):
            return text  # a range: split_worker_range reads it (and names a bad one) in resolve()
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    convert.__name__ = kind.__name__
    return convert


def resolve(explicit: dict, config_files=None, base: Optional[dict] = None) -> TrainConfig:
    """Layer the sources: dataclass defaults < base (a resumed run's config) < YAML files, in order <
    explicit flags. A bad value from a file is named by its file and key, not by a flag never typed."""
    if isinstance(config_files, str):
        config_files = [config_files]
    values: dict = {}
    origin: dict = {}  # field -> the file that set it
    if base:
        values.update(_coerce_all(base, "resumed config"))
    for path in config_files or []:
        from_file = split_worker_range(load_yaml(path), f"{path}: num_workers")  # a range from a --config file
        if "num_workers" in from_file and "min_workers" not in from_file:
            values.pop("min_workers", None)  # a plain number over an earlier range: a fixed group
        values = merge_config_values(values, from_file)
        origin.update(dict.fromkeys(from_file, path))
    if "num_workers" in explicit and "min_workers" not in explicit:
        values.pop("min_workers", None)  # --num-workers N is a fixed group, whatever a file or a resumed run said
    # (with --resume the run's own settings are not read yet: this check runs again once they are)
    for name in ("wandb_project", "wandb_id"):
        if explicit.get(name) is not None and not (explicit.get("wandb") or values.get("wandb")) \
                and not explicit.get("resume"):
            raise ConfigError(f"{_flag(name)} {explicit[name]} without --wandb: nothing would be logged to W&B; add "
                              f"--wandb, or drop {_flag(name)}")
    values = merge_config_values(values, split_worker_range(explicit, "--num-workers"))
    for name in explicit:
        origin.pop(name, None)
    try:
        return TrainConfig(**values).validate()
    except ConfigError as exc:
        raise ConfigError(_name_the_file(str(exc), origin)) from None


def _name_the_file(message: str, origin: dict) -> str:
    """'--lr must be positive' -> 'a.yaml: lr must be positive' when a.yaml set lr."""
    flag = re.match(r"--([a-z0-9-]+)", message)
    name = flag.group(1).replace("-", "_") if flag else None
    if name in origin:
        return f"{origin[name]}: {name}{message[flag.end():]}"
    return message


def parse_cli(argv: Optional[list[str]] = None, prog: str = "raydist.train",
              description: str = TRAIN_DESCRIPTION) -> tuple[TrainConfig, dict, list[str]]:
    """Parse flags into a validated TrainConfig; also return the explicitly given values and the --config files."""
    parser = build_parser(prog, description)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config_files = args.pop("config", None) or []
    preset = args.pop("preset", None)
    if preset is not None:
        from raydist import presets

        if preset == "list":
            print(presets.listing())
            sys.exit(0)
        config_files = [presets.path(preset)] + config_files  # the first file: --config files override it
    if "model_arg" in args:
        args["model_args"] = parse_model_args(args.pop("model_arg"))
    return resolve(args, config_files), args, config_files


def parse_model_args(items: list[str]) -> dict:
    """--model-arg NAME=VALUE ...: values read as YAML scalars (64 an int, 0.3 a float, true a bool)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-arg {item!r} must look like NAME=VALUE, e.g. --model-arg l1=64")
        try:
            value = load_yaml_text(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if not _is_plain(value):
            value = text  # a list, a date or an empty value: the builder's check names it as typed
        out[key] = value
    return out


def input_side(cfg: TrainConfig) -> int:
    """The side in pixels of the images the model reads."""
    if cfg.input_size:
        return cfg.input_size
    return cfg.fake_image_size if cfg.dataset == "fake" else DATASETS[cfg.dataset].image_size


def backbone_lr_mult(cfg: TrainConfig) -> float:
    if cfg.backbone_lr_mult is not None:
        return cfg.backbone_lr_mult
    return 0.1 if cfg.finetune == "lp-ft" else 1.0
