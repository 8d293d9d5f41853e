"""Study files: one declarative YAML per hyperparameter study, checked against TrainConfig before anything runs.

    from raydist.search_space import load_study
    study = load_study("search_spaces/digits_quick.yaml", overrides={"epochs": 3})
    study.tune_space()        # {"lr": tune.loguniform(...), ...}
    study.trial_config({"lr": 0.3, "batch_size": 64, "epochs": 6})   # a validated TrainConfig

A study file (every key but `searched` is optional):

    description: a line shown in --help listings and results
    metric: val_acc               # val_acc | val_loss | train_acc | train_loss
    mode: max                     # default: max for accuracies, min for losses
    num_samples: 8                # trials
    max_concurrent: null          # trials at once (default: as many as the cluster's free resources fit)
    search:    {algorithm: hyperopt, initial_points: 3, seed: 0}    # or algorithm: random
    scheduler: {type: asha, grace_period: 2, reduction_factor: 3}   # or type: fifo
    fixed:     {dataset: digits, model: resnet8, num_workers: 1}    # any TrainConfig field
    searched:                     # TrainConfig fields -> one distribution each
      lr:         {loguniform: [0.02, 2.0]}
      batch_size: {choice: [32, 64, 128]}
      epochs:     {randint: [3, 8]}            # integer bounds are inclusive
    points_to_evaluate: [{lr: 0.4, batch_size: 64, epochs: 8}]   # tried first

Distributions: uniform [low, high], loguniform [low, high], quniform / qloguniform [low, high, q],
randint [low, high], qrandint [low, high, q] (integers, both bounds inclusive), choice [values...].
Any problem is one ConfigError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from raydist.config import ConfigError, TrainConfig, _base_type, _coerce, _coerce_all, read_yaml_mapping

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "qrandint", "choice")
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
SEARCH_ALGORITHMS = ("hyperopt", "random")
SCHEDULERS = ("asha", "fifo")
# Set per trial by raydist.tune, so a study may not set them.
PER_TRIAL_FIELDS = ("address", "name", "storage_path", "log_dir", "resume")
TOP_LEVEL_KEYS = ("description", "metric", "mode", "num_samples", "max_concurrent", "search", "scheduler",
                  "fixed", "searched", "points_to_evaluate")
SEARCH_KEYS = ("algorithm", "initial_points", "seed")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor")


@dataclass(frozen=True)
class Distribution:
    """One searched dimension: `kind` is one of DISTRIBUTIONS; `args` are already coerced to the field's type."""
    kind: str
    args: tuple

    def to_tune(self):
        from ray import tune

        a = self.args
        if self.kind == "choice":
            return tune.choice(list(a))
        if self.kind == "randint":
            return tune.randint(a[0], a[1] + 1)  # Tune's upper bound is exclusive; ours is inclusive
        if self.kind == "qrandint":
            return tune.qrandint(a[0], a[1], a[2])  # inclusive in Tune too
        return getattr(tune, self.kind)(*a)

    def extremes(self) -> list:
        """Values that bound what a sample can be: both ends, or every choice."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.args))})"


@dataclass
class Study:
    path: str
    fixed: dict
    searched: dict  # field -> Distribution
    description: str = ""
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: Optional[int] = None
    search: str = "hyperopt"
    initial_points: int = 3
    seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0
    points_to_evaluate: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def max_epochs(self) -> int:
        """ASHA's max_t: the most epochs any trial can run."""
        if "epochs" in self.searched:
            return int(max(self.searched["epochs"].extremes()))
        return self.base_config().epochs

    def base_config(self) -> TrainConfig:
        return TrainConfig(**self.fixed)

    def trial_config(self, sample: dict) -> TrainConfig:
        """The validated TrainConfig of one trial: defaults < fixed < the sampled values."""
        values = {**self.fixed, **_coerce_all(sample, f"{self.path}: trial")}
        return TrainConfig(**values).validate()

    def tune_space(self) -> dict:
        return {name: dist.to_tune() for name, dist in self.searched.items()}

    def per_trial_resources(self, cluster_has_gpus: bool) -> tuple[float, float]:
        """(CPUs, GPUs) the largest trial asks for; use_gpu unset means GPUs when the cluster has them."""
        worst = (0.0, 0.0)
        for cfg in self._corner_configs():
            use_gpu = cluster_has_gpus if cfg.use_gpu is None else cfg.use_gpu
            gpus = cfg.num_workers * cfg.gpus_per_worker if use_gpu else 0.0
            worst = (max(worst[0], cfg.num_workers * cfg.cpus_per_worker), max(worst[1], gpus))
        return worst

    def _corner_configs(self):
        """Every searched field at each of its extremes, the others at their low end: enough to catch a
        bad bound (warmup longer than the shortest epochs, a batch size of 0) before any trial starts."""
        low = {name: dist.extremes()[0] for name, dist in self.searched.items()}
        yield TrainConfig(**{**self.fixed, **low})
        for name, dist in self.searched.items():
            for value in dist.extremes():
                yield TrainConfig(**{**self.fixed, **low, name: value})


def load_study(path: str, overrides: Optional[dict] = None) -> Study:
    """Read and check a study file; `overrides` fix config fields (searched ones become fixed)."""
    raw = read_yaml_mapping(path, "search space", "study keys (metric, fixed, searched, ...)")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(TOP_LEVEL_KEYS)}")
    if "searched" not in raw:
        raise ConfigError(f"{path}: no 'searched' section (config fields -> distributions)")

    fixed = _config_fields(path, "fixed", raw.get("fixed") or {})
    fixed = {k: _coerce(k, v, f"{path}: fixed.{k}") for k, v in fixed.items()}
    searched_raw = _config_fields(path, "searched", raw["searched"])
    if not searched_raw:
        raise ConfigError(f"{path}: 'searched' is empty; give at least one field and its distribution")
    both = sorted(set(fixed) & set(searched_raw))
    if both:
        raise ConfigError(f"{path}: {both[0]!r} is both fixed and searched; keep it in one section")
    searched = {name: _distribution(path, name, spec) for name, spec in searched_raw.items()}
    for name, value in _config_fields("--set", "", overrides or {}).items():  # fix a value, even a searched one
        searched.pop(name, None)
        fixed[name] = _coerce(name, value, f"--set {name}")

    study = Study(path=path, fixed=fixed, searched=searched, description=str(raw.get("description") or ""))
    _read_settings(study, raw)
    if not searched:
        raise ConfigError(f"{path}: --set fixed every searched field; nothing is left to search")
    try:
        for cfg in study._corner_configs():
            cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if study.scheduler == "asha" and study.grace_period > study.max_epochs:
        raise ConfigError(f"{path}: scheduler.grace_period {study.grace_period} exceeds the most epochs a trial "
                          f"can run ({study.max_epochs})")
    study.points_to_evaluate = [_point(path, i, p, study) for i, p in enumerate(raw.get("points_to_evaluate") or [])]
    return study


# ---- pieces ----------------------------------------------------------------------------------------


def _config_fields(path: str, section: str, values: Any) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: '{section}' must be a mapping of config fields, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_TRIAL_FIELDS]
    for key in values:
        where = f"{path}: {section}.{key}" if section else f"{path} {key}"
        if key in PER_TRIAL_FIELDS:
            raise ConfigError(f"{where} is set per trial by raydist.tune; remove it "
                              f"(use --storage-path / --address on the command line)")
        if key not in known:
            raise ConfigError(f"{where} is not a config field; known: {', '.join(known)}")
    return dict(values)


def _distribution(path: str, name: str, spec: Any) -> Distribution:
    where = f"{path}: searched.{name}"
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"{where} must be one distribution, e.g. {{loguniform: [0.01, 1.0]}}; "
                          f"known: {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a list, e.g. {kind}: {_EXAMPLES[kind]}")
    field_type, _ = _base_type(name)
    if kind == "choice":
        return Distribution(kind, tuple(_coerce(name, v, where) for v in args))

    arity = 3 if kind.startswith("q") else 2
    if len(args) != arity:
        raise ConfigError(f"{where}: {kind} takes {arity} numbers, e.g. {kind}: {_EXAMPLES[kind]}; got {args!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args):
        raise ConfigError(f"{where}: {kind} bounds must be finite numbers, got {args!r}")
    if field_type not in (int, float):
        raise ConfigError(f"{where}: {kind} needs a numeric field; {name} is {field_type.__name__} (use choice)")
    integer = kind in ("randint", "qrandint")
    if integer and not all(float(v).is_integer() for v in args):
        raise ConfigError(f"{where}: {kind} bounds must be integers, got {args!r}")
    if field_type is int and not integer:
        raise ConfigError(f"{where}: {name} is an integer; use randint, qrandint or choice, not {kind}")
    low, high = args[0], args[1]
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise ConfigError(f"{where}: {kind} needs low > 0, got {low}")
    if arity == 3 and not args[2] > 0:
        raise ConfigError(f"{where}: the step q must be positive, got {args[2]}")
    cast = int if integer else float
    return Distribution(kind, tuple(cast(v) for v in args))


_EXAMPLES = {"uniform": "[0.0, 0.3]", "loguniform": "[0.01, 1.0]", "quniform": "[0.0, 0.3, 0.05]",
             "qloguniform": "[0.01, 1.0, 0.01]", "randint": "[3, 10]", "qrandint": "[32, 256, 32]",
             "choice": "[32, 64, 128]"}


def _read_settings(study: Study, raw: dict) -> None:
    path = study.path
    study.metric = raw.get("metric", study.metric)
    if study.metric not in METRICS:
        raise ConfigError(f"{path}: metric {study.metric!r} is not one of: {', '.join(METRICS)}")
    study.mode = raw.get("mode", "min" if study.metric.endswith("loss") else "max")
    if study.mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode {study.mode!r} is not one of: max, min")
    study.num_samples = _positive_int(path, "num_samples", raw.get("num_samples", study.num_samples))
    if raw.get("max_concurrent") is not None:
        study.max_concurrent = _positive_int(path, "max_concurrent", raw["max_concurrent"])

    search = _section(path, "search", raw.get("search"), SEARCH_KEYS)
    study.search = search.get("algorithm", study.search)
    if study.search not in SEARCH_ALGORITHMS:
        raise ConfigError(f"{path}: search.algorithm {study.search!r} is not one of: {', '.join(SEARCH_ALGORITHMS)}")
    study.initial_points = _positive_int(path, "search.initial_points", search.get("initial_points", study.initial_points))
    study.seed = _int(path, "search.seed", search.get("seed", study.seed))

    scheduler = _section(path, "scheduler", raw.get("scheduler"), SCHEDULER_KEYS)
    study.scheduler = scheduler.get("type", study.scheduler)
    if study.scheduler not in SCHEDULERS:
        raise ConfigError(f"{path}: scheduler.type {study.scheduler!r} is not one of: {', '.join(SCHEDULERS)}")
    study.grace_period = _positive_int(path, "scheduler.grace_period", scheduler.get("grace_period", study.grace_period))
    factor = scheduler.get("reduction_factor", study.reduction_factor)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ConfigError(f"{path}: scheduler.reduction_factor must be a number above 1, got {factor!r}")
    study.reduction_factor = float(factor)


def _section(path: str, name: str, values: Any, keys: tuple) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: '{name}' must be a mapping with keys {', '.join(keys)}")
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: unknown key {name}.{unknown[0]}; known: {', '.join(keys)}")
    return values


def _int(path: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {key} must be an integer, got {value!r}")
    return value


def _positive_int(path: str, key: str, value: Any) -> int:
    if _int(path, key, value) < 1:
        raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _point(path: str, index: int, point: Any, study: Study) -> dict:
    where = f"{path}: points_to_evaluate[{index}]"
    if not isinstance(point, dict) or set(point) != set(study.searched):
        raise ConfigError(f"{where} must set exactly the searched fields: {', '.join(study.searched)}")
    try:
        study.trial_config(point)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return _coerce_all(point, where)
