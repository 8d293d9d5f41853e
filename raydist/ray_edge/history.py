"""What a study remembers of each trial across interruptions: its per-epoch history, and ASHA's rungs.

    callback = HistoryCallback(f"{experiment}/trial_{id}")   # in the trial's Train RunConfig(callbacks=...)
    history = read_history(f"{experiment}/trial_{id}")       # every epoch the trial reported, oldest first
    scheduler = ASHAWithHistory(time_attr="epoch", max_t=8, ...)  # rebuilds its rungs on --resume

Why raydist keeps its own history: Tune's progress.csv / result.json of a resumed trial are restored only
for trials that handed Tune a checkpoint (ours hand checkpoints to Train, not Tune), so when a resume runs
in a new Ray session the earlier epochs of every interrupted trial vanish from them. `history.jsonl`
(one JSON object per reported epoch, in the trial's folder) is written by the trial's Train controller
after each report, so it holds every epoch whatever happens to the driver.

Why the scheduler subclass: Ray saves neither ASHA's rung records nor its state with the experiment, so a
restored study starts with empty rungs and the first trials to reach each rung after a resume are never
stopped. ASHAWithHistory replays each restored trial's saved history into its bracket as the trial is
added back, which rebuilds the records exactly as ASHA made them. A study killed after ASHA decided to
stop a trial but before Tune saved that, restores the trial as unfinished, with its rung already on record:
plain ASHA would never judge it again and it would train past its rung. So each restored unfinished trial's
rung decisions are made again at its first new result, against the records of the trials that reached each
rung before it did (the history's `reported_unix`), as the uninterrupted study made them.
"""

from __future__ import annotations

import math
from typing import Optional

from ray.train import UserCallback
from ray.tune.schedulers import ASHAScheduler

from raydist.runs.history import HistoryWriter, read_history

# ---- the history file ----------------------------------------------------------------------------------


class HistoryCallback(UserCallback):
    """A Train callback that writes each report into the trial's history (HistoryWriter). Created in the
    trial's driver when (re)starting the trial; runs in the Train controller."""

    def __init__(self, trial_path: str, started_unix: Optional[float] = None):
        self.writer = HistoryWriter(trial_path, started_unix)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.writer.add(metrics[0], checkpoint.path if checkpoint else None)


# ---- ASHA that survives a resume -----------------------------------------------------------------------


def replay_history(scheduler: ASHAScheduler, trial_id: str, history: list[dict]) -> None:
    """Feed a trial's saved per-epoch results to its bracket, as ASHA saw them when they were reported.

    Only the records are rebuilt: the decisions those results led to were taken at the time (a stopped
    trial is stopped, a running one was allowed on).
    """
    bracket = scheduler._trial_info.get(trial_id)
    metric, sign, time_attr = scheduler._metric, scheduler._metric_op, scheduler._time_attr
    if bracket is None or metric is None or sign is None:
        return
    stub = _TrialId(trial_id)
    for record in history:
        if isinstance(record.get(time_attr), (int, float)) and isinstance(record.get(metric), (int, float)):
            bracket.on_result(stub, record[time_attr], sign * record[metric])


class _TrialId:
    """What a bracket reads of a trial."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class ASHAWithHistory(ASHAScheduler):
    """ASHAScheduler whose rung records come back on --resume, rebuilt from each trial's history.jsonl,
    and whose decisions on a restored unfinished trial are applied at its first new result."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._histories: dict[str, list[dict]] = {}  # restored trials' saved histories
        self._unjudged: set[str] = set()  # restored unfinished trials that have reported nothing new yet

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # A new trial has no history yet; a restored one (finished, stopped or interrupted) has its own.
        storage = getattr(trial, "storage", None)
        if storage is not None and getattr(storage, "trial_dir_name", None):
            history = read_history(storage.trial_fs_path, fs=storage.storage_filesystem)
            replay_history(self, trial.trial_id, history)
            if history:
                self._histories[trial.trial_id] = history
                if getattr(trial, "status", None) not in ("TERMINATED", "ERROR"):
                    self._unjudged.add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._unjudged:
            self._unjudged.discard(trial.trial_id)
            if self._stopped_at_a_rung(trial.trial_id):
                self._num_stopped += 1
                return self.STOP
        return super().on_trial_result(tune_controller, trial, result)

    def _stopped_at_a_rung(self, trial_id: str) -> bool:
        """Did ASHA stop this trial at a rung its saved history reached (judged against the trials whose
        result at that rung was reported before its own)?"""
        bracket = self._trial_info.get(trial_id)
        if bracket is None:
            return False
        peers = [t for t in self._histories if self._trial_info.get(t) is bracket]
        for milestone, _ in bracket._rungs:
            own = _arrival(self._histories[trial_id], milestone, self._time_attr, self._metric)
            if own is None:
                continue
            earlier = {}
            for peer in peers:
                at = _arrival(self._histories[peer], milestone, self._time_attr, self._metric)
                if peer != trial_id and at is not None and at[0] < own[0]:
                    earlier[peer] = self._metric_op * at[1]
            cutoff = bracket.cutoff(earlier)
            if cutoff is not None and self._metric_op * own[1] < cutoff:
                return True
        return False


def _arrival(history: list[dict], milestone: float, time_attr: str, metric: str) -> Optional[tuple[float, float]]:
    """(when it was reported, the metric) of the result a trial reached a rung with, or None."""
    for record in history:
        if isinstance(record.get(time_attr), (int, float)) and record[time_attr] >= milestone:
            value = record.get(metric)
            if not isinstance(value, (int, float)):
                return None
            return record.get("reported_unix", math.inf), value
    return None


def rung_records(scheduler: ASHAScheduler) -> dict[float, dict[str, float]]:
    """Milestone -> {trial id: the (sign-adjusted) metric recorded there}, for messages and tests."""
    return {milestone: dict(recorded) for bracket in scheduler._brackets for milestone, recorded in bracket._rungs}

