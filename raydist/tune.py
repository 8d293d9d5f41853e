"""`python -m raydist.tune`: a hyperparameter study, each trial a multi-worker TorchTrainer run.

    python -m raydist.tune                                              # search_spaces/digits_quick.yaml, local cluster
    python -m raydist.tune --search-space cifar10_wrn --set data_dir=~/data --address auto
    python -m raydist.tune --search random --scheduler fifo --num-samples 12
    python -m raydist.tune --resume runs/digits_quick-20261123-101500   # continue an interrupted study

A study file (search_spaces/*.yaml, see raydist.study.study_file) fixes some TrainConfig fields and searches
others. HyperOpt's TPE proposes trials (behind a concurrency limit), ASHA stops the weak ones at its rungs
on the per-epoch validation metric. Each trial is a small Tune function that builds and fits its own
TorchTrainer (Ray 2.60: a trainer cannot be handed to Tuner), with a stable Train run folder inside the
trial's folder so an interrupted trial resumes from its last checkpoint. Bad input exits 2 before Ray starts.
raydist.ray_edge.search holds TPE's proposals until its start-up trials have results; raydist.ray_edge.history
keeps every trial's per-epoch history (results.csv, the curves and the best epoch come from it) and rebuilds
ASHA's rungs from it on --resume, which continues a study exactly as it was saved (only the cluster, the
concurrency and where the data is may change).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from raydist import final_eval
from raydist.config.fields import TrainConfig
from raydist.config.values import check_address, check_folder_name, require_package
from raydist.errors import ConfigError
from raydist.output import report
from raydist.preflight import validate
from raydist.ray_edge import measure
from raydist.ray_edge.results import StudyResult
from raydist.ray_edge.study import Plan, run_study
from raydist.storage import is_uri
from raydist.study.pareto import column
from raydist.study.study import ONE_WORKER_TRIALS, SCHEDULERS, SEARCH_ALGORITHMS, Study
from raydist.study.study_file import STUDY_FILE, load_study

# The shipped studies: inside the package in a wheel (pyproject.toml maps search_spaces/ there), at the top
# of the repository in a checkout or an editable install.
SEARCH_SPACES = next((folder for folder in (Path(__file__).resolve().parent / "search_spaces",
                                            Path(__file__).resolve().parent.parent / "search_spaces")
                      if folder.is_dir()), Path(__file__).resolve().parent / "search_spaces")
DEFAULT_STUDY = "digits_quick"
DESCRIPTION = """\
Search hyperparameters: a study of many training runs (Ray Tune trials) on a Ray cluster, HyperOpt (TPE)
proposing values, ASHA stopping the weak trials early; a line per trial event while it runs, then a table,
the best model, results.csv, learning_curves.png and search_values.png. Without --address it starts a
local cluster itself; without --search-space it runs search_spaces/digits_quick.yaml.

example:
  python -m raydist.tune --search-space cifar10_resnet18 --set data_dir=~/data --address auto"""


# ---- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from raydist.cli import OneLineErrorParser

    p = OneLineErrorParser(prog="raydist.tune", description=DESCRIPTION)
    p.add_argument("--search-space", metavar="FILE.yaml",
                   help=f"study file, or the name of one in {SEARCH_SPACES.name}/ (see --list; default: {DEFAULT_STUDY})")
    p.add_argument("--list", action="store_true", help="list the shipped study files and exit")
    p.add_argument("--search", choices=SEARCH_ALGORITHMS, help="search algorithm: HyperOpt's TPE, Optuna's TPE "
                   "(multivariate) or random (default: the study's)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="trial scheduler: ASHA (stops the weak early), FIFO (every "
                   "trial to its end), PBT or PB2 (population-based training; default: the study's)")
    p.add_argument("--num-samples", type=int, metavar="N", help="number of trials (default: the study's)")
    p.add_argument("--one-worker-trials", choices=ONE_WORKER_TRIALS,
                   help="how a one-worker trial trains: in_process (in the trial's own process: seconds less "
                        "start-up) or trainer (a TorchTrainer run, in Ray Train's run list: raydist.cluster status); "
                        "default: the study's, else in_process")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: the study's, else as many as the cluster's free resources fit)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config field for every trial (repeatable); a searched field becomes fixed")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: start a local one")
    p.add_argument("--wait-for-workers-s", type=_seconds, metavar="S", default=TrainConfig.wait_for_workers_s,
                   help="on an autoscaling cluster, the most seconds to wait for the nodes the first trial needs "
                        f"before giving up in one line naming what never came (default: "
                        f"{TrainConfig.wait_for_workers_s:g}; 0: give up at once)")
    p.add_argument("--storage-path", help="where the experiment folder goes, a local path or URI (default: ./runs)")
    p.add_argument("--name", help="experiment folder name (default: <study>-<timestamp>)")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR",
                   help="continue an interrupted study: finished trials are kept, unfinished ones resume")
    p.add_argument("--wandb", action="store_true", help="log trials to Weights & Biases (offline without a key)")
    p.add_argument("--wandb-project", help="W&B project (default: the study's name)")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="log trials to this MLflow tracking URI (e.g. http://mlflow:5000 or sqlite:///mlflow.db)")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own full output (its status tables and result boxes) and every trial's epoch lines, "
                        "instead of one line per trial event and a status line every 30 s (study key: console)")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, got {text!r}")
    return value


def find_study_file(name: str) -> str:
    if os.path.isfile(os.path.expanduser(name)):
        return os.path.expanduser(name)
    for candidate in (SEARCH_SPACES / name, SEARCH_SPACES / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    shipped = ", ".join(sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml")))
    raise ConfigError(f"--search-space {name}: no such file; shipped studies: {shipped}")


def parse_args(argv: Optional[list[str]] = None) -> Plan:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for path in sorted(SEARCH_SPACES.glob("*.yaml")):
            print(f"{path.stem:<22} {load_study(str(path), check_configs=False).description}")
        raise SystemExit(0)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. --set data_dir=~/data")
        key = key.strip().replace("-", "_")
        overrides[key] = _set_value(key, value)
    if args.name is not None:
        check_folder_name(args.name, "--name")
    if args.address is not None:
        check_address(args.address)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples must be a positive integer, got {args.num_samples}")

    if args.resume:
        experiment = os.path.abspath(os.path.expanduser(args.resume.rstrip("/")))
        study_file = os.path.join(experiment, STUDY_FILE)
        if not os.path.isfile(study_file):
            raise ConfigError(f"--resume {args.resume}: not a raydist.tune experiment folder (no {STUDY_FILE})")
        _check_resume_flags(args, overrides)
        _check_storage(experiment, "--resume")
        searched = set(load_study(study_file).searched) & set(overrides)
        if searched:  # the restored searcher keeps proposing it; a fixed value would be silently ignored
            raise ConfigError(f"--resume: {sorted(searched)[0]} is searched in this study and cannot be fixed now")
        study = load_study(study_file, overrides)
        # The console may change on --resume (the trials may not); the study file keeps its own setting.
        study.saved_verbose, study.verbose = study.verbose, study.verbose or args.verbose
        storage_path, name = os.path.dirname(experiment), os.path.basename(experiment)
    else:
        # The command line's settings join the study before it is checked: the checks are the file's.
        study = load_study(find_study_file(args.search_space or DEFAULT_STUDY), overrides,
                           settings={"search": args.search, "scheduler": args.scheduler,
                                     "num_samples": args.num_samples, "one_worker_trials": args.one_worker_trials,
                                     "verbose": args.verbose or None})
        storage_path = args.storage_path or "./runs"
        storage_path = storage_path if is_uri(storage_path) else os.path.abspath(os.path.expanduser(storage_path))
        _check_storage(storage_path, "--storage-path")
        name = args.name if args.name is not None else f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not is_uri(storage_path) and os.path.exists(os.path.join(storage_path, name)):
            raise ConfigError(f"experiment folder {os.path.join(storage_path, name)} exists; pick another --name "
                              f"or continue it with --resume")
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be a positive integer, got {args.max_concurrent}")
        study.max_concurrent = args.max_concurrent  # saved with the study: a later --resume keeps it
    # Tune runs each trial in its own working folder: relative data paths must not follow it there. On a
    # cluster, `~/data` is each node's own home (expanded there), and each node's first worker checks the
    # data where it runs; on a local cluster (this machine) it is checked now, before anything starts.
    from raydist.run_config import worker_path

    joined = args.address is not None
    study.fixed["data_dir"] = worker_path(study.fixed.get("data_dir", TrainConfig.data_dir), joined_cluster=joined)
    if study.fixed.get("weights"):
        study.fixed["weights"] = worker_path(study.fixed["weights"], joined_cluster=joined)
    if "weights" in study.searched:  # each file a trial can get
        searched = study.searched["weights"]
        study.searched["weights"] = dataclasses.replace(
            searched, args=tuple(worker_path(path, joined_cluster=joined) for path in searched.args))
    if args.address is None:
        _check_data(study)
    if not args.resume:  # starting weights missing or not fitting fail here, not in every trial
        _check_weights(study, on_this_machine=args.address is None)
    if args.wandb_project and not args.wandb:
        raise ConfigError(f"--wandb-project {args.wandb_project} without --wandb: nothing would be logged to W&B; "
                          f"add --wandb, or drop --wandb-project")
    if args.wandb:
        require_package("wandb", "--wandb")
    if args.mlflow_uri:
        require_package("mlflow", "--mlflow-uri")
    return Plan(study=study, experiment_path=f"{storage_path}/{name}", storage_path=storage_path, name=name,
                address=args.address, resume=bool(args.resume),
                max_concurrent=study.max_concurrent, wait_for_workers_s=args.wait_for_workers_s,
                wandb=args.wandb, wandb_project=args.wandb_project, mlflow_uri=args.mlflow_uri)


# What --resume may change: where the data is. Everything else a trial computes with stays as the study
# started, or trials would differ mid-run and the next resume would revert them.
RESUME_SETTABLE = ("data_dir", "download")


def _check_storage(path: str, flag: str) -> None:
    from raydist.run_config import check_storage

    check_storage(path, flag)


def _set_value(key: str, text: str):
    """--set KEY=VALUE: YAML for numbers, booleans and lists; a text field keeps the text as typed
    (YAML would make `~` empty and `2024-01-01` a date)."""
    from raydist.config.fields import FIELDS, base_type
    from raydist.config.yaml_files import load_yaml_text

    if not text:
        return None
    if key in FIELDS and base_type(key)[0] is str:
        return text
    return load_yaml_text(text)


def _check_resume_flags(args: argparse.Namespace, overrides: dict) -> None:
    """--resume continues the study as saved; a flag it cannot honour is refused, never ignored."""
    for flag in ("search_space", "search", "scheduler", "num_samples", "one_worker_trials", "name", "storage_path"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--resume continues the study as it was; drop --{flag.replace('_', '-')}")
    for flag in ("wandb", "wandb_project", "mlflow_uri"):
        if getattr(args, flag):  # Ray restores the study's logger callbacks as they were created
            raise ConfigError(f"--resume keeps the loggers the study started with; drop --{flag.replace('_', '-')}")
    fixed = sorted(set(overrides) - set(RESUME_SETTABLE))
    if fixed:
        raise ConfigError(f"--resume: --set {fixed[0]} would change the study's trials mid-run; only "
                          f"{', '.join(RESUME_SETTABLE)} can be set when resuming")


def _check_weights(study: Study, *, on_this_machine: bool) -> None:
    """Every starting point a trial can get (the fixed one, or each searched model and weights file) is
    there and fits."""
    import itertools

    from raydist.run_config import check_weights

    names = [name for name in ("model", "weights", "pretrained") if name in study.searched]
    base = study.base_config()
    for values in itertools.product(*(study.searched[name].extremes() for name in names)):
        cfg = dataclasses.replace(base, **dict(zip(names, values)))
        try:
            validate(cfg)
        except ConfigError:  # a combination no trial gets (e.g. --pretrained on a model without weights)
            continue
        check_weights(cfg, on_this_machine=on_this_machine)


def _check_data(study: Study) -> None:
    """A study on files that are missing fails here, not in every trial."""
    from raydist.run_config import check_data

    cfg = study.base_config()
    datasets = study.searched["dataset"].extremes() if "dataset" in study.searched else [cfg.dataset]
    for dataset in datasets:
        check_data(dataset, cfg.data_dir, cfg.download, hint=" (in a study: --set data_dir=... / --set download=true)")


# ---- concurrency ---------------------------------------------------------------------------------------


# ---- one trial: a Tune function that is a Train driver ------------------------------------------------


# ---- the study -----------------------------------------------------------------------------------------


# ---- after the study: the table and where everything is -----------------------------------------------


def print_result(result: StudyResult, study: Study) -> None:
    print(report.format_table(result.rows, searched=list(study.searched), metric=study.metric, mode=study.mode,
                              others=tuple(m for m, _ in study.objectives)))
    where = result.experiment_path
    if result.best:
        b = result.best
        values = ", ".join(f"{k}={report.cell(k, b[k])}" for k in study.searched)
        print(f"\nbest trial {b['trial_id']}: {study.metric} {report.cell(study.metric, b[f'best_{study.metric}'])} "
              f"at epoch {b['best_epoch']}{_weights_note(b)} ({values})")
        print(f"  checkpoint:   {result.best_checkpoint}")
        if study.population:  # its values changed mid-run: best_config.yaml holds its last ones
            print(f"  trained by:   {b['lineage']} ({b['exploits']} exploit(s) in this trial)")
        if result.best_model:
            print(f"  best weights: {result.best_model}")
            if not study.population:
                print(f"  retrain it:   python -m raydist.train --config {where}/best_config.yaml")
    else:
        print("\nno trial reported a result")
    if study.objectives:
        print(_front_line(result.rows, study, f"{where}/pareto.png"))
    if result.importance:
        print(result.importance.line())
    for row in result.rows:  # each failed trial's cause in one line, and where its tracebacks are
        if row["status"] == report.ERROR:
            log = f"{where}/trial_{row['trial_id']}/error.log"  # raydist.ray_edge.failures.ERROR_LOG
            print(f"trial {row['trial_id']} failed: {row['error']}"
                  + (f"  (tracebacks: {log})" if is_uri(where) or os.path.exists(log) else ""))
    print(f"results: {where}/results.csv  curves: {where}/learning_curves.png  searched values: "
          f"{where}/search_values.png  TensorBoard: tensorboard --logdir {where}  ({result.seconds:.0f}s)")
    if result.interrupted:
        print(f"interrupted; continue with: python -m raydist.tune --resume {where}")


def _front_line(rows: list[dict], study: Study, picture: str) -> str:
    """The Pareto front of a multi-objective study, its trials best metric first."""
    objectives = study.all_objectives()
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[f"best_{study.metric}"],
                   reverse=study.mode == "max")
    said = ", ".join(f"{m} {'up' if d == 'max' else 'down'}" for m, d in objectives)
    columns = [column(m, study.metric) for m, _ in objectives]
    trials = "; ".join(f"{r['trial_id']} " + " ".join(report.cell(c, r.get(c)) for c in columns) for r in front)
    return f"Pareto front ({said}): {len(front)} of {len(rows)} trials{': ' + trials if trials else ''} ({picture})"


def _weights_note(row: dict) -> str:
    """Said whenever the exported weights are not the best epoch's own (that checkpoint was not kept)."""
    if row["weights_epoch"] is None or row["weights_epoch"] == row["best_epoch"]:
        return ""
    return f"; weights from epoch {row['weights_epoch']}"


def main(argv: Optional[list[str]] = None) -> int:
    try:
        plan = parse_args(argv)
    except ConfigError as exc:
        print(f"raydist.tune: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_study(plan)
    except ConfigError as exc:  # resources checked against a running cluster
        print(f"raydist.tune: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - e.g. a logger that cannot reach its server; trace above
        print(f"raydist.tune: study failed: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    test_line = final_eval.summary_line(measure.measure_study(result))  # the best model on the test split, once
    print_result(result, plan.study)
    if test_line:
        print(test_line, flush=True)
    if result.interrupted:
        return 130
    return 0 if any(r["status"] != report.ERROR for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
