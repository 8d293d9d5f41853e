"""Where a trial's weights came from under population-based training: a trial that takes another's weights
(PBT's exploit) gets a copy of that trial's checkpoint in its own run folder, and its history.jsonl says so.

    record = adopt(donor, trial_path=..., run_dir=..., values={"lr": 0.36})   # before the trial resumes
    history = read_history(trial_path)   # ..., {"epoch": 4, "exploited": {"trial": "b", "epoch": 4, ...}}, ...

The copy makes the run folder one lineage again: the trial's own checkpoints from the exploit's epoch on
go (their epochs stay in its history only as `replaced`; older ones stay, as records before the exploit,
and an offer of one may still be taken by another trial), and the trial resumes from the copy as from any
checkpoint of its own: a restart after a failure continues the new lineage, and the donor may prune its
folder as it likes.
The exploit's record is the epoch the weights were trained to, with the donor's metrics there, so the
trial's learning curve joins the donor's at that epoch; `replaced` lists the trial's own epochs from there
on that the exploit threw away (their cost is spent, their weights are gone).
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
from typing import Optional

from raydist.runs.history import HistoryWriter, read_history
from raydist.storage import filesystem, read_bytes, write_atomically


@dataclasses.dataclass(frozen=True)
class Donor:
    """A checkpoint another trial offered the population at a perturbation (the exploit step's source)."""
    trial_id: str
    checkpoint: str  # its checkpoint folder (local or URI)
    epoch: int
    values: dict  # its perturbed fields' values when it trained to that epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class DonorGone(Exception):
    """The donor's checkpoint is no longer in storage."""


def already_adopted(history: list[dict], donor: Donor, interval: int) -> bool:
    """Was this donor's checkpoint adopted by this trial's current lineage? True when the trial's last
    exploit is this one and the trial has not offered a checkpoint of its own since (an epoch at a
    perturbation): Tune hands the same checkpoint back on a restart after a failure, and the trial must then
    go on from where its copy led, not copy it again. (A process that dies between putting an offer's epoch
    on record and Tune saving that offer is the one case read wrongly: the exploit is taken again.)"""
    for record in reversed(history):
        source = record.get("exploited")
        if source:
            return (source.get("trial"), source.get("checkpoint"), source.get("epoch")) == \
                (donor.trial_id, donor.checkpoint, donor.epoch)
        epoch = record.get("epoch")
        if isinstance(epoch, int) and epoch % interval == 0 and record.get("checkpoint_path"):
            return False  # an offer of its own came later: Tune's latest checkpoint is that one
    return False


def adopt(donor: Donor, *, trial_path: str, run_dir: str, values: dict, metric: str,
          started_unix: Optional[float] = None) -> dict:
    """Copy the donor's checkpoint into `run_dir` as the trial's only one and put the exploit on record in
    the trial's history (its record returned). DonorGone when the donor's checkpoint is not there."""
    # torch, only here: a study's summary reads lineages without loading it
    from raydist.runs.checkpoints import (CHECKPOINT_FILE, checkpoint_dir_name, checkpoint_folders, epochs_done,
                                          load_checkpoint_file)

    data = read_bytes(f"{donor.checkpoint}/{CHECKPOINT_FILE}")
    if data is None:
        raise DonorGone(f"{donor.checkpoint}")
    state = load_checkpoint_file(io.BytesIO(data), name=f"{donor.checkpoint}/{CHECKPOINT_FILE}")
    for folder in checkpoint_folders(run_dir):  # the old lineage's weights from the exploit's epoch on
        if epochs_done(posixpath.basename(folder)) >= donor.epoch:
            fs, inner = filesystem(folder)
            fs.delete_dir(inner)
    target = posixpath.join(run_dir, checkpoint_dir_name(donor.epoch))
    write_atomically(posixpath.join(target, CHECKPOINT_FILE), data)
    own = read_history(trial_path)
    donor_history = read_history(posixpath.dirname(posixpath.dirname(donor.checkpoint)))
    replaced = [r["epoch"] for r in own if isinstance(r.get("epoch"), int) and r["epoch"] >= donor.epoch]
    writer = HistoryWriter(trial_path, started_unix)
    exploited = {"trial": donor.trial_id, "epoch": donor.epoch, "checkpoint": donor.checkpoint,
                 "from": donor.values, "to": values, "replaced": replaced,
                 "lineage": lineage(donor_history, donor.trial_id, upto=donor.epoch),
                 f"own_{metric}": own[-1].get(metric) if own else None}
    metrics = {**(state.get("metrics") or {}), "epoch": donor.epoch}
    return writer.exploited(metrics, target, exploited)


def lineage(history: list[dict], trial_id: str, *, upto: Optional[int] = None) -> list[dict]:
    """How the weights of a trial's latest epoch (or of epoch `upto`) were trained: segments of
    {"trial", "epochs": [first, last], "values"} oldest first, across every exploit before it (each exploit
    record carries its donor's lineage, so a donor's later history cannot rewrite it). `values` are the
    searched values the epochs trained with ({} where the history does not say)."""
    records = [r for r in history if isinstance(r.get("epoch"), int) and (upto is None or r["epoch"] <= upto)]
    start = max((i for i, r in enumerate(records) if r.get("exploited")), default=None)
    segments = [dict(s) for s in records[start]["exploited"].get("lineage", [])] if start is not None else []
    for record in records[start + 1 if start is not None else 0:]:
        values = record.get("values") or {}
        last = segments[-1] if segments else None
        if last and last["trial"] == trial_id and last["values"] == values and last["epochs"][1] == record["epoch"] - 1:
            last["epochs"] = [last["epochs"][0], record["epoch"]]
        else:
            segments.append({"trial": trial_id, "epochs": [record["epoch"], record["epoch"]], "values": values})
    return segments


def lineage_line(segments: list[dict]) -> str:
    """A lineage in one line: `epochs 1-4 trial a (lr 0.31), 5-8 trial b (lr 0.37)`."""
    def part(s):
        first, last = s["epochs"]
        values = ", ".join(f"{k} {short_value(v)}" for k, v in s["values"].items())
        epochs = f"{first}-{last}" if first != last else f"{first}"
        return f"{epochs} trial {s['trial']}" + (f" ({values})" if values else "")
    return "epochs " + ", ".join(part(s) for s in segments) if segments else ""


def short_value(value) -> str:
    """A searched value as the console writes it: a float to 4 significant digits, anything else as is."""
    return f"{value:.4g}" if isinstance(value, float) else f"{value}"
