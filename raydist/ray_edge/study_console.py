"""What a study's console says: one line when a trial starts, reports, stops early, finishes or fails, and
a status line every so often with the best trial so far and an estimate of the time left (Tune's own
tables only with --verbose). Imported when a study runs (it loads Ray Tune).
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

from ray.tune import Callback  # RAY: a Tune callback

from raydist.output import console, report
from raydist.ray_edge import status
from raydist.ray_edge.failures import ERROR_LOG, is_process_loss
from raydist.ray_edge.trials import never_raises, trial_dirname, trial_error, trial_error_text
from raydist.storage import is_uri
from raydist.study.study import Study


def say(line: str) -> None:
    with console.PRINT_LOCK:  # Ray's forwarding thread prints its lines in pieces: ours starts a line of its own
        print(line, flush=True)


class StudyConsole(Callback):
    """The study's default console (a Tune callback): one line per trial event (started with its values and
    resources; its epochs' metric, every epoch or every Nth for long trials; stopped by ASHA at a rung;
    finished, target reached or diverged; failed with its one-line cause; restarted) and a status line every
    study.status_every_s seconds; it also keeps the study's record for `raydist.cluster status` current.
    A hook that fails says so and the study goes on (Tune ends an experiment whose callback raised)."""
    raydist_console = True

    def __init__(self, study: Study, experiment_path: str, concurrency: int, *, cluster_has_gpus: bool):
        super().__init__()
        self.study, self.experiment_path, self.concurrency = study, experiment_path, concurrency
        self.cluster_has_gpus = cluster_has_gpus
        self.t0 = time.monotonic()
        self.next_status = self.t0 + self.study.status_every_s
        self.best: dict[str, tuple] = {}  # trial id -> (best metric, its epoch, its val_loss)
        self.epochs: dict[str, int] = {}  # trial id -> epochs reported
        self.started: dict[str, float] = {}  # trial id -> when it (last) started
        self.durations: list[float] = []  # of the trials that ended
        self.seen: set[str] = set()
        self.done: set[str] = set()  # trials that ended (finished, stopped, failed for good)
        self.planned: dict[str, int] = {}  # trial id -> the epochs it is planned for

    def values(self, trial) -> dict:
        return self.study.applying({k: trial.config[k] for k in self.study.searched if k in trial.config})

    def epochs_planned(self, trial) -> int:
        if trial.trial_id not in self.planned:
            self.planned[trial.trial_id] = self.study.planned_config(self.values(trial)).epochs
        return self.planned[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.study.population and trial.trial_id in self.seen:  # PBT shares the slots out at each perturbation
            self.started[trial.trial_id] = time.monotonic()
            return
        cfg = self.study.planned_config(self.values(trial))
        gpu = cfg.use_gpu if cfg.use_gpu is not None else self.cluster_has_gpus
        per = f"{cfg.cpus_per_worker:g} CPU" + (f" + {cfg.gpus_per_worker:g} GPU" if gpu else "")
        where = "in its own process" if self.study.in_process(cfg) else "TorchTrainer"
        resources = f"{cfg.workers_text()} worker{'s' if cfg.num_workers > 1 else ''} x {per}, {where}"
        say(console.trial_started_line(trial.trial_id, self.values(trial), resources,
                                       restarted=trial.trial_id in self.seen))
        self.seen.add(trial.trial_id)
        self.started[trial.trial_id] = time.monotonic()
        self.publish(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        epoch, value = int(result["epoch"]), result.get(self.study.metric)
        self.epochs[trial.trial_id] = epoch
        best = self.best.get(trial.trial_id)
        if isinstance(value, (int, float)) and math.isfinite(value):
            record = (value, epoch, result.get("val_loss"))
            if best is None or self.rank(record) < self.rank(best):
                self.best[trial.trial_id] = best = record
        planned = self.epochs_planned(trial)
        if epoch % console.report_every(planned) == 0 or epoch >= planned or result.get("stop_reason"):
            say(console.trial_epoch_line(trial.trial_id, result, epochs=planned, metric=self.study.metric,
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
                                     metric=self.study.metric, best=best[0] if best else None,
                                     best_epoch=best[1] if best else None, seconds=self.took(trial),
                                     rung=epochs_run if status == report.STOPPED and self.study.scheduler == "asha"
                                     else None, reason=reason))
        self.publish(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial_error(trial)
        if error is not None and is_process_loss(error):
            return  # TrialLossNotice has said it, with its pid and node
        reason = trial_error_text(error)
        log = f"{self.experiment_path}/{trial_dirname(trial)}/{ERROR_LOG}"
        planned = self.epochs_planned(trial)
        say(console.trial_ended_line(trial.trial_id, status=report.ERROR, epochs_run=self.epochs.get(trial.trial_id, 0),
                                     epochs=planned, metric=self.study.metric, best=None, best_epoch=None,
                                     seconds=None, reason=reason)
            + (f" (tracebacks: {log})" if is_uri(log) or os.path.exists(log) else ""))
        self.ended(trial)
        self.publish(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        error = trial_error(trial)
        if error is not None and is_process_loss(error):
            return  # TrialLossNotice says it
        reason = trial_error_text(error)
        say(f"trial {trial.trial_id} failed: {reason}; running it again from its latest checkpoint "
            f"(restart {trial.num_failures} of {self.study.trial_restarts})")

    def on_step_end(self, iteration, trials, **info):
        if self.study.status_every_s <= 0 or time.monotonic() < self.next_status:
            return
        self.next_status = time.monotonic() + self.study.status_every_s
        say(self.status_line(trials))

    def on_experiment_end(self, trials, **info):
        if self.study.status_every_s > 0:
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
        return running, max(0, self.study.num_samples - running - len(done)), len(done)

    def best_so_far(self, trials):
        by_id = {t.trial_id: t for t in trials}
        for trial in trials:  # trials a resumed study restored: their best is in what Tune kept of them
            if trial.trial_id not in self.best:
                value = (getattr(trial, "metric_analysis", None) or {}).get(self.study.metric, {}).get(self.study.mode)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.best[trial.trial_id] = (value, None, None)
        scored = [trial_id for trial_id in self.best if trial_id in by_id]
        if not scored:
            return None
        trial_id = min(scored, key=lambda t: self.rank(self.best[t], trial_id=t))  # results.csv's choice too
        return trial_id, self.best[trial_id][0], self.values(by_id[trial_id])

    def rank(self, record: tuple, trial_id: str = "") -> tuple:
        value, epoch, val_loss = record
        return report.ranking(value, mode=self.study.mode, val_loss=val_loss, epoch=epoch, trial_id=trial_id)

    def status_line(self, trials) -> str:
        running, pending, done = self.counts(trials)
        now = time.monotonic()
        remaining = console.remaining_estimate(
            finished_durations=self.durations, not_started=pending, concurrency=self.concurrency,
            running=[(now - self.started[t.trial_id], self.epochs.get(t.trial_id, 0), self.epochs_planned(t))
                     for t in trials
                     if t.status == "RUNNING" and t.trial_id in self.started and t.trial_id not in self.done])
        return console.study_status_line(elapsed_s=now - self.t0, running=running, pending=pending, done=done,
                                         total=self.study.num_samples, best=self.best_so_far(trials),
                                         metric=self.study.metric,
                                         remaining_s=remaining if done < self.study.num_samples else None)

    def publish(self, trials) -> None:
        running, _, done = self.counts(trials)
        best = self.best_so_far(trials)
        record = {"name": os.path.basename(self.experiment_path), "experiment": self.experiment_path,
                  "metric": self.study.metric, "total": self.study.num_samples, "done": done, "running": running,
                  "started_unix": time.time() - (time.monotonic() - self.t0)}
        if best:
            record["best"] = {"trial_id": best[0], "text": console.metric_text(self.study.metric, best[1]),
                              "values": console.values_text(best[2])}
        try:
            status.publish_study(os.path.basename(self.experiment_path), record)
        except Exception:  # noqa: BLE001 - a status record must never stop a study
            pass


for _name in [n for n in vars(StudyConsole) if n.startswith("on_")]:
    setattr(StudyConsole, _name, never_raises(getattr(StudyConsole, _name)))
