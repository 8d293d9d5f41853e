"""The checks before any cluster starts that need the data sets, image folders or models: a TrainConfig
as the commands build it, checked whole (`validate`), each bad value named in one line (ConfigError, exit
code 2) with what is accepted. The field-level checks that need nothing but the values are
TrainConfig's own (raydist.config.fields)."""

from __future__ import annotations

import dataclasses
import math
import re

from raydist.config.fields import MIN_MICRO_BATCH, TrainConfig
from raydist.config.values import WORKER_RANGE_RULE, check_address, check_folder_name, flag_name
from raydist.errors import ConfigError, first_line


def validate(cfg: TrainConfig) -> TrainConfig:
    """`cfg` itself when every value is usable; else ConfigError naming the first bad value and what is
    accepted. Loads the data and model registries (and so torch) only here, not at import."""
    _check_names(cfg)
    _check_model_args(cfg)
    _check_numbers(cfg)
    _check_elastic(cfg)
    _check_model_parallel(cfg)
    _check_ranges(cfg)
    _check_data_source(cfg)
    _check_transfer(cfg)
    _check_sizes(cfg)
    _check_devices_and_names(cfg)
    return cfg


def _check_names(cfg: TrainConfig) -> None:
    """Every choice among its choices, the data set and model among the registered ones, a W&B id."""
    from raydist.data.registry import DATASETS
    from raydist.models.registry import model_spec

    for f in dataclasses.fields(cfg):
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{flag_name(f.name)} {getattr(cfg, f.name)!r} is not one of: {', '.join(choices)}")
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    try:
        model_spec(cfg.model)
    except ValueError as exc:  # an unknown name, or timm:NAME without timm
        raise ConfigError(str(exc)) from None
    if cfg.wandb_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(cfg.wandb_id)):
        raise ConfigError(f"--wandb-id {cfg.wandb_id!r}: W&B run ids are 1-64 letters, digits, - and _")


def _check_numbers(cfg: TrainConfig) -> None:
    for name in ("lr", "batch_size", "epochs", "grad_accum", "num_workers", "cpus_per_worker",
                 "fake_image_size", "fake_num_classes", "fake_train_size", "fake_val_size",
                 "patience", "keep_checkpoints", "lr_step_epochs", "unfreeze_every", "freeze_epochs",
                 "train_fraction", "train_per_class", "input_size", "backbone_lr_mult", "val_batch_size",
                 "model_parallel", "micro_batches"):
        value = getattr(cfg, name)
        if value is None and name in ("train_per_class", "input_size", "backbone_lr_mult", "val_batch_size"):
            continue
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{flag_name(name)} must be positive, got {value!r}")
    for name in ("momentum", "weight_decay", "warmup_epochs", "checkpoint_every", "max_failures",
                 "gpus_per_worker", "lr_step_gamma", "wait_for_workers_s", "precise_bn",
                 "clip_grad_norm", "mixup", "cutmix"):
        value = getattr(cfg, name)
        if not value >= 0 or not math.isfinite(value):
            raise ConfigError(f"{flag_name(name)} must be zero or more, got {value!r}")


def _check_ranges(cfg: TrainConfig) -> None:
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"--momentum must be in [0, 1) (SGD momentum; AdamW's beta1), got {cfg.momentum!r}")
    if cfg.val_fraction is not None and not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction!r}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing!r}")
    if not 0.0 < cfg.mix_prob <= 1.0:
        raise ConfigError(f"--mix-prob must be a share of the training images in (0, 1], got {cfg.mix_prob!r}")
    if not 0.0 <= cfg.random_erase <= 1.0:
        raise ConfigError(f"--random-erase must be a share of the training images in [0, 1], got {cfg.random_erase!r}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"--ema must be a decay in [0, 1) (0: no average), got {cfg.ema!r}")
    if cfg.target_accuracy is not None and not 0.0 < cfg.target_accuracy <= 1.0:
        raise ConfigError(f"--target-accuracy must be in (0, 1], got {cfg.target_accuracy!r}")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs} exceeds --epochs {cfg.epochs}")
    if cfg.schedule_epochs is not None and cfg.schedule_epochs < cfg.epochs:
        raise ConfigError(f"--schedule-epochs {cfg.schedule_epochs} is below --epochs {cfg.epochs}: the last "
                          f"epochs would train at LR 0; use at least {cfg.epochs} (or leave it unset)")


def _check_data_source(cfg: TrainConfig) -> None:
    from raydist.data.augment import augment_kind, mirrors

    if cfg.tta and not mirrors(cfg.augment, cfg.dataset):
        raise ConfigError(f"--tta averages each image with its mirror, which a model trained under --augment "
                          f"{cfg.augment} ({augment_kind(cfg.augment, cfg.dataset)} on {cfg.dataset}) never sees; "
                          f"train with an augmentation that mirrors (crop_flip, resized_crop, dli) or drop --tta")
    if cfg.dataset == "folder":
        _check_folder(cfg)
    elif cfg.max_bad_images is not None:
        raise ConfigError(f"--max-bad-images {cfg.max_bad_images} applies to --dataset folder only")
    elif cfg.data_loader != "auto":
        raise ConfigError(f"--data-loader {cfg.data_loader} applies to --dataset folder only (the other data "
                          f"sets are held in memory)")


def _check_sizes(cfg: TrainConfig) -> None:
    """A step's images within the training set, and a validation set that is not empty."""
    from raydist.data.sizes import class_list, train_size, val_size

    items = train_size(cfg.dataset, val_fraction=cfg.val_fraction, fake_train_size=cfg.fake_train_size,
                       classes=class_list(cfg), train_fraction=cfg.train_fraction,
                       train_per_class=cfg.train_per_class, data_dir=cfg.data_dir)
    if cfg.is_elastic() and cfg.global_batch_at(cfg.num_workers) > items:
        raise ConfigError(f"a global batch of {cfg.global_batch_at(cfg.num_workers)} images per step is more than "
                          f"the {items} training images of {cfg.dataset}; give --global-batch {items} or less")
    if not cfg.is_elastic() and cfg.num_workers * cfg.batch_size > items:
        # Each rank must hold a full batch: a smaller one would train with a batch (and so an LR scale)
        # other than the one asked for, and ranks could end up with unequal step counts (DDP hangs).
        raise ConfigError(f"--batch-size {cfg.batch_size} x --num-workers {cfg.num_workers} = "
                          f"{cfg.num_workers * cfg.batch_size} images per step, but {cfg.dataset} has "
                          f"{items} training images; at most {items // cfg.num_workers} per worker with "
                          f"{cfg.num_workers} workers")
    if val_size(cfg.dataset, val_fraction=cfg.val_fraction, fake_val_size=cfg.fake_val_size,
                classes=class_list(cfg), data_dir=cfg.data_dir) == 0:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} leaves no validation image of {cfg.dataset}"
                          f"{' in --classes ' + cfg.classes if cfg.classes else ''}; give a larger share")


def _check_devices_and_names(cfg: TrainConfig) -> None:
    from raydist.models.registry import MODELS, model_spec

    if cfg.use_gpu is not False and not float(cfg.gpus_per_worker).is_integer():
        raise ConfigError(f"--gpus-per-worker {cfg.gpus_per_worker:g}: each DDP rank needs a GPU of its own "
                          f"(NCCL refuses two ranks on one GPU); use a whole number, usually 1")
    if cfg.use_gpu and cfg.gpus_per_worker <= 0:
        raise ConfigError(f"--gpus-per-worker must be positive with --use-gpu, got {cfg.gpus_per_worker!r}")
    if cfg.pretrained and not model_spec(cfg.model).pretrained_weights:
        with_weights = sorted(n for n, m in MODELS.items() if m.pretrained_weights)
        raise ConfigError(f"--pretrained: model {cfg.model!r} has no published weights; models with them: "
                          f"{', '.join(with_weights)} and the timm models timm.list_models(pretrained=True) names")
    if cfg.name is not None:
        check_folder_name(cfg.name, "--name")
    if cfg.address is not None:
        check_address(cfg.address)
    if cfg.fake_num_classes < 2:
        raise ConfigError(f"--fake-num-classes must be at least 2 (a classifier needs 2 classes), "
                          f"got {cfg.fake_num_classes}")
    if not 8 <= cfg.fake_image_size <= 1024:
        raise ConfigError(f"--fake-image-size {cfg.fake_image_size} must be between 8 and 1024 pixels")
    cfg.milestone_list()  # raises on a bad --lr-milestones
    if cfg.lr_milestones is not None and cfg.lr_schedule != "step":
        raise ConfigError(f"--lr-milestones {cfg.lr_milestones} applies to --lr-schedule step, not "
                          f"{cfg.lr_schedule}")
    if not 0.0 < cfg.lr_step_gamma <= 1.0:
        raise ConfigError(f"--lr-step-gamma must be in (0, 1] (the LR factor at each step drop), "
                          f"got {cfg.lr_step_gamma!r}")


def _check_model_args(cfg: TrainConfig) -> None:
    """--model-arg against the builder's signature (types converted), the builder's own checks run on
    the meta device (no memory, no time), and the image side a fixed-size network accepts."""
    import torch

    from raydist.data.sizes import input_side
    from raydist.errors import ModelArgError
    from raydist.models.registry import check_model_args, model_spec
    from raydist.models.timm_models import is_timm

    try:
        cfg.model_args = check_model_args(cfg.model, cfg.model_args)
    except ModelArgError as exc:
        raise ConfigError(str(exc)) from None
    if is_timm(cfg.model):
        _check_timm_model(cfg, input_side(cfg))
    elif cfg.model_args:
        try:
            with torch.device("meta"):
                model_spec(cfg.model).builder(num_classes=2, **cfg.model_args)
        except ValueError as exc:
            args = " ".join(f"--model-arg {k}={v}" for k, v in cfg.model_args.items())
            raise ConfigError(f"{args}: {exc}") from None
    sides = model_spec(cfg.model).input_sides
    if sides:
        side = input_side(cfg)
        if not sides[0] <= side <= sides[1]:
            raise ConfigError(f"--model {cfg.model} reads images of {sides[0]} to {sides[1]} pixels a side, but "
                              f"this run feeds it {side}: give --input-size 32 (or another model)")


def _check_timm_model(cfg: TrainConfig, side: int) -> None:
    """A timm model is built and fed one image of the run's side on the meta device (no memory, no time):
    an argument the architecture does not take, or a side it cannot read (a ViT's fixed position table),
    is one line here instead of a traceback on every worker."""
    import torch

    from raydist.models.registry import model_spec

    named = " ".join([f"--model {cfg.model}"] + [f"--model-arg {k}={v}" for k, v in cfg.model_args.items()])
    try:
        with torch.device("meta"):
            net = model_spec(cfg.model).builder(num_classes=2, **cfg.model_args)
    except Exception as exc:  # noqa: BLE001 - timm raises TypeError, ValueError, AssertionError alike
        raise ConfigError(f"{named}: timm cannot build it ({first_line(exc, 200)})") from None
    from raydist.models.timm_models import head_names

    if not head_names(net):
        raise ConfigError(f"--model {cfg.model} has no classifier head (a feature encoder): pick a classifier "
                          f"architecture")
    if cfg.grey_input != "replicate" and not any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        raise ConfigError(f"--grey-input {cfg.grey_input}: --model {cfg.model} has no convolution that reads the "
                          f"image to adapt; use --grey-input replicate")
    try:
        with torch.device("meta"), torch.no_grad():
            net.eval()(torch.empty(1, 3, side, side))
    except NotImplementedError:  # an operation without a meta kernel: the workers will tell
        return
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--model {cfg.model} cannot read images of {side} pixels a side ({first_line(exc, 200)}); "
                          f"give --input-size with a side it reads, or --model-arg img_size={side} for an "
                          f"architecture that takes it") from None


def _check_elastic(cfg: TrainConfig) -> None:
    """--num-workers MIN-MAX and the settings that only an elastic run reads."""
    if cfg.min_workers is not None and not 1 <= cfg.min_workers <= cfg.num_workers:
        raise ConfigError(f"--num-workers {cfg.min_workers}-{cfg.num_workers}: {WORKER_RANGE_RULE}")
    if not cfg.is_elastic():
        if cfg.global_batch is not None or cfg.elastic_batch != "global":
            what = "--global-batch" if cfg.global_batch is not None else f"--elastic-batch {cfg.elastic_batch}"
            raise ConfigError(f"{what} applies to an elastic run only (--num-workers MIN-MAX, e.g. 2-8); this "
                              f"one has a fixed {cfg.num_workers} worker(s)")
        return
    if cfg.global_batch is not None:
        if cfg.elastic_batch == "per_worker":
            raise ConfigError(f"--global-batch {cfg.global_batch} fixes the global batch, which --elastic-batch "
                              f"per_worker lets grow and shrink with the workers; give one of the two")
        if cfg.global_batch < MIN_MICRO_BATCH * cfg.num_workers:
            raise ConfigError(f"--global-batch {cfg.global_batch} gives some of the {cfg.num_workers} workers "
                              f"fewer than {MIN_MICRO_BATCH} images a step (BatchNorm needs more than one); give "
                              f"at least {MIN_MICRO_BATCH * cfg.num_workers}")
    if cfg.batch_size < MIN_MICRO_BATCH:
        raise ConfigError(f"--batch-size {cfg.batch_size}: an elastic run feeds each worker at least "
                          f"{MIN_MICRO_BATCH} images at a time (BatchNorm needs more than one); give "
                          f"{MIN_MICRO_BATCH} or more")
    if not cfg.resize_check_s > 0 or not math.isfinite(cfg.resize_check_s):
        raise ConfigError(f"--resize-check-s must be positive, got {cfg.resize_check_s!r}")
    if cfg.preemption_check_every < 0:
        raise ConfigError(f"--preemption-check-every must be 0 (automatic) or more steps, got "
                          f"{cfg.preemption_check_every}")
    if cfg.max_preemptions < -1:
        raise ConfigError(f"--max-preemptions must be -1 (unlimited) or zero or more, got {cfg.max_preemptions}")
    if cfg.dataset == "folder" and cfg.data_loader == "stream":
        raise ConfigError(f"--num-workers {cfg.workers_text()}: an elastic run holds its image folder in memory; "
                          f"--data-loader stream is for fixed worker counts (give one number, or "
                          f"--data-loader memory)")


def _check_model_parallel(cfg: TrainConfig) -> None:
    """--model-parallel K and --micro-batches M: stages on the worker's K GPUs, its batch in M parts."""
    if cfg.model_parallel == 1:
        if cfg.micro_batches != 1 or cfg.pipeline_balance != "params":
            what = (f"--micro-batches {cfg.micro_batches}" if cfg.micro_batches != 1
                    else f"--pipeline-balance {cfg.pipeline_balance}")
            raise ConfigError(f"{what} pipelines a model split over devices; give --model-parallel 2 or more too")
        whole = float(cfg.gpus_per_worker).is_integer()  # a fraction, 0: refused with their own reasons
        if cfg.use_gpu is not False and whole and cfg.gpus_per_worker > 1:
            # Each DDP rank trains on one GPU: a second one per worker would be reserved and sit idle.
            k = f"{cfg.gpus_per_worker:g}"
            raise ConfigError(f"--gpus-per-worker {k}: a worker trains on one GPU unless its model is split over "
                              f"several; give --gpus-per-worker 1 (more GPUs: more --num-workers), or "
                              f"--model-parallel {k} to split the model over {k} GPUs")
        return
    if cfg.use_gpu is not False and cfg.gpus_per_worker != cfg.model_parallel:
        raise ConfigError(f"--model-parallel {cfg.model_parallel} places a stage on each of a worker's GPUs: "
                          f"give --gpus-per-worker {cfg.model_parallel} (got {cfg.gpus_per_worker:g}), or "
                          f"--no-use-gpu to test the split on CPUs")
    if cfg.micro_batches > cfg.batch_size:
        raise ConfigError(f"--micro-batches {cfg.micro_batches} is more than the {cfg.batch_size} images of "
                          f"--batch-size; give at most {cfg.batch_size}")
    # torch.compile traces one module on one device; the pipeline's clock schedule of stages on several
    # devices is Python that a graph would have to keep in order (compiling each stage is not built).
    if cfg.compile:
        raise ConfigError(f"--compile with --model-parallel {cfg.model_parallel}: not supported (the pipeline "
                          f"runs its stages on several devices in a Python schedule); drop --compile, or give "
                          f"--model-parallel 1")
    # SyncBatchNorm's collectives in every layer of every micro-batch, from the autograd threads of a
    # worker's K devices at once: never run, so not offered (and on CPUs SyncBatchNorm does not run at all).
    if cfg.sync_batchnorm:
        raise ConfigError(f"--sync-batchnorm with --model-parallel {cfg.model_parallel}: not supported (its "
                          f"collectives in every layer from a worker's {cfg.model_parallel} devices at once are "
                          f"untested); drop --sync-batchnorm, or give --model-parallel 1")
    import torch

    from raydist.models.registry import create_model
    from raydist.models.timm_models import is_timm
    from raydist.parallel.pipeline import models_with_units, pipeline_units

    if is_timm(cfg.model):
        raise ConfigError(f"--model-parallel {cfg.model_parallel}: raydist splits only its own models into "
                          f"pipeline stages ({', '.join(models_with_units())}), not --model {cfg.model}")
    with torch.device("meta"):  # the model's units, without memory or time
        units = [name for name, _ in pipeline_units(create_model(cfg.model, num_classes=2, **cfg.model_args))]
    if cfg.model_parallel > len(units):
        raise ConfigError(f"--model-parallel {cfg.model_parallel}: --model {cfg.model} has {len(units)} pipeline "
                          f"units ({units[0]}..{units[-1]}), so at most {len(units)} stages")


def _check_folder(cfg: TrainConfig) -> None:
    """--dataset folder: --data-dir must be a folder of class folders (listed here, before any cluster)."""
    from raydist.data.sources import folder_index
    from raydist.errors import FolderError

    if cfg.download:
        raise ConfigError(f"--download fetches the published data sets; an image folder is read as it is "
                          f"from --data-dir {cfg.data_dir} (drop --download)")
    if cfg.data_loader == "stream" and (cfg.classes or cfg.train_fraction != 1.0 or cfg.train_per_class):
        raise ConfigError("--classes, --train-fraction and --train-per-class select images of a folder held in "
                          "memory; the streamed path reads the whole folder (use --data-loader memory)")
    if cfg.max_bad_images is not None and cfg.max_bad_images < 0:
        raise ConfigError(f"--max-bad-images must be zero or more, got {cfg.max_bad_images}")
    try:
        folder_index(cfg.data_dir, cfg.val_fraction)
    except FolderError as exc:
        raise ConfigError(str(exc)) from None


def _check_transfer(cfg: TrainConfig) -> None:
    from raydist.data.registry import DATASETS
    from raydist.data.sizes import class_list

    if cfg.pretrained and cfg.weights:
        raise ConfigError(f"--pretrained and --weights {cfg.weights} both name the starting weights; give one")
    if not cfg.starts_pretrained():
        if cfg.finetune != "full":
            raise ConfigError(f"--finetune {cfg.finetune} freezes pretrained layers, but this run starts from "
                              f"scratch; add --pretrained or --weights FILE (or use --finetune full)")
        if cfg.backbone_lr_mult is not None:
            raise ConfigError(f"--backbone-lr-mult {cfg.backbone_lr_mult:g} sets a pretrained backbone's LR, "
                              f"but this run starts from scratch; add --pretrained or --weights FILE")
    if cfg.finetune == "gradual" and cfg.unfreeze_every >= cfg.epochs:
        raise ConfigError(f"--unfreeze-every {cfg.unfreeze_every} with --epochs {cfg.epochs} never unfreezes "
                          f"a stage (that is --finetune linear); use at most {max(1, cfg.epochs - 1)}")
    if cfg.finetune == "lp-ft" and cfg.freeze_epochs >= cfg.epochs:
        raise ConfigError(f"--freeze-epochs {cfg.freeze_epochs} with --epochs {cfg.epochs} leaves no epoch "
                          f"to fine-tune in (that is --finetune linear); use at most {max(1, cfg.epochs - 1)}")
    if cfg.grey_input != "replicate" and not DATASETS[cfg.dataset].grey:
        grey = sorted(n for n, d in DATASETS.items() if d.grey)
        raise ConfigError(f"--grey-input {cfg.grey_input} feeds grey images as one channel; {cfg.dataset} is "
                          f"in colour (grey data sets: {', '.join(grey)})")
    if cfg.input_size is not None and not 8 <= cfg.input_size <= 1024:
        raise ConfigError(f"--input-size {cfg.input_size} must be between 8 and 1024 pixels")
    if cfg.dataset == "fake" and (cfg.classes or cfg.train_fraction != 1.0 or cfg.train_per_class):
        raise ConfigError("--classes, --train-fraction and --train-per-class select real images; fake data "
                          "has --fake-num-classes and --fake-train-size instead")
    if cfg.train_fraction > 1.0:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {cfg.train_fraction!r}")
    if cfg.train_fraction != 1.0 and cfg.train_per_class:
        raise ConfigError("--train-fraction and --train-per-class both shrink the training set; give one")
    class_list(cfg)  # raises on a bad --classes
