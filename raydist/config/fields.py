"""The typed training config: every knob with its unit and default, its validation, and the CLI built from it.

`TrainConfig` is the single source for `python -m raydist.train`'s flags (grouped: data, model,
optimization, schedule, scaling, output), for what is checked before any cluster starts, for what is
saved beside every run and inside every checkpoint, and for the fields a Tune study may search.

    cfg = parse_cli(["--epochs", "5", "--lr", "0.2"])     # defaults < --preset < --config YAML < flags
"""

from __future__ import annotations

import dataclasses
import datetime
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from raydist.config.values import (
    fold_model_args,
    is_model_arg_key,
    is_plain_value,
    is_worker_range,
    saved_config_values,
    split_worker_range,
)
from raydist.config.yaml_files import read_yaml_mapping
from raydist.errors import ConfigError

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
                          "folder, crop for digits, which a mirror changes, else crop_flip), none, crop (pad-4 "
                          "crop), crop_flip (pad-4 crop + flip), resized_crop (ImageNet's "
                          "random-resized crop, 8-100%% of the area, + flip) or dli (flip, rotation 10 deg, shear "
                          "10 deg, scale 0.8-1.2, colour jitter 0.2); randaugment (2 ops at magnitude bin 9 of 31) or "
                          "trivialaugment (1 op at a random bin) per image, after auto's crop",
                          ("auto", "none", "crop", "crop_flip", "resized_crop", "dli", "randaugment", "trivialaugment"))
    random_erase: float = _field("data", 0.0, "share of training images, in [0, 1], that get one random "
                                 "rectangle (2-33%% of the area) replaced by noise (0: none)")
    tta: bool = _field("data", False, "also evaluate each validation image averaged with its mirror (runs whose "
                       "training augmentation mirrors): val_acc_tta and val_loss_tta beside the plain metrics")
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
                                       "128, 224 for ImageNet models on 32x32 data); default: the data's own size "
                                       "(digits: 16, twice its 8x8 scans, except for the _imagenet models and "
                                       "models that read 32)")
    normalize: str = _field("data", "dataset", "per-channel normalisation of the model's input: dataset (the data "
                            "set's own mean and std) or 0.5 (mean 0.5, std 0.5: pixels to [-1, 1], as the DLI "
                            "notebook's Normalize((0.5,)*3, (0.5,)*3))", ("dataset", "0.5"))

    # ---- model ------------------------------------------------------------------------------
    model: str = _field("model", "resnet8", "a built-in model (one of the names below), or timm:NAME for any "
                        "timm architecture (pip install \"raydist[timm]\"; drop_rate, drop_path_rate, img_size as "
                        "--model-arg)")
    model_args: dict = field(default_factory=dict, metadata={
        "group": "model", "choices": None,
        "help": "the model's own arguments, e.g. --model-arg l1=64 --model-arg l2=16 for tune_cnn, depth=28 widen=10 "
                "for wrn (repeatable; YAML: model_args: {l1: 64}; a study searches model_args.l1); checked against "
                "the model's builder, saved with its weights"})
    pretrained: bool = _field("model", False, "start from published ImageNet weights (resnet18_imagenet, "
                              "resnet50_imagenet: torchvision's cache under $TORCH_HOME; timm:NAME: timm's Hugging "
                              "Face cache under $HF_HOME; downloaded once if missing)")
    weights: Optional[str] = _field("model", None, "start from the weights in this file: a state dict, a "
                                    "torchvision weights file, a .safetensors file, or a raydist checkpoint.pt / "
                                    "model_final.pt / best_model.pt (local path or URI); the head is new")
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
    precise_bn: int = _field("model", 4, "before each evaluation, re-estimate BatchNorm's running statistics for "
                             "the current weights from this many training batches per worker (0: keep the running "
                             "averages, which lag behind the weights at a high LR)")
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
    mixup: float = _field("optimization", 0.0, "mixup: blend each training image with another of its batch by a "
                          "share drawn from Beta(A, A), the loss against both labels by the same shares (0: off)")
    cutmix: float = _field("optimization", 0.0, "cutmix: paste a rectangle of another image of the batch, of a "
                           "share of the area drawn from Beta(A, A) (0: off; with --mixup, each mixed image one of "
                           "the two at even odds)")
    mix_prob: float = _field("optimization", 1.0, "with --mixup/--cutmix: the share of training images mixed, in "
                             "(0, 1] (no effect without them: a study may search it beside a mixup range from 0)")
    clip_grad_norm: float = _field("optimization", 0.0, "clip the gradients' global L2 norm to this before each "
                                   "update (0: no clipping; fp16's loss scale is taken off first); history.jsonl "
                                   "then has grad_norm, the mean norm before clipping")
    ema: float = _field("optimization", 0.0, "keep an exponential moving average of the weights with this decay "
                        "per update, in [0, 1) (e.g. 0.99; 0: none); the average is what is evaluated, kept and "
                        "saved as the model, the live weights train on")
    batch_size: int = _field("optimization", 64, "images per worker per step (global batch = this x workers x grad-accum)")
    val_batch_size: Optional[int] = _field("optimization", None, "images per worker per validation step "
                                           "(default: 2 x --batch-size; evaluation keeps no gradients)")
    grad_accum: int = _field("optimization", 1, "steps accumulated per optimizer update; the allreduce runs on the last only")
    precision: str = _field("optimization", "auto", "auto (bf16 autocast on GPUs that compute it natively, "
                            "compute capability 8.0+; fp16 with a grad scaler on older ones; fp32 on CPU), "
                            "fp32, bf16, fp16",
                            ("auto", "fp32", "bf16", "fp16"))
    fp16_allreduce: bool = _field("optimization", False, "compress gradients to 16 bits for the allreduce: fp16 "
                                  "when the loss is scaled (--precision fp16, or auto on GPUs before compute "
                                  "capability 8.0), else bf16 (fp32's range: unscaled small gradients would "
                                  "underflow in fp16)")

    # ---- schedule ---------------------------------------------------------------------------
    epochs: int = _field("schedule", 15, "training epochs (passes over the training set); on the command line "
                         "digits defaults to 30")
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
    wait_for_workers_s: float = _field("scaling", 900.0, "on an autoscaling cluster, the most seconds to wait for "
                                       "the nodes the workers need (an elastic run: its minimum) before giving up "
                                       "in one line naming what never came; 0: give up at once")

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

    def starts_pretrained(self) -> bool:
        """A transfer run (--pretrained or --weights): its optimizer keeps a group pair per unit."""
        return bool(self.pretrained or self.weights)

    def input_channels(self) -> int:
        """Image channels the model reads: 1 when grey data is fed as one channel (--grey-input sum/reinit)."""
        return 3 if self.grey_input == "replicate" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        """Build from a mapping (YAML file, checkpoint, Tune sample), checking keys and value types."""
        return cls(**coerce_values(values, source))

    @classmethod
    def from_saved(cls, values: dict, *, source: str = "saved config") -> "TrainConfig":
        """A config saved with a run (config.yaml, a checkpoint, a model file), as it trained (saved_config_values)."""
        return cls.from_dict(saved_config_values(values), source=source)


# ------------------------------------------------------------------------------------------------
# Types and coercion: YAML and Tune hand us ints for floats, strings for numbers, and so on.

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def base_type(name: str) -> tuple[type, bool]:
    """(scalar type, optional?) of a config field."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], True
    return hint, False


def coerce_value(name: str, value: Any, source: str) -> Any:
    kind, optional = base_type(name)
    if kind is dict:  # model_args: names -> plain values (the model's builder checks them in validate)
        if value is None:
            return {}
        if isinstance(value, dict):  # numpy scalars (a searcher's samples) as Python numbers
            value = {k: v.item() if hasattr(v, "item") and not is_plain_value(v) else v for k, v in value.items()}
        if not isinstance(value, dict) or not all(isinstance(k, str) and is_plain_value(v) for k, v in value.items()):
            raise ConfigError(f"{source}: {name} = {value!r} must be a mapping of argument names to numbers, "
                              f"booleans or text, e.g. {{l1: 64, l2: 16}}")
        return dict(value)
    if name == "num_workers" and is_worker_range(value):  # coerce_values splits a range before it gets here
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


def coerce_values(values: dict, source: str) -> dict:
    """Checked config values; `model_args.NAME` keys (a study's, --model-arg's) folded into model_args."""
    unknown = sorted(k for k in set(values) - set(FIELDS) if not is_model_arg_key(k))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(FIELDS)}")
    values = fold_model_args(split_worker_range(values, f"{source}: num_workers"))
    return {k: coerce_value(k, v, source) for k, v in values.items()}


def load_yaml(path: str) -> dict:
    """Read a YAML mapping of config fields, checked against TrainConfig."""
    return coerce_values(read_yaml_mapping(path, "config file", "config keys"), path)
