"""One trial of a study: its function (`run_trial`: the trial's config, one worker in its own process or a
TorchTrainer), its resources and names, the callback that hands Tune each epoch, its errors in one line,
and what an interrupted or lost trial gives back to the cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from raydist.study.study import Study

# A trial's process logs each Tune checkpoint it reports and restores from (a PBT trial's offers) at INFO,
# a line per perturbation per trial; the study's console says what matters of them.
for _logger in ("ray.train._internal.storage", "ray.tune.trainable.trainable"):  # RAY: their module loggers
    logging.getLogger(_logger).setLevel(logging.WARNING)


def run_trial(sample: dict, study: Study, experiment_path: str) -> None:
    """Tune calls this once per trial (and again when a restored study resumes it)."""
    started = time.time()  # the trial's start-up (results.csv startup_s) is counted from here
    import ray.tune

    from raydist.ray_edge.fit import fit, fit_in_trial
    from raydist.ray_edge.history import HistoryCallback
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
            on_report, pin_every, extra = ray.tune.report, 0, None
            if study.population:  # PBT: maybe another trial's weights first; offers at each perturbation
                from raydist.ray_edge.population import offering_report, take_offer

                values = {k: v for k, v in study.decode(sample).items() if k in study.searched}
                take_offer(study, trial_id=context.get_trial_id(), trial_path=trial_path,
                           run_dir=f"{trial_path}/{run_name}", values=values, started_unix=started)
                on_report = offering_report(study, context.get_trial_id(), values)
                pin_every, extra = study.perturbation_interval, {"values": values}
            fit_in_trial(cfg, trial_path=trial_path, on_report=on_report, started_unix=started, console=console,
                         pin_every=pin_every, history_extra=extra)
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
            error = trial_error(trial)
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


def never_raises(hook):
    import functools

    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: the study's console skipped a line ({hook.__name__}: {type(exc).__name__}: {exc}); "
                  f"the study goes on", flush=True)

    return guarded


def trial_error_text(error) -> str:
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


def trial_error(trial):
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
