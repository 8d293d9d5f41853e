"""`python -m raydist.tune`: a hyperparameter study, each trial a multi-worker TorchTrainer run.

    python -m raydist.tune                                              # search_spaces/digits_quick.yaml, local cluster
    python -m raydist.tune --search-space cifar10_wrn --set data_dir=~/data --address auto
    python -m raydist.tune --search random --scheduler fifo --num-samples 12
    python -m raydist.tune --resume runs/digits_quick-20261123-101500   # continue an interrupted study

A study file (search_spaces/*.yaml, see raydist.search_space) fixes some TrainConfig fields and searches
others. HyperOpt's TPE proposes trials (behind a concurrency limit), ASHA stops the weak ones at its rungs
on the per-epoch validation metric. Each trial is a small Tune function that builds and fits its own
TorchTrainer (Ray 2.60: a trainer cannot be handed to Tuner), with a stable Train run folder inside the
trial's folder so an interrupted trial resumes from its last checkpoint. Bad input exits 2 before Ray starts.
raydist.study_search holds TPE's proposals until its start-up trials have results; raydist.study_history
keeps every trial's per-epoch history (results.csv, the curves and the best epoch come from it) and rebuilds
ASHA's rungs from it on --resume, which continues a study exactly as it was saved (only the cluster, the
concurrency and where the data is may change).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from raydist import final_eval
from raydist.output import report
from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig, check_address, check_folder_name, require_package
from raydist.study.study_file import ONE_WORKER_TRIALS, Study, load_study
from raydist.ray_edge.results import StudyResult, summarize
from raydist.storage import filesystem, is_uri
from raydist.preflight import validate

STUDY_FILE = "study.yaml"  # the effective study, saved so --resume needs nothing else
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
    from raydist.cli import _Parser

    p = _Parser(prog="raydist.tune", description=DESCRIPTION)
    p.add_argument("--search-space", metavar="FILE.yaml",
                   help=f"study file, or the name of one in {SEARCH_SPACES.name}/ (see --list; default: {DEFAULT_STUDY})")
    p.add_argument("--list", action="store_true", help="list the shipped study files and exit")
    p.add_argument("--search", choices=("hyperopt", "random"), help="search algorithm (default: the study's)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), help="trial scheduler (default: the study's)")
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


@dataclasses.dataclass
class Plan:
    """Everything a study run needs, resolved and checked before Ray starts."""
    study: Study
    experiment_path: str  # <storage_path>/<name>, absolute when local
    storage_path: str
    name: str
    address: Optional[str]
    resume: bool
    max_concurrent: Optional[int]
    wandb: bool = False
    wandb_project: Optional[str] = None
    mlflow_uri: Optional[str] = None


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
                max_concurrent=study.max_concurrent,
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
    from raydist.config.fields import _FIELDS, _base_type
    from raydist.config.yaml_files import load_yaml_text

    if not text:
        return None
    if key in _FIELDS and _base_type(key)[0] is str:
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


def plan_concurrency(study: Study, *, free_cpus: float, free_gpus: float, total_cpus: float, total_gpus: float,
                     requested: Optional[int], where: str) -> int:
    """Trials to run at once: as many as the free resources fit, never more than requested or num_samples.

    A trial that the whole cluster cannot fit is an error (it would wait forever); one that fits the cluster
    but not its free resources runs alone, when the busy resources come back.
    """
    cpus, gpus = study.per_trial_resources(cluster_has_gpus=total_gpus > 0)
    # Elastic trials (num_workers MIN-MAX) are planned at MAX, so that trials shrink when nodes go rather than
    # wait; one needs MIN to start.
    fewest_cpus, fewest_gpus = study.per_trial_resources(cluster_has_gpus=total_gpus > 0, fewest=True)
    if streams_a_folder(study):  # Ray Data decodes on CPUs the trials leave free (raydist.folder_stream)
        from raydist.ray_edge.stream import DECODE_CPUS

        free_cpus, total_cpus = free_cpus - DECODE_CPUS, total_cpus - DECODE_CPUS
    if fewest_cpus > total_cpus or fewest_gpus > total_gpus:
        raise ConfigError(f"one trial needs {fewest_cpus:g} CPUs and {fewest_gpus:g} GPUs (num_workers x "
                          f"cpus/gpus_per_worker) but {where} has {total_cpus:g} CPUs and {total_gpus:g} GPUs; "
                          f"lower fixed num_workers")
    fits = math.floor(free_cpus / cpus + 1e-9) if cpus else study.num_samples
    if gpus:
        fits = min(fits, math.floor(free_gpus / gpus + 1e-9))
    return max(1, min(fits, requested or study.num_samples, study.num_samples))


def streams_a_folder(study: Study) -> bool:
    """The study trains on an image folder through the streamed path (asked for, or auto's choice for the
    largest input size searched, judged on this machine)."""
    if study.fixed.get("dataset") != "folder":
        return False
    from raydist.loop.worker_data import streams_folder

    largest = dict(study.fixed)
    if "input_size" in study.searched:
        largest["input_size"] = max(study.searched["input_size"].extremes())
    return streams_folder(TrainConfig(**largest), workers_here=1)


# ---- one trial: a Tune function that is a Train driver ------------------------------------------------


def run_trial(sample: dict, study: Study, experiment_path: str) -> None:
    """Tune calls this once per trial (and again when a restored study resumes it)."""
    started = time.time()  # the trial's start-up (results.csv startup_s) is counted from here
    import ray.tune

    from raydist.ray_edge.history import HistoryCallback
    from raydist.ray_edge.fit import fit, fit_in_trial
    from raydist.run_config import prepare

    context = ray.tune.get_context()
    trial_dir = os.path.basename(context.get_trial_dir())
    trial_path = f"{experiment_path}/{trial_dir}"
    run_name = train_run_name(study.name, context.get_trial_id())
    # Quiet by default: the driver prints a line per trial event (StudyConsole); --verbose brings back the
    # trials' own epoch lines. The labels are those of the metrics exported to the dashboard.
    console = {"epoch_lines": study.verbose, "progress_every_s": 0.0,
               "labels": {"run": run_name, "study": study.name, "trial": context.get_trial_id()}}
    # The stable run name and storage make a resumed trial pick its latest checkpoint up again. The
    # history goes first: whatever Tune then does with the report, the epoch is on record.
    # The study checked its storage on every node (a trial's own process may lack the user's environment).
    try:
        # <experiment>/trial_<id>/<study>.<id>/: the Train run's name is what Ray Train's run list shows.
        # Checkpoints are kept by the study's own metric, so the best epoch it reports is one that was kept.
        # A config the checks refuse fails here, as this trial's one-line error, and the study goes on.
        cfg = dataclasses.replace(study.trial_config(sample), address="auto", keep_by=study.metric,
                                  name=run_name, storage_path=trial_path)
        cfg = prepare(cfg, explicit={})
        if study.in_process(cfg):  # one worker: the loop runs here, on the resources Tune gave this trial
            fit_in_trial(cfg, trial_path=trial_path, on_report=ray.tune.report, started_unix=started, console=console)
        else:
            # No curves.png per trial: the study draws every trial in learning_curves.png, and a trial's thread
            # is no place for matplotlib once Tune stops it (it ends the thread with an exception, mid-draw).
            fit(cfg, callbacks=[HistoryCallback(trial_path, started), epochs_to_tune()], storage_checked=True,
                console=console, draw_curves=False)
    except Exception as exc:  # noqa: BLE001 - the trial's row says its cause in one line; tracebacks to a file
        from raydist.errors import TrialError
        from raydist.ray_edge.failures import root_cause, write_error_log

        cause = root_cause(exc)
        log = write_error_log(trial_path, exc)
        if study.verbose:  # else the driver's StudyConsole says it, from the TrialError
            print(f"trial {context.get_trial_id()} failed: {cause}" + (f" (tracebacks: {log})" if log else ""),
                  flush=True)
        raise TrialError(cause) from None


def epochs_to_tune():
    """Ray's TuneReportCallback (each report of a trial's Train run becomes a Tune result), less an elastic
    trial's mid-epoch checkpoints (a spot notice's): to ASHA each result is an epoch, and a checkpoint that
    Ray Train restarts from needs no result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not (metrics and metrics[0].get("partial_epoch")):
                super().after_report(run_context, metrics, checkpoint)

    return EpochsToTune()


def trial_resources(study: Study, *, cluster_has_gpus: bool):
    """What Tune reserves for a trial: the worker's CPUs (and GPU) for a trial that trains in its own
    process; nothing for a TorchTrainer driver, whose Train workers reserve the trial's resources.
    (Tune needs some resource in a trial's bundle; 1 MiB of memory is the smallest honest one.)"""
    from ray.tune import PlacementGroupFactory

    def resources(config: dict) -> PlacementGroupFactory:
        cfg = study.planned_config(config)  # an invalid one still gets its trial, which fails in one line
        if not study.in_process(cfg):
            return PlacementGroupFactory([{"CPU": 0, "memory": 2**20}])
        bundle = {"CPU": cfg.cpus_per_worker}
        if cluster_has_gpus if cfg.use_gpu is None else cfg.use_gpu:
            bundle["GPU"] = cfg.gpus_per_worker
        return PlacementGroupFactory([bundle])

    return resources


def train_run_name(study_name: str, trial_id: str) -> str:
    return f"{study_name}.{trial_id}"


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_name(trial) -> str:
    return trial.trial_id


# ---- the study -----------------------------------------------------------------------------------------


def run_study(plan: Plan) -> StudyResult:
    from raydist.ray_edge.search import tune_space
    import ray
    import ray.tune

    from raydist.ray_edge import session
    from raydist.ray_edge import planning
    from raydist.ray_edge import search

    t0 = time.perf_counter()
    study = plan.study
    if plan.address is None:  # a local cluster: check this machine before starting it
        plan_concurrency(study, free_cpus=os.cpu_count() or 1, free_gpus=planning.local_gpu_count(),
                         total_cpus=os.cpu_count() or 1, total_gpus=planning.local_gpu_count(),
                         requested=plan.max_concurrent, where="this machine")
    session.connect(plan.address, quiet=not study.verbose)
    # An autoscaling cluster is planned at its largest: what is free there is what it can grow to, less
    # what is busy now (on a fixed cluster: what is free now).
    cap = planning.capacity()
    concurrency = plan_concurrency(study, free_cpus=cap.max_cpus - (cap.cpus - cap.free_cpus),
                                   free_gpus=cap.max_gpus - (cap.gpus - cap.free_gpus), total_cpus=cap.max_cpus,
                                   total_gpus=cap.max_gpus, requested=plan.max_concurrent, where=cap.where)
    planning.check_storage(plan.storage_path, cap)  # once for every trial: each trial's folder is inside it
    _save_study(study, plan.experiment_path)  # on --resume: with the concurrency and data_dir given now
    print(f"study {study.name}: {study.num_samples} trials of {len(study.searched)} searched field(s) "
          f"({', '.join(f'{k}~{d.describe()}' for k, d in study.searched.items())}), {study.search} search, "
          f"{study.scheduler} scheduler, {concurrency} at once; experiment: {plan.experiment_path}", flush=True)
    startup = max(study.initial_points, len(study.points_to_evaluate))  # as raydist.ray_edge.search.TPEGate counts
    if study.search == "hyperopt" and concurrency > startup:
        print(f"TPE: the first {startup} trials are start-up points; later ones wait until {study.initial_points} "
              f"trials have finished", flush=True)
    for warning in study.warnings:
        print(f"warning: {warning}", flush=True)
    cpus, gpus = study.per_trial_resources(cluster_has_gpus=cap.max_gpus > 0)
    waiting = planning.waiting_line(cap, who=f"{concurrency} trial{'s' if concurrency > 1 else ''} at once "
                                            f"need{'' if concurrency > 1 else 's'}",
                                   cpus=cpus * concurrency, gpus=gpus * concurrency)
    if waiting:
        print(waiting, flush=True)

    # The console's trial lines and status line, and the study's record for `raydist.cluster status`.
    console = [] if study.verbose else [study_console(study, plan.experiment_path, concurrency,
                                                      cluster_has_gpus=cap.max_gpus > 0)]
    release = train_requests_release(study.name)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, study=study, experiment_path=plan.experiment_path),
        trial_resources(study, cluster_has_gpus=cap.max_gpus > 0))
    if plan.resume:
        # Tune rebuilds the searcher and scheduler from what it saved; the searcher takes today's concurrency
        # and the scheduler its rungs from the trials' histories (raydist.study_history).
        search.set_resume_concurrency(concurrency)
        tuner = ray.tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True)
        # Tune restores the callbacks it saved: the console is today's (a fresh clock, --verbose as given now).
        run_config = tuner._local_tuner.get_run_config()  # RAY (internal): no public way to change it on restore
        run_config.callbacks = [c for c in run_config.callbacks or []
                                if not getattr(c, "raydist_console", False) and not getattr(c, "raydist_release", False)]
        run_config.callbacks += [*console, release]
        run_config.verbose = 1 if study.verbose else 0
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=tune_space(study),
            tune_config=ray.tune.TuneConfig(metric=study.metric, mode=study.mode, num_samples=study.num_samples,
                                            search_alg=_searcher(study, concurrency), scheduler=_scheduler(study),
                                            trial_name_creator=trial_name,  # the searchers cap concurrency
                                            trial_dirname_creator=trial_dirname,
                                            # In-process trials: a finished trial's process (torch and
                                            # the models imported, the raw digits cached) trains the
                                            # next one; TorchTrainer drivers keep a process each, as
                                            # Ray Train expects.
                                            reuse_actors=study.every_trial_in_process()),
            run_config=ray.tune.RunConfig(name=plan.name, storage_path=plan.storage_path,
                                          callbacks=[*_logger_callbacks(plan),
                                                     trial_loss_notice(plan.experiment_path, study.trial_restarts),
                                                     release, *console],
                                          # A trial that raised is run again this often; it resumes
                                          # from its latest checkpoint (its Train run keeps its name).
                                          failure_config=ray.tune.FailureConfig(max_failures=study.trial_restarts),
                                          # Ray's own tables and result boxes only when asked for.
                                          verbose=1 if study.verbose else 0),
        )
    # Tune saves the experiment's state (which trials exist, with which values) at most every 10 s by default:
    # a driver killed sooner after a trial started left that trial out of the saved study, and --resume ran a
    # new trial in its place (seen once in-process trials started in 3 s). Every second costs a small JSON.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    _publish_study(plan.name, {"name": plan.name, "experiment": plan.experiment_path, "metric": study.metric,
                               "total": study.num_samples, "done": 0, "running": 0, "started_unix": time.time()})
    try:
        with contextlib.nullcontext() if study.verbose else _quiet_tune_output():
            grid = tuner.fit()
    finally:
        release.release_all()  # after Ctrl+C too: Tune has stopped every trial by now
        _forget_study(plan.name)
    return summarize(study, grid, plan.experiment_path, seconds=time.perf_counter() - t0)


def _publish_study(name: str, record: dict) -> None:
    """The study's record for `raydist.cluster status`; a record that cannot be written never stops it."""
    from raydist.ray_edge import status

    try:
        status.publish_study(name, record)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: raydist.cluster status will not list this study ({type(exc).__name__}: {exc})", flush=True)


def _forget_study(name: str) -> None:
    from raydist.ray_edge import status

    try:
        status.publish_study(name, None)
    except Exception:  # noqa: BLE001 - must not hide how the study itself ended
        pass


def _searcher(study: Study, concurrency: int):
    from ray.tune.search.hyperopt import HyperOptSearch

    from raydist.ray_edge.search import RandomSearch, TPEGate

    if study.search == "hyperopt":
        return TPEGate(HyperOptSearch(points_to_evaluate=study.points_to_evaluate or None,
                                      n_initial_points=study.initial_points, random_state_seed=study.seed),
                       initial_points=study.initial_points, points_to_evaluate=len(study.points_to_evaluate),
                       max_concurrent=concurrency)
    return RandomSearch(points_to_evaluate=study.points_to_evaluate or None, random_state=study.seed,
                        max_concurrent=concurrency)


def _scheduler(study: Study):
    from ray.tune.schedulers import FIFOScheduler

    from raydist.ray_edge.history import ASHAWithHistory

    if study.scheduler == "asha":
        # stop_last_trials=False: a trial that reaches its own last epoch finishes normally.
        return ASHAWithHistory(time_attr="epoch", max_t=study.max_epochs, grace_period=study.grace_period,
                               reduction_factor=study.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


def _save_study(study: Study, experiment_path: str) -> None:

    fs, root = filesystem(experiment_path)
    fs.create_dir(root, recursive=True)
    content = {
        "name": study.name,  # the saved file is study.yaml: without this, a resumed study is called "study"
        "description": study.description, "metric": study.metric, "mode": study.mode,
        "num_samples": study.num_samples, "max_concurrent": study.max_concurrent,
        "search": {"algorithm": study.search, "initial_points": study.initial_points, "seed": study.seed},
        "scheduler": {"type": study.scheduler, "grace_period": study.grace_period,
                      "reduction_factor": study.reduction_factor},
        "failures": {"worker_restarts": study.worker_restarts, "trial_restarts": study.trial_restarts},
        "one_worker_trials": study.one_worker_trials,
        "console": {"verbose": study.verbose if study.saved_verbose is None else study.saved_verbose,
                    "status_every_s": study.status_every_s},
        "fixed": study.fixed,
        "searched": {k: {d.kind: list(d.args)} for k, d in study.searched.items()},
        "points_to_evaluate": study.points_to_evaluate,
    }
    with fs.open_output_stream(f"{root}/{STUDY_FILE}") as out:
        out.write(yaml.safe_dump(content, sort_keys=False).encode())


def trial_loss_notice(experiment_path: str, restarts: int):
    """A Tune callback saying in one line when a trial's process died without raising (killed, out of host
    memory, its node gone): which process, and whether the trial runs again from its checkpoint. The
    error's text goes to the trial's error.log. A trial that raised has said its cause itself (run_trial)."""
    from ray.tune import Callback

    from raydist.ray_edge.failures import ERROR_LOG, is_process_loss, lost_worker
    from raydist.storage import write_atomically

    class TrialLossNotice(Callback):
        def on_trial_recover(self, iteration, trials, trial, **info):
            self._say(trial, again=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._say(trial, again=False)

        def _say(self, trial, *, again: bool) -> None:
            error = _trial_error(trial)
            if error is None or not is_process_loss(error):
                return
            node, pid = lost_worker(error)
            cause = f"its process (pid {pid}) on node {node} died without raising an error (killed, or out of host memory)"
            log = f"{experiment_path}/{trial_dirname(trial)}/{ERROR_LOG}"
            try:
                write_atomically(log, f"cause: {cause}\n\n{error}\n".encode())
            except OSError:
                log = None
            then = (f"running it again from its latest checkpoint (restart {trial.num_failures} of {restarts})"
                    if again else "no restart left")
            print(f"trial {trial.trial_id} failed: {cause}; {then}" + (f" (log: {log})" if log else ""), flush=True)

    return TrialLossNotice()


# A stopped trial's Train controller is killed a moment after Tune says the trial ended, and a live one
# renews its request every 20 s: released once at the end, and again once it can no longer renew it.
RELEASE_AFTER_S = (0.0, 25.0)


def train_requests_release(study_name: str):
    """A Tune callback that gives back what ended trials' Train runs still ask of the cluster
    (raydist.ray_edge.status.release_train_requests): a trial ASHA stopped, or one that failed, never cancels its
    run's request itself, and Ray would keep it for 180 s. Released when the trial ends and 25 s later, in a
    thread of its own (a release reads Ray Train's run list from the dashboard: 1-2 s that Tune's loop does
    not wait for); `release_all` at the study's end (Ctrl+C included) gives back whatever this study's
    trials still hold."""
    import queue
    import threading

    from ray.tune import Callback

    from raydist.ray_edge import status

    def release(trial_ids: set[str]) -> None:
        try:
            status.release_train_requests({train_run_name(study_name, t) for t in trial_ids})
        except Exception as exc:  # noqa: BLE001 - Ray lets the requests expire after 180 s anyway
            print(f"warning: could not give back the resource requests of ended trials ({type(exc).__name__}: "
                  f"{exc}); Ray drops them within 180 s", flush=True)

    class TrainRequestsRelease(Callback):
        raydist_release = True  # a restored study gets today's (Tune saves callbacks with the experiment)

        def __init__(self):
            self.ended: dict[str, float] = {}  # trial id -> when it ended (monotonic)
            self.seen: set[str] = set()
            self.released: dict[str, int] = {}  # trial id -> releases asked for
            self._queue = self._thread = None

        def __getstate__(self):  # Tune saves its callbacks with the experiment: not the thread
            return {**self.__dict__, "_queue": None, "_thread": None}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.seen.add(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended.setdefault(trial.trial_id, time.monotonic())

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended.setdefault(trial.trial_id, time.monotonic())

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            due = {t for t, at in self.ended.items() if self.released.get(t, 0) < len(RELEASE_AFTER_S)
                   and now - at >= RELEASE_AFTER_S[self.released.get(t, 0)]}
            if not due:
                return
            for t in due:
                self.released[t] = self.released.get(t, 0) + 1
            if self._thread is None:
                self._queue = queue.Queue()
                self._thread = threading.Thread(target=self._work, name="raydist-release", daemon=True)
                self._thread.start()
            self._queue.put(due)

        def _work(self) -> None:
            while (trial_ids := self._queue.get()) is not None:
                release(trial_ids)

        def release_all(self) -> None:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=60)
            release(self.seen)

    return TrainRequestsRelease()


def study_console(study: Study, experiment_path: str, concurrency: int, *, cluster_has_gpus: bool):
    """The study's default console (a Tune callback): one line per trial event (started with its values and
    resources; its epochs' metric, every epoch or every Nth for long trials; stopped by ASHA at a rung;
    finished, target reached or diverged; failed with its one-line cause; restarted) and a status line every
    study.status_every_s seconds; it also keeps the study's record for `raydist.cluster status` current."""
    from ray.tune import Callback

    from raydist.ray_edge import status
    from raydist.output import report
    from raydist.output import console
    from raydist.ray_edge.failures import ERROR_LOG, is_process_loss

    def say(line: str) -> None:
        print(line, flush=True)

    class StudyConsole(Callback):
        raydist_console = True

        def __init__(self):
            self.t0 = time.monotonic()
            self.next_status = self.t0 + study.status_every_s
            self.best: dict[str, tuple] = {}  # trial id -> (best metric, its epoch, its val_loss)
            self.epochs: dict[str, int] = {}  # trial id -> epochs reported
            self.started: dict[str, float] = {}  # trial id -> when it (last) started
            self.durations: list[float] = []  # of the trials that ended
            self.seen: set[str] = set()
            self.done: set[str] = set()  # trials that ended (finished, stopped, failed for good)
            self.planned: dict[str, int] = {}  # trial id -> the epochs it is planned for

        def values(self, trial) -> dict:
            return {k: trial.config.get(k) for k in study.searched}

        def epochs_planned(self, trial) -> int:
            if trial.trial_id not in self.planned:
                self.planned[trial.trial_id] = study.planned_config(self.values(trial)).epochs
            return self.planned[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            cfg = study.planned_config(self.values(trial))
            gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_has_gpus
            per = f"{cfg.cpus_per_worker:g} CPU" + (f" + {cfg.gpus_per_worker:g} GPU" if gpu else "")
            where = "in its own process" if study.in_process(cfg) else "TorchTrainer"
            resources = f"{cfg.workers_text()} worker{'s' if cfg.num_workers > 1 else ''} x {per}, {where}"
            say(console.trial_started_line(trial.trial_id, self.values(trial), resources,
                                           restarted=trial.trial_id in self.seen))
            self.seen.add(trial.trial_id)
            self.started[trial.trial_id] = time.monotonic()
            self.publish(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch" not in result:
                return
            epoch, value = int(result["epoch"]), result.get(study.metric)
            self.epochs[trial.trial_id] = epoch
            best = self.best.get(trial.trial_id)
            if isinstance(value, (int, float)) and math.isfinite(value):
                record = (value, epoch, result.get("val_loss"))
                if best is None or self.rank(record) < self.rank(best):
                    self.best[trial.trial_id] = best = record
            planned = self.epochs_planned(trial)
            if epoch % console.report_every(planned) == 0 or epoch >= planned or result.get("stop_reason"):
                say(console.trial_epoch_line(trial.trial_id, result, epochs=planned, metric=study.metric,
                                             best=best[0] if best else None))
            self.publish(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            planned = self.epochs_planned(trial)
            epochs_run = int(last.get("epoch", self.epochs.get(trial.trial_id, 0)))
            status = report.ended_status(last, epochs_run, planned)
            reason = (last.get("divergence") or "") if status == report.DIVERGED else ""
            self.ended(trial)
            best = self.best.get(trial.trial_id)
            say(console.trial_ended_line(trial.trial_id, status=status, epochs_run=epochs_run, epochs=planned,
                                         metric=study.metric, best=best[0] if best else None,
                                         best_epoch=best[1] if best else None, seconds=self.took(trial),
                                         rung=epochs_run if status == report.STOPPED and study.scheduler == "asha"
                                         else None, reason=reason))
            self.publish(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = _trial_error(trial)
            if error is not None and is_process_loss(error):
                return  # TrialLossNotice has said it, with its pid and node
            reason = _error_text(error)
            log = f"{experiment_path}/{trial_dirname(trial)}/{ERROR_LOG}"
            planned = self.epochs_planned(trial)
            say(console.trial_ended_line(trial.trial_id, status=report.ERROR, epochs_run=self.epochs.get(trial.trial_id, 0),
                                         epochs=planned, metric=study.metric, best=None, best_epoch=None,
                                         seconds=None, reason=reason)
                + (f" (tracebacks: {log})" if is_uri(log) or os.path.exists(log) else ""))
            self.ended(trial)
            self.publish(trials)

        def on_trial_recover(self, iteration, trials, trial, **info):
            error = _trial_error(trial)
            if error is not None and is_process_loss(error):
                return  # TrialLossNotice says it
            reason = _error_text(error)
            say(f"trial {trial.trial_id} failed: {reason}; running it again from its latest checkpoint "
                f"(restart {trial.num_failures} of {study.trial_restarts})")

        def on_step_end(self, iteration, trials, **info):
            if study.status_every_s <= 0 or time.monotonic() < self.next_status:
                return
            self.next_status = time.monotonic() + study.status_every_s
            say(self.status_line(trials))

        def on_experiment_end(self, trials, **info):
            if study.status_every_s > 0:
                say(self.status_line(trials))

        # ---- helpers

        def ended(self, trial) -> None:
            self.done.add(trial.trial_id)
            took = self.took(trial)
            if took is not None:
                self.durations.append(took)

        def took(self, trial) -> Optional[float]:
            started = self.started.get(trial.trial_id)
            return time.monotonic() - started if started is not None else None

        def counts(self, trials) -> tuple[int, int, int]:
            # Tune marks a trial TERMINATED or ERROR only after its callbacks ran: the ones that ended are
            # counted from what this console saw (and, on --resume, what Tune restored as ended).
            done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | self.done
            running = sum(t.status == "RUNNING" and t.trial_id not in done for t in trials)
            return running, max(0, study.num_samples - running - len(done)), len(done)

        def best_so_far(self, trials):
            by_id = {t.trial_id: t for t in trials}
            for trial in trials:  # trials a resumed study restored: their best is in what Tune kept of them
                if trial.trial_id not in self.best:
                    value = (getattr(trial, "metric_analysis", None) or {}).get(study.metric, {}).get(study.mode)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.best[trial.trial_id] = (value, None, None)
            scored = [trial_id for trial_id in self.best if trial_id in by_id]
            if not scored:
                return None
            trial_id = min(scored, key=lambda t: self.rank(self.best[t], trial_id=t))  # results.csv's choice too
            return trial_id, self.best[trial_id][0], self.values(by_id[trial_id])

        def rank(self, record: tuple, trial_id: str = "") -> tuple:
            value, epoch, val_loss = record
            return report.ranking(value, mode=study.mode, val_loss=val_loss, epoch=epoch, trial_id=trial_id)

        def status_line(self, trials) -> str:
            running, pending, done = self.counts(trials)
            now = time.monotonic()
            remaining = console.remaining_estimate(
                finished_durations=self.durations, not_started=pending, concurrency=concurrency,
                running=[(now - self.started[t.trial_id], self.epochs.get(t.trial_id, 0), self.epochs_planned(t))
                         for t in trials
                         if t.status == "RUNNING" and t.trial_id in self.started and t.trial_id not in self.done])
            return console.study_status_line(elapsed_s=now - self.t0, running=running, pending=pending, done=done,
                                             total=study.num_samples, best=self.best_so_far(trials),
                                             metric=study.metric, remaining_s=remaining if done < study.num_samples
                                             else None)

        def publish(self, trials) -> None:
            running, _, done = self.counts(trials)
            best = self.best_so_far(trials)
            record = {"name": os.path.basename(experiment_path), "experiment": experiment_path,
                      "metric": study.metric, "total": study.num_samples, "done": done, "running": running,
                      "started_unix": time.time() - (time.monotonic() - self.t0)}
            if best:
                record["best"] = {"trial_id": best[0], "text": console.metric_text(study.metric, best[1]),
                                  "values": console.values_text(best[2])}
            try:
                status.publish_study(os.path.basename(experiment_path), record)
            except Exception:  # noqa: BLE001 - a status record must never stop a study
                pass

    # A console line that cannot be made must never stop the study (Tune ends an experiment whose callback
    # raised): each hook that fails says so and the study goes on.
    for name in [n for n in vars(StudyConsole) if n.startswith("on_")]:
        setattr(StudyConsole, name, _never_raises(getattr(StudyConsole, name)))
    return StudyConsole()


def _never_raises(hook):
    import functools

    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: the study's console skipped a line ({hook.__name__}: {type(exc).__name__}: {exc}); "
                  f"the study goes on", flush=True)

    return guarded


@contextlib.contextmanager
def _quiet_tune_output():
    """While a quiet study runs: Tune's older output engine, silent at verbose=0 (its newer one prints its
    experiment box and paths whatever `verbose` says), and without the whole traceback Tune logs for a
    trial that raised raydist's TrialError: the console says its cause in one line and the tracebacks are
    in the trial's error.log. Any other trial failure (raised before raydist's run started) keeps Tune's
    traceback. Both are undone afterwards; trials never see them (the driver's own settings)."""
    import logging

    class TrialErrorTracebacks(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            return not (record.getMessage().startswith("Trial task failed for trial ") and error is not None
                        and "TrialError: " in f"{type(error).__name__}: {error}")

    logger = logging.getLogger("ray.tune.execution.tune_controller")  # RAY: the module logger that logs them
    quiet, before = TrialErrorTracebacks(), os.environ.get("RAY_AIR_NEW_OUTPUT")
    logger.addFilter(quiet)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _error_text(error) -> str:
    """A trial's error in one line: the cause run_trial raised (a TrialError, which Tune may hand back
    wrapped with the trial's traceback), else the root cause of whatever it is."""
    import re

    from raydist.errors import TrialError
    from raydist.ray_edge.failures import root_cause

    if error is None:
        return "unknown error (Tune kept none)"
    for line in reversed(f"{error}".splitlines()):
        found = re.search(r"TrialError: (.+)", line)
        if found:
            return found.group(1).strip()
    if isinstance(error, TrialError):
        return f"{error}".strip().splitlines()[0]
    return root_cause(error)


def _trial_error(trial):
    """The exception a trial just failed with: Tune pickles it into the trial's local folder at once and
    copies it to the experiment's storage later."""
    import cloudpickle

    try:
        if trial.run_metadata.pickled_error_filename and os.path.isfile(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as fh:
                return cloudpickle.load(fh)
        return trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - a notice must never break the study
        return None


def _logger_callbacks(plan: Plan) -> list:
    callbacks = []
    if plan.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        from raydist.output.wandb_log import key_present

        if not os.environ.get("WANDB_MODE") and not key_present():
            # No key: log offline into the experiment folder; `wandb sync <experiment>/wandb/offline-run-*`
            # uploads later. Ray's callback reads the mode from the environment.
            os.environ["WANDB_MODE"] = "offline"
            print(f"W&B: no API key found, logging offline to {plan.experiment_path}/wandb", flush=True)
        callbacks.append(WandbLoggerCallback(project=plan.wandb_project or plan.study.name, group=plan.name,
                                             mode=os.environ.get("WANDB_MODE"),
                                             dir=plan.experiment_path if not is_uri(plan.experiment_path) else None))
    if plan.mlflow_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=plan.mlflow_uri, experiment_name=plan.study.name,
                                              tags={"experiment": plan.name}))
    return callbacks


# ---- after the study: the table and where everything is -----------------------------------------------


def print_result(result: StudyResult, study: Study) -> None:
    print(report.format_table(result.rows, searched=list(study.searched), metric=study.metric, mode=study.mode))
    where = result.experiment_path
    if result.best:
        b = result.best
        values = ", ".join(f"{k}={report.cell(k, b[k])}" for k in study.searched)
        print(f"\nbest trial {b['trial_id']}: {study.metric} {report.cell(study.metric, b[f'best_{study.metric}'])} "
              f"at epoch {b['best_epoch']}{_weights_note(b)} ({values})")
        print(f"  checkpoint:   {result.best_checkpoint}")
        if result.best_model:
            print(f"  best weights: {result.best_model}")
            print(f"  retrain it:   python -m raydist.train --config {where}/best_config.yaml")
    else:
        print("\nno trial reported a result")
    for row in result.rows:  # each failed trial's cause in one line, and where its tracebacks are
        if row["status"] == report.ERROR:
            log = f"{where}/trial_{row['trial_id']}/error.log"  # raydist.ray_edge.failures.ERROR_LOG
            print(f"trial {row['trial_id']} failed: {row['error']}"
                  + (f"  (tracebacks: {log})" if is_uri(where) or os.path.exists(log) else ""))
    print(f"results: {where}/results.csv  curves: {where}/learning_curves.png  searched values: "
          f"{where}/search_values.png  TensorBoard: tensorboard --logdir {where}  ({result.seconds:.0f}s)")
    if result.interrupted:
        print(f"interrupted; continue with: python -m raydist.tune --resume {where}")


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
    test_line = final_eval.summary_line(final_eval.measure_study(result))  # the best model on the test split, once
    print_result(result, plan.study)
    if test_line:
        print(test_line, flush=True)
    if result.interrupted:
        return 130
    return 0 if any(r["status"] != report.ERROR for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
