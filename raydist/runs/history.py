"""history.jsonl, a run's or trial's record of every reported epoch (one JSON object per line, local or
URI): read it, write it, and keep it across restarts and resumes.
"""

from __future__ import annotations

import json
import math
import time
from typing import Optional

from raydist.storage import filesystem, is_uri

HISTORY_FILE = "history.jsonl"


def read_history(trial_path: str, *, fs=None) -> list[dict]:
    """Every epoch the trial reported (the latest report of each), oldest first; [] when there is none."""
    import pyarrow.fs

    fs, path = (fs, trial_path) if fs is not None else filesystem(trial_path)
    file = f"{path}/{HISTORY_FILE}"
    if fs.get_file_info(file).type != pyarrow.fs.FileType.File:
        return []
    with fs.open_input_stream(file) as fh:
        lines = fh.read().decode().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed writer: the epochs before it stand
            break
    return records


def _write_history(trial_path: str, records: list[dict]) -> None:
    """Rewrite the whole file (object stores cannot append); a local file is replaced atomically."""
    import os

    fs, path = filesystem(trial_path)
    fs.create_dir(path, recursive=True)
    text = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()  # NaN stays NaN
    if not is_uri(trial_path):
        tmp = f"{path}/.{HISTORY_FILE}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(text)
        os.replace(tmp, f"{path}/{HISTORY_FILE}")
    else:
        with fs.open_output_stream(f"{path}/{HISTORY_FILE}") as out:
            out.write(text)


class HistoryWriter:
    """Appends each report (rank 0's metrics, the checkpoint's path) to the trial's history.jsonl.

    A resumed trial replays the epochs after its last checkpoint: a report for epoch e replaces the records
    of epoch e and later, so the history is always one consistent run. Adds the timings Tune would:
    `time_this_iter_s` (since the last report or the trial's start) and `time_total_s` (summed over every
    attempt, so the time lost to an interruption counts as spent). `started_unix`: when the trial's attempt
    started (default: now).
    """

    def __init__(self, trial_path: str, started_unix: Optional[float] = None):
        self.trial_path = trial_path
        self.records = read_history(trial_path)
        self.spent_before = self.records[-1].get("time_total_s", 0.0) if self.records else 0.0
        self.started = self.last = started_unix or time.time()

    def add(self, metrics: dict, checkpoint_path: Optional[str]) -> None:
        if metrics.get("partial_epoch"):  # a spot notice's checkpoint inside an epoch: the epoch is recorded at its end
            return
        now = time.time()
        record = dict(metrics)
        record.update(checkpoint_path=checkpoint_path, reported_unix=now, time_this_iter_s=now - self.last,
                      time_total_s=self.spent_before + now - self.started)
        self.last = now
        self._put(record)

    def recover(self, metrics: dict, checkpoint_path: str) -> None:
        """Put on record an epoch whose checkpoint was written but whose report was not (the process died
        in between): its metrics come from the checkpoint; its time is the epoch's own, added to the
        time already spent."""
        record = dict(metrics)
        seconds = record.get("epoch_time_s", 0.0)
        self.spent_before += seconds
        record.update(checkpoint_path=checkpoint_path, reported_unix=time.time(), time_this_iter_s=seconds,
                      time_total_s=self.spent_before, recovered=True)
        self._put(record)

    def exploited(self, metrics: dict, checkpoint_path: str, source: dict) -> dict:
        """Put on record that the trial took another's weights (raydist.runs.lineage): `metrics` are that
        trial's at the epoch it trained them to, which this record stands for; the time spent so far is
        the trial's own (none passes in the exchange). Returns the record."""
        now = time.time()
        record = dict(metrics)
        record.update(checkpoint_path=checkpoint_path, reported_unix=now, time_this_iter_s=0.0,
                      time_total_s=self.spent_before, exploited=source)
        self._put(record)
        return record

    def _put(self, record: dict) -> None:
        """`record` on file as its epoch's, in place of that epoch and any later one (a lineage continues from it)."""
        self.records = [r for r in self.records if r.get("epoch", math.inf) < record["epoch"]] + [record]
        _write_history(self.trial_path, self.records)

    def kept_checkpoints(self) -> list[tuple[dict, str]]:
        """(record, path) of each recorded checkpoint still in storage: what a resumed trial keeps ranking."""
        import pyarrow.fs

        kept = []
        for record in self.records:
            path = record.get("checkpoint_path")
            if isinstance(path, str) and path:
                fs, inner = filesystem(path)
                if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
                    kept.append((record, path))
        return kept
