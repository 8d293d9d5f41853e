"""Study files: one declarative YAML per hyperparameter study, checked against TrainConfig before anything runs.

    study = load_study("search_spaces/digits_quick.yaml", overrides={"epochs": 3})
    study.trial_config({"lr": 0.3, "batch_size": 64})   # a validated TrainConfig
    study.warnings            # sentences to show at the study's start (an unfair ASHA setup)

A study file (every key but `searched` is optional):

    name: digits_quick            # the study's name (default: the file name without .yaml)
    description: a line shown in --help listings and results
    metric: val_acc               # val_acc | val_loss | train_acc | train_loss; a list for several objectives
    mode: max                     # follows the metric (max for accuracies, min for losses); the other is refused
    num_samples: 8                # trials
    max_concurrent: null          # trials at once (default: as many as the cluster's free resources fit)
    search:    {algorithm: hyperopt, initial_points: 3, seed: 0}    # or algorithm: optuna | random
    scheduler: {type: asha, grace_period: 2, reduction_factor: 3}   # or type: fifo, pbt, pb2 (study.population)
    failures:  {worker_restarts: 0, trial_restarts: 1}   # see below
    one_worker_trials: in_process # or trainer: see below
    console:   {verbose: false, status_every_s: 30}   # verbose: Ray's own full output, every epoch line
    fixed:     {dataset: digits, model: resnet8, num_workers: 1, epochs: 10}   # any TrainConfig field
    searched:                     # TrainConfig fields -> one distribution each
      lr:         {loguniform: [0.02, 2.0]}
      batch_size: {choice: [32, 64, 128]}
      warmup_epochs: {quniform: [0.0, 2.0, 0.5]}   # both bounds are sampled
    points_to_evaluate: [{lr: 0.4, batch_size: 64, warmup_epochs: 1.0}]   # tried first

Distributions, and what each samples under both searchers (HyperOpt and random):
  uniform [low, high], loguniform [low, high]   a number in [low, high] (log-uniform: uniform in log)
  randint [low, high]                           the integers low..high, each equally likely
  qrandint / quniform [low, high, q]            the multiples of q from low to high, each equally likely
  qloguniform [low, high, q]                    log-uniform in [low, high], rounded to a multiple of q
  choice [values...]                            one of the values, each equally likely
The bounds of the q- distributions must be multiples of q, so that both are sampled. Integer ranges and
q-grids (at most 1000 values, MAX_GRID) go to Tune as a `choice` of their values, the sample being the value
itself: Ray's HyperOpt conversion of randint and q- distributions gives the ends half the weight of the
values between, and for a q-grid not anchored at 0 can fall outside [low, high] (`qrandint [10, 100, 32]`
could give 0 and never 100). HyperOpt models such a choice as categories, as it does its own hp.randint.

Failures: `trial_restarts` (default 1; Ray Tune's FailureConfig.max_failures) runs a trial that failed (a
worker died or raised) again, from its latest checkpoint; `worker_restarts` (default 0; Ray Train's
FailureConfig.max_failures, the trial config's max_failures) restarts a trial's worker group inside the
trial instead (TorchTrainer trials only: a trial in its own process has no worker group). Restarting the trial is the default because a Train restart can race Tune's stop of that
trial (ASHA): seen here, the controller started a new worker group while Tune removed the trial, and the
new group's placement group outlived both and held its CPU, so the next trial waited for ever. A trial that still fails is "error" in the results and the study goes on.
A deterministic error (out of memory, a bad input) fails again on each restart, so each costs a start-up.

One-worker trials: `in_process` (default) trains in the Tune trial's own process, with the trial holding
the worker's CPUs/GPU: no Ray Train controller, worker group or process group to start, which is most of a
small trial's start-up. `trainer` runs every trial as a TorchTrainer, so that each is a run in Ray
Train's run list (`raydist.cluster status`). Trials of two or more workers are TorchTrainer runs either way. Both keep the same
run folder, history, checkpoints and resume behaviour.

Under ASHA every trial's LR schedule spans the scheduler's budget (`max_epochs`, ASHA's max_t), so trials
meet at a rung at the same point of their schedules; how long a trial runs is ASHA's decision, and a
study that also searches `epochs` gets a warning (see `Study.warnings`).
Every combination of the searched fields' extremes (both ends of a range, every choice) is checked as a
trial config before Ray starts (`Study._corners`), so no trial the search can give fails Tune's trial
creation. Numbers are read as YAML 1.2 writes them (`1e-3` is a number), and a key given twice in one mapping
is refused (YAML would keep the last one silently). `initial_points >= num_samples` under TPE (a random
search) and more `points_to_evaluate` than `num_samples` (the rest never run) are accepted with a warning.
Any problem is one ConfigError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import yaml

from raydist.config.fields import TrainConfig, base_type, coerce_value
from raydist.config.values import (
    MODEL_ARG_PREFIX,
    check_folder_name,
    fold_model_args,
    is_model_arg_key,
    merge_config_values,
    metric_mode,
    split_worker_range,
)
from raydist.config.yaml_files import read_yaml_mapping
from raydist.errors import ConfigError
from raydist.preflight import validate
from raydist.storage import filesystem
from raydist.study.conditions import check_conditions
from raydist.study.distributions import read_distribution
from raydist.study.population import read_population_settings, scheduler_section, search_given
from raydist.study.study import (
    CONSOLE_KEYS,
    FAILURE_KEYS,
    MAX_SEED,
    METRICS,
    OBJECTIVES,
    ONE_WORKER_TRIALS,
    PER_TRIAL_FIELDS,
    SCHEDULER_KEYS,
    SCHEDULERS,
    SEARCH_ALGORITHMS,
    SEARCH_KEYS,
    TOP_LEVEL_KEYS,
    Study,
)


def load_study(path: str, overrides: Optional[dict] = None, settings: Optional[dict] = None, *,
               check_configs: bool = True) -> Study:
    """Read and check a study file; `overrides` fix config fields (searched ones become fixed) and
    `settings` replace study settings (search, scheduler, num_samples from the command line) before the
    study is checked, so that a study changed on the command line gets the same checks as its file."""
    raw = read_yaml_mapping(path, "search space", "study keys (metric, fixed, searched, ...)")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(TOP_LEVEL_KEYS)}")
    if "searched" not in raw:
        raise ConfigError(f"{path}: no 'searched' section (config fields -> distributions)")

    fixed = _config_fields(path, "fixed", raw.get("fixed") or {})
    fixed = split_worker_range(fixed, f"{path}: fixed.num_workers")  # a range: every trial elastic within it
    fixed = fold_model_args({k: v if is_model_arg_key(k) else coerce_value(k, v, f"{path}: fixed.{k}")
                              for k, v in fixed.items()})
    searched_raw = _config_fields(path, "searched", raw["searched"])
    if not searched_raw:
        raise ConfigError(f"{path}: 'searched' is empty; give at least one field and its distribution")
    for section, values in (("fixed", fixed), ("searched", searched_raw), ("--set", overrides or {})):
        if "keep_by" in values:  # raydist.tune sets every trial's keep_by to the metric, whatever this says
            where = "--set keep_by" if section == "--set" else f"{path}: {section}.keep_by"
            raise ConfigError(f"{where}: a study keeps every trial's checkpoints by its metric (metric: "
                              f"{raw.get('metric', 'val_acc')}), so that the best epoch it reports is one that was "
                              f"kept; remove keep_by and set metric instead")
    fixed_keys = set(fixed) | {MODEL_ARG_PREFIX + k for k in fixed.get("model_args", {})}
    both = sorted(fixed_keys & set(searched_raw))
    if both:
        raise ConfigError(f"{path}: {both[0]!r} is both fixed and searched; keep it in one section")
    searched = {name: read_distribution(path, name, spec, _field_type(path, name, fixed, searched_raw))
                for name, spec in searched_raw.items()}
    sets = split_worker_range(_config_fields("--set", "", overrides or {}), "--set num_workers")
    for name, value in sets.items():  # fix a value, even a searched one
        searched.pop(name, None)
        if is_model_arg_key(name):
            fixed = merge_config_values(fixed, fold_model_args({name: value}))
        else:
            fixed[name] = coerce_value(name, value, f"--set {name}")
    if "num_workers" in sets and "min_workers" not in sets:  # a plain number on top of a range: a fixed group
        fixed.pop("min_workers", None)

    study = Study(path=path, fixed=fixed, searched=searched, description=str(raw.get("description") or ""),
                  given_name=_study_name(path, raw.get("name")))
    # --set max_failures=N overrides the file's failures.worker_restarts (the same setting)
    restarts_set = fixed.pop("max_failures") if "max_failures" in (overrides or {}) else None
    _read_settings(study, raw)
    if restarts_set is not None:
        study.worker_restarts = _count(path, "--set max_failures", restarts_set)
    for key, value in (settings or {}).items():
        if value is not None:
            setattr(study, key, value)
    if study.population and not search_given(raw, settings):
        study.search = "random"  # PBT's first population is drawn at random (raydist.study.population)
    searched = study.searched = check_conditions(path, searched, fixed)
    if not searched:
        raise ConfigError(f"{path}: --set fixed every searched field; nothing is left to search")
    study.check_search()
    for key in ("wandb", "wandb_project", "wandb_id"):
        if key in fixed or key in searched:
            raise ConfigError(f"{path}: {key} is a single run's setting; a study logs each trial to W&B with "
                              f"python -m raydist.tune --wandb (and --wandb-project)")
    if study.scheduler == "asha" and ("schedule_epochs" in fixed or "schedule_epochs" in searched):
        raise ConfigError(f"{path}: schedule_epochs is set by raydist under ASHA (to the budget, {study.max_epochs} "
                          f"epochs, so trials at a rung sit at the same point of their LR schedules); remove it")
    for corner, cfg in (study._corners() if check_configs else []):  # unchecked: to list the shipped studies
        try:
            validate(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {corner}{exc}") from None
    if study.scheduler == "asha" and study.grace_period > study.max_epochs:
        raise ConfigError(f"{path}: scheduler.grace_period {study.grace_period} exceeds the most epochs a trial "
                          f"can run ({study.max_epochs})")
    study.points_to_evaluate = [_point(path, i, p, study) for i, p in enumerate(raw.get("points_to_evaluate") or [])]
    return study


# ---- pieces ----------------------------------------------------------------------------------------


def _field_type(path: str, name: str, fixed: dict, searched: dict) -> type:
    """A searched field's type; for `model_args.NAME`, the annotated type of that argument of the study's model."""
    if not is_model_arg_key(name):
        return base_type(name)[0]
    from raydist.models.registry import model_spec

    where = f"{path}: searched.{name}"
    if "model" in searched:
        raise ConfigError(f"{where}: a model argument is searched for one model; fix the model (fixed.model) or "
                          f"search the model's arguments in a study of their own")
    model = fixed.get("model", TrainConfig.model)
    arg = name[len(MODEL_ARG_PREFIX):]
    try:
        spec = model_spec(model)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if arg not in spec.arguments():
        raise ConfigError(f"{where}: {spec.arguments_text()}")
    return spec.argument_type(arg)


def _config_fields(path: str, section: str, values: Any) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: '{section}' must be a mapping of config fields, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_TRIAL_FIELDS + ("verbose",)]
    for key in values:
        where = f"{path}: {section}.{key}" if section else f"{path} {key}"
        if key == "verbose":  # raydist.train's console switch; a study has a console of its own
            raise ConfigError(f"{where}: a study's console is set by console.verbose (or raydist.tune --verbose)")
        if key in PER_TRIAL_FIELDS:
            raise ConfigError(f"{where} is set per trial by raydist.tune; remove it "
                              f"(use --storage-path / --address on the command line)")
        if key not in known and not is_model_arg_key(key):
            raise ConfigError(f"{where} is not a config field; known: {', '.join(known)} (and a model's arguments "
                              f"as model_args.NAME)")
    return dict(values)


def _read_settings(study: Study, raw: dict) -> None:
    path = study.path
    metrics = raw.get("metric", study.metric)
    metrics = list(metrics) if isinstance(metrics, list) else [metrics]
    modes = raw.get("mode", [metric_mode(str(m)) for m in metrics])
    modes = list(modes) if isinstance(modes, list) else [modes]
    if not metrics or str(metrics[0]) not in METRICS:
        raise ConfigError(f"{path}: metric {metrics[0] if metrics else metrics!r} is not one of: {', '.join(METRICS)}"
                          f"{' (the first of a list)' if len(metrics) > 1 else ''}")
    if len(modes) != len(metrics):
        raise ConfigError(f"{path}: mode gives {len(modes)} direction(s) for {len(metrics)} metric(s); give one per "
                          f"metric, or leave mode out (each follows its metric)")
    for i, (metric, mode) in enumerate(zip(metrics, modes)):
        if i and metric in metrics[:i]:
            raise ConfigError(f"{path}: metric[{i}] {metric!r} is listed twice")
        if i and metric not in METRICS + OBJECTIVES:
            raise ConfigError(f"{path}: metric[{i}] {metric!r} is not one of: "
                              f"{', '.join(m for m in METRICS + OBJECTIVES if m not in metrics[:i])}")
        if mode not in ("max", "min"):
            raise ConfigError(f"{path}: mode {mode!r} is not one of: max, min")
        if mode != metric_mode(metric):  # the opposite order would keep and export the worst epochs
            better = "higher" if metric_mode(metric) == "max" else "lower"
            raise ConfigError(f"{path}: mode {mode} contradicts metric {metric} ({better} is better); give "
                              f"mode: {metric_mode(metric)}, or leave mode out (it follows the metric)")
    study.metric, study.mode = metrics[0], modes[0]
    study.objectives = tuple(zip(metrics[1:], modes[1:]))
    study.num_samples = _positive_int(path, "num_samples", raw.get("num_samples", study.num_samples))
    if raw.get("max_concurrent") is not None:
        study.max_concurrent = _positive_int(path, "max_concurrent", raw["max_concurrent"])

    search = _section(path, "search", raw.get("search"), SEARCH_KEYS)
    study.search = search.get("algorithm", study.search)
    if study.search not in SEARCH_ALGORITHMS:
        raise ConfigError(f"{path}: search.algorithm {study.search!r} is not one of: {', '.join(SEARCH_ALGORITHMS)}")
    study.initial_points = _positive_int(path, "search.initial_points", search.get("initial_points", study.initial_points))
    study.seed = _int(path, "search.seed", search.get("seed", study.seed))
    if not 0 <= study.seed <= MAX_SEED:
        raise ConfigError(f"{path}: search.seed must be an integer from 0 to {MAX_SEED} (2^32 - 1), got {study.seed}")

    scheduler = _section(path, "scheduler", raw.get("scheduler"), SCHEDULER_KEYS)
    study.scheduler = scheduler.get("type", study.scheduler)
    if study.scheduler not in SCHEDULERS:
        raise ConfigError(f"{path}: scheduler.type {study.scheduler!r} is not one of: {', '.join(SCHEDULERS)}")
    study.grace_period = _positive_int(path, "scheduler.grace_period", scheduler.get("grace_period", study.grace_period))
    factor = scheduler.get("reduction_factor", study.reduction_factor)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 < factor < math.inf:
        raise ConfigError(f"{path}: scheduler.reduction_factor must be a finite number above 1, got {factor!r}")
    study.reduction_factor = float(factor)
    read_population_settings(study, scheduler)

    failures = _section(path, "failures", raw.get("failures"), FAILURE_KEYS)
    if "worker_restarts" in failures and "max_failures" in study.fixed:
        raise ConfigError(f"{path}: failures.worker_restarts and max_failures (in fixed or --set) both set how "
                          f"often a trial's workers restart; keep one")
    # max_failures in `fixed` (or --set) is the same setting: kept in one place, failures.worker_restarts.
    study.worker_restarts = _count(path, "failures.worker_restarts",
                                   failures.get("worker_restarts", study.fixed.pop("max_failures", study.worker_restarts)))
    study.trial_restarts = _count(path, "failures.trial_restarts", failures.get("trial_restarts", study.trial_restarts))
    study.one_worker_trials = raw.get("one_worker_trials", study.one_worker_trials)
    if study.one_worker_trials not in ONE_WORKER_TRIALS:
        raise ConfigError(f"{path}: one_worker_trials {study.one_worker_trials!r} is not one of: "
                          f"{', '.join(ONE_WORKER_TRIALS)}")

    console = _section(path, "console", raw.get("console"), CONSOLE_KEYS)
    study.verbose = console.get("verbose", study.verbose)
    if not isinstance(study.verbose, bool):
        raise ConfigError(f"{path}: console.verbose must be true or false, got {study.verbose!r}")
    every = console.get("status_every_s", study.status_every_s)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
        raise ConfigError(f"{path}: console.status_every_s must be a number of seconds >= 0 (0: no status lines), "
                          f"got {every!r}")
    study.status_every_s = float(every)


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


def _count(path: str, key: str, value: Any) -> int:
    if _int(path, key, value) < 0:
        raise ConfigError(f"{path}: {key} must be zero or more, got {value!r}")
    return value


def _positive_int(path: str, key: str, value: Any) -> int:
    if _int(path, key, value) < 1:
        raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _point(path: str, index: int, point: Any, study: Study) -> dict:
    """A point checked against each distribution (a value it could sample, written exactly as Tune's
    choice holds it, which HyperOpt requires) and then as a whole trial config."""
    where = f"{path}: points_to_evaluate[{index}]"
    if not isinstance(point, dict) or not set(point) <= set(study.searched):
        raise ConfigError(f"{where} must set exactly the searched fields: {', '.join(study.searched)}")
    applying = set(study.applying({k: point.get(k, _UNSET) for k in study.searched}))
    if set(point) != applying:
        raise ConfigError(f"{where} must set exactly the searched fields that apply to it: "
                          f"{', '.join(n for n in study.searched if n in applying)}")
    values = {}
    for key, dist in study.searched.items():
        if key not in point:
            continue
        try:
            values[key] = dist.snap(point[key])
        except ValueError:
            raise ConfigError(f"{where}.{key} = {point[key]!r} cannot be sampled from {dist.describe()}: "
                              f"use {dist.accepts()}") from None
    try:
        study.trial_config(values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return values


_UNSET = object()  # a conditional field a point leaves out; applying() counts the ones its conditions need


def _study_name(path: str, value: Any) -> Optional[str]:
    """The `name` key: it names the trials' Train runs, so it must be a plain folder name."""
    if value is None:
        return None
    return check_folder_name(value, f"{path}: name")


STUDY_FILE = "study.yaml"  # the effective study, saved so --resume needs nothing else


def save_study(study: Study, experiment_path: str) -> None:

    fs, root = filesystem(experiment_path)
    fs.create_dir(root, recursive=True)
    content = {
        "name": study.name,  # the saved file is study.yaml: without this, a resumed study is called "study"
        "description": study.description,
        **({"metric": [m for m, _ in study.all_objectives()], "mode": [d for _, d in study.all_objectives()]}
           if study.objectives else {"metric": study.metric, "mode": study.mode}),
        "num_samples": study.num_samples, "max_concurrent": study.max_concurrent,
        "search": {"algorithm": study.search, "initial_points": study.initial_points, "seed": study.seed},
        "scheduler": scheduler_section(study),
        "failures": {"worker_restarts": study.worker_restarts, "trial_restarts": study.trial_restarts},
        "one_worker_trials": study.one_worker_trials,
        "console": {"verbose": study.verbose if study.saved_verbose is None else study.saved_verbose,
                    "status_every_s": study.status_every_s},
        "fixed": study.fixed,
        "searched": {k: {d.kind: list(d.args), **({"when": {d.when[0]: list(d.when[1])}} if d.when else {})}
                     for k, d in study.searched.items()},
        "points_to_evaluate": study.points_to_evaluate,
    }
    with fs.open_output_stream(f"{root}/{STUDY_FILE}") as out:
        out.write(yaml.safe_dump(content, sort_keys=False).encode())
