"""A study on Ray Tune: `run_study(plan)` builds the Tuner (searcher, scheduler, loggers, trial resources
and concurrency planned from what the cluster has and can grow to), publishes the study for `raydist.cluster
status`, runs it and summarises the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Optional

from raydist.config.fields import TrainConfig
from raydist.errors import ConfigError
from raydist.ray_edge.results import StudyResult, summarize
from raydist.ray_edge.trials import (
    run_trial,
    train_requests_release,
    trial_dirname,
    trial_loss_notice,
    trial_name,
    trial_resources,
)
from raydist.storage import is_uri
from raydist.study.study import Study
from raydist.study.study_file import save_study


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
    wait_for_workers_s: float = TrainConfig.wait_for_workers_s  # on an autoscaling cluster, for the first trial
    wandb: bool = False
    wandb_project: Optional[str] = None
    mlflow_uri: Optional[str] = None


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
    decode = _decode_cpus(study)
    free_cpus, total_cpus = free_cpus - decode, total_cpus - decode
    if fewest_cpus > total_cpus or fewest_gpus > total_gpus:
        raise ConfigError(f"one trial needs {fewest_cpus:g} CPUs and {fewest_gpus:g} GPUs (num_workers x "
                          f"cpus/gpus_per_worker) but {where} has {total_cpus:g} CPUs and {total_gpus:g} GPUs; "
                          f"lower fixed num_workers")
    return max(1, min(_fits(free_cpus, cpus, free_gpus, gpus, study.num_samples), requested or study.num_samples,
                      study.num_samples))


def _fits(free_cpus: float, cpus: float, free_gpus: float, gpus: float, otherwise: int) -> int:
    """Trials of (cpus, gpus) that fit (free_cpus, free_gpus); `otherwise` where nothing bounds them (an
    unknown limit is math.inf)."""
    fits = math.floor(free_cpus / cpus + 1e-9) if cpus and math.isfinite(free_cpus) else otherwise
    if gpus and math.isfinite(free_gpus):
        fits = min(fits, math.floor(free_gpus / gpus + 1e-9))
    return fits


def _decode_cpus(study: Study) -> float:
    """CPUs a study leaves to Ray Data's decoding when it streams an image folder (raydist.ray_edge.stream)."""
    if not streams_a_folder(study):
        return 0.0
    from raydist.data.folder import DECODE_CPUS

    return DECODE_CPUS


def trials_that_fit_now(study: Study, *, cluster_has_gpus: bool, every_s: float = 2.0):
    """For a cluster whose autoscaler's limit is unknown: a function giving the trials to run at once now,
    those the cluster's nodes hold plus one that waits (the demand that makes the autoscaler add the next
    node), read from the cluster at most every `every_s`. The study's concurrency grows as nodes arrive."""
    import ray

    cpus, gpus = study.per_trial_resources(cluster_has_gpus=cluster_has_gpus)
    decode = _decode_cpus(study)
    last = {"at": -math.inf, "value": 1}

    def now() -> int:
        if time.monotonic() - last["at"] >= every_s:
            total = ray.cluster_resources()
            held = _fits(total.get("CPU", 0.0) - decode, cpus, total.get("GPU", 0.0), gpus, study.num_samples)
            last.update(at=time.monotonic(), value=max(0, held) + 1)
        return last["value"]

    return now


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


def run_study(plan: Plan) -> StudyResult:
    """Run the study `plan` names on the connected (or a new local) cluster and summarise its trials."""
    from raydist.ray_edge import search
    from raydist.ray_edge.study_console import StudyConsole

    t0 = time.perf_counter()
    study = plan.study
    cap, concurrency = _connect_and_plan(plan)
    if _say_the_plan(plan, cap, concurrency):
        _wait_for_first_trial(plan, cap)  # a wait that ends unanswered leaves no experiment folder behind
    save_study(study, plan.experiment_path)  # on --resume: with the concurrency and data_dir given now
    if not cap.limit_known:
        search.set_concurrency_now(trials_that_fit_now(study, cluster_has_gpus=cap.max_gpus > 0))
    # The console's trial lines and status line, and the study's record for `raydist.cluster status`.
    console = [] if study.verbose else [StudyConsole(study, plan.experiment_path, concurrency,
                                                      cluster_has_gpus=cap.max_gpus > 0)]
    release = train_requests_release(study.name)
    tuner = _tuner(plan, concurrency, cluster_has_gpus=cap.max_gpus > 0, console=console, release=release)
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
        search.set_concurrency_now(None)
        release.release_all()  # after Ctrl+C too: Tune has stopped every trial by now
        _forget_study(plan.name)
    return summarize(study, grid, plan.experiment_path, seconds=time.perf_counter() - t0)


def _connect_and_plan(plan: Plan):
    """Check this machine (a local cluster), connect, and plan the study's concurrency against what the
    cluster can grow to; (the cluster's capacity, trials at once)."""
    from raydist.ray_edge import planning, session

    study = plan.study
    if plan.address is None:  # a local cluster: check this machine before starting it
        plan_concurrency(study, free_cpus=os.cpu_count() or 1, free_gpus=planning.local_gpu_count(),
                         total_cpus=os.cpu_count() or 1, total_gpus=planning.local_gpu_count(),
                         requested=plan.max_concurrent, where="this machine")
    session.connect(plan.address, quiet=not study.verbose)
    # An autoscaling cluster is planned at its largest: what is free there is what it can grow to, less
    # what is busy now (on a fixed cluster: what is free now).
    cap = planning.capacity()
    if not cap.limit_known and "use_gpu" not in study.searched and study.fixed.get("use_gpu") is None:
        raise ConfigError(f"the cluster's autoscaler ({cap.autoscaler}) does not say whether it can add GPU nodes: "
                          f"set use_gpu in the study's fixed fields, or --set use_gpu=true (or false)")
    concurrency = plan_concurrency(study, free_cpus=cap.max_cpus - (cap.cpus - cap.free_cpus),
                                   free_gpus=cap.max_gpus - (cap.gpus - cap.free_gpus), total_cpus=cap.max_cpus,
                                   total_gpus=cap.max_gpus, requested=plan.max_concurrent, where=cap.where)
    worker = study.smallest_worker(cluster_has_gpus=cap.max_gpus > 0)  # no trial can start if it fits no node
    planning.check_worker_fits_a_node(cap, cpus_per_worker=worker["CPU"], gpus_per_worker=worker["GPU"],
                                      names="fixed or searched cpus_per_worker, gpus_per_worker")
    planning.check_storage(plan.storage_path, cap)  # once for every trial: each trial's folder is inside it
    return cap, concurrency


def _say_the_plan(plan: Plan, cap, concurrency: int) -> bool:
    """The study's first lines: what it searches, how, how many at once, and what it waits for (True:
    it waits for the autoscaler)."""
    from raydist.ray_edge import planning

    study = plan.study
    print(f"study {study.name}: {study.num_samples} trials of {len(study.searched)} searched field(s) "
          f"({', '.join(f'{k}~{d.describe()}' for k, d in study.searched.items())}), {study.search} search, "
          f"{study.scheduler} scheduler, {_at_once(cap, concurrency)}; experiment: {plan.experiment_path}", flush=True)
    startup = max(study.initial_points, len(study.points_to_evaluate))  # as raydist.ray_edge.search.TPEGate counts
    if study.search in ("hyperopt", "optuna") and concurrency > startup:
        print(f"TPE: the first {startup} trials are start-up points; later ones wait until {study.initial_points} "
              f"trials have finished", flush=True)
    if study.population:
        from raydist.study.population import perturbed_fields

        print(f"{study.scheduler.upper()}: every {study.perturbation_interval} epochs the bottom "
              f"{study.quantile_fraction:.0%} of the trials take the weights of the top {study.quantile_fraction:.0%} "
              f"and perturb {', '.join(perturbed_fields(study.searched))}", flush=True)
    for warning in study.warnings:
        print(f"warning: {warning}", flush=True)
    first = _first_trial(plan, cap)
    waiting = planning.waiting_line(cap, who=FIRST_TRIAL, cpus=sum(b["CPU"] for b in first),
                                    gpus=sum(b["GPU"] for b in first))
    if waiting:
        print(waiting, flush=True)
    return waiting is not None


def _at_once(cap, concurrency: int) -> str:
    if cap.limit_known:
        return f"{concurrency} at once"
    return f"up to {concurrency} at once as the autoscaler adds nodes"


def _first_trial(plan: Plan, cap) -> list[dict]:
    """The worker bundles the study's start waits for: its smallest trial's (the others follow as nodes
    come; a known limit is an upper bound the cloud may not reach)."""
    return plan.study.smallest_trial_bundles(cluster_has_gpus=cap.max_gpus > 0)


FIRST_TRIAL = "the study's first trial needs"


def _wait_for_first_trial(plan: Plan, cap) -> None:
    """Hold the study's start until the autoscaler has added what its first trial needs, at most
    --wait-for-workers-s (ConfigError naming what never came; Tune would wait for them forever)."""
    from raydist.ray_edge.autoscaler import wait_for_bundles

    waited = wait_for_bundles(_first_trial(plan, cap), timeout_s=plan.wait_for_workers_s, who=FIRST_TRIAL)
    print(f"the autoscaler added what {FIRST_TRIAL} in {waited:.0f} s", flush=True)


def _tuner(plan: Plan, concurrency: int, *, cluster_has_gpus: bool, console: list, release):
    """The study's Tuner, new or restored (--resume), its trials run by raydist.ray_edge.trials.run_trial."""
    import ray.tune

    from raydist.ray_edge import search
    from raydist.ray_edge.search import tune_space

    study = plan.study
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, study=study, experiment_path=plan.experiment_path),
        trial_resources(study, cluster_has_gpus=cluster_has_gpus))
    if plan.resume:
        # Tune rebuilds the searcher and scheduler from what it saved; the searcher takes today's concurrency
        # and the scheduler its rungs from the trials' histories (raydist.ray_edge.history).
        search.set_resume_concurrency(concurrency)
        tuner = ray.tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True)
        # Tune restores the callbacks it saved: the console is today's (a fresh clock, --verbose as given now).
        run_config = tuner._local_tuner.get_run_config()  # RAY (internal): no public way to change it on restore
        run_config.callbacks = [c for c in run_config.callbacks or []
                                if not getattr(c, "raydist_console", False) and not getattr(c, "raydist_release", False)]
        run_config.callbacks += [*console, release]
        run_config.verbose = 1 if study.verbose else 0
        return tuner
    return ray.tune.Tuner(
        trainable,
        param_space=tune_space(study),
        tune_config=ray.tune.TuneConfig(metric=study.metric, mode=study.mode, num_samples=study.num_samples,
                                        search_alg=_searcher(study, concurrency), scheduler=_scheduler(study),
                                        trial_name_creator=trial_name,  # the searchers cap concurrency
                                        trial_dirname_creator=trial_dirname,
                                        # In-process trials: a finished trial's process (torch and the models
                                        # imported, the raw digits cached) trains the next one; TorchTrainer
                                        # drivers keep a process each, as Ray Train expects.
                                        reuse_actors=study.every_trial_in_process()),
        run_config=ray.tune.RunConfig(name=plan.name, storage_path=plan.storage_path,
                                      callbacks=[*_logger_callbacks(plan),
                                                 trial_loss_notice(plan.experiment_path, study.trial_restarts),
                                                 release, *console],
                                      # A trial that raised is run again this often; it resumes from its
                                      # latest checkpoint (its Train run keeps its name).
                                      failure_config=ray.tune.FailureConfig(max_failures=study.trial_restarts),
                                      # Ray's own tables and result boxes only when asked for.
                                      verbose=1 if study.verbose else 0),
    )


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

    from raydist.ray_edge.search import RandomSearch, TPEGate, optuna_searcher

    if study.search == "optuna":
        return TPEGate(optuna_searcher(study), initial_points=study.initial_points,
                       points_to_evaluate=len(study.points_to_evaluate), max_concurrent=concurrency)
    if study.search == "hyperopt":
        return TPEGate(HyperOptSearch(points_to_evaluate=study.points_to_evaluate or None,
                                      n_initial_points=study.initial_points, random_state_seed=study.seed),
                       initial_points=study.initial_points, points_to_evaluate=len(study.points_to_evaluate),
                       max_concurrent=concurrency)
    if study.population:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # PBT's population is every trial at once: Tune starts what fits and PBT shares the slots out at each
        # perturbation (a trial not yet created could never give or take weights), so no limit that a
        # growing cluster raises (RandomSearch's) applies.
        return BasicVariantGenerator(points_to_evaluate=study.points_to_evaluate or None, random_state=study.seed,
                                     max_concurrent=study.num_samples)
    return RandomSearch(points_to_evaluate=study.points_to_evaluate or None, random_state=study.seed,
                        max_concurrent=concurrency)


def _scheduler(study: Study):
    from ray.tune.schedulers import FIFOScheduler

    from raydist.ray_edge.history import ASHAWithHistory

    if study.population:
        from raydist.ray_edge.population import population_scheduler

        return population_scheduler(study)
    if study.scheduler == "asha":
        # stop_last_trials=False: a trial that reaches its own last epoch finishes normally.
        return ASHAWithHistory(time_attr="epoch", max_t=study.max_epochs, grace_period=study.grace_period,
                               reduction_factor=study.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


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
