"""TODO docstring: raydist.ray_edge.study."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Optional
from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig
from raydist.study.study_file import Study
from raydist.ray_edge.results import StudyResult, summarize
from raydist.storage import is_uri
from raydist.ray_edge.study_console import study_console
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
    save_study(study, plan.experiment_path)  # on --resume: with the concurrency and data_dir given now
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
