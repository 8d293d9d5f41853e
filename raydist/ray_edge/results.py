"""After a study: every trial's row and history, results.csv, the curves, and the best weights exported.

    result = summarize(study, grid, experiment_path, seconds=...)   # grid: Tune's ResultGrid
    result.rows, result.best, result.best_model                     # report.trial_row dicts; best_model.pt

A trial's history is raydist's own record of every epoch it reported (raydist.ray_edge.history), which
survives a resume; Tune's is used only for a trial without one. The best trial is the best row that did
not diverge or fail (report.best_row); its weights are the kept checkpoint of its best epoch, or of an
equally good one, else of the nearest kept epoch, and the row says which (`weights_epoch`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from typing import Optional

import yaml

from raydist.output import pareto_plot, report, search_plot
from raydist.runs.lineage import lineage, lineage_line
from raydist.storage import filesystem, is_uri
from raydist.study.importance import Importance, field_importance
from raydist.study.pareto import objective_values, pareto_front
from raydist.study.study import PER_TRIAL_FIELDS, Study

LOG_KINDS = ("loguniform", "qloguniform")  # the search_space.DISTRIBUTIONS sampled on a log scale


@dataclasses.dataclass
class StudyResult:
    experiment_path: str
    rows: list[dict]  # report.trial_row per trial
    histories: dict[str, list[dict]]
    best: Optional[dict]  # the best row
    best_checkpoint: Optional[str]
    best_model: Optional[str]  # <experiment>/best_model.pt
    interrupted: bool
    seconds: float
    importance: Optional[Importance] = None  # what mattered: each searched field's share (None: too few trials)


def summarize(study: Study, grid, experiment_path: str, *, seconds: float) -> StudyResult:
    """Rows, histories and the best trial; writes results.csv, the curves, search_values.png and best_model.pt."""
    saved = _saved_trials(experiment_path)
    statuses = {trial_id: status for trial_id, (status, _) in saved.items()}
    unfinished = {t for t, status in statuses.items() if status not in ("TERMINATED", "ERROR")}
    interrupted = bool(unfinished) or len(statuses) < study.num_samples
    rows, histories = [], {}
    for i in range(len(grid)):
        result = grid[i]
        trial_id = os.path.basename(result.path).removeprefix("trial_")
        history = trial_history(experiment_path, trial_id, result, ended=statuses.get(trial_id) == "TERMINATED")
        # A trial that has reported nothing yet (pending when the study was interrupted) has no config in
        # Tune's result: it is in the saved experiment state.
        config = result.config or saved.get(trial_id, (None, {}))[1] or {}
        # The fields that applied to the trial; a conditional one is blank where its condition failed.
        applied = study.applying({k: _plain(config[k]) for k in study.searched if k in config})
        sample = {k: applied.get(k) for k in study.searched}
        planned = study.planned_config(applied).epochs if applied else 0
        best_epoch = report.best_record(history, study.metric, study.mode)
        checkpoint, weights_epoch = checkpoint_of_best_epoch(history, best_epoch, study, experiment_path)
        first = history[0] if history else {}
        startup = first.get("time_this_iter_s", math.nan) - first.get("epoch_time_s", math.nan) if first else None
        rows.append(report.trial_row(
            trial_id, sample, history, planned_epochs=planned, metric=study.metric, mode=study.mode,
            error=_one_line(result.error) if result.error else None, checkpoint=checkpoint,
            weights_epoch=weights_epoch, interrupted=trial_id in unfinished,
            seconds=history[-1].get("time_total_s") if history else None, startup_s=startup))
        if study.objectives:  # a multi-objective study: each trial's value of the other objectives
            rows[-1].update(objective_values(history, best_epoch, [m for m, _ in study.objectives]))
        if study.population:  # PBT: how often the trial took another's weights, and where its last ones came from
            rows[-1]["exploits"] = sum(1 for h in history if h.get("exploited"))
            rows[-1]["lineage"] = lineage_line(lineage(history, trial_id, upto=rows[-1]["best_epoch"]))
        histories[trial_id] = history
    rows.sort(key=lambda r: r["trial_id"])
    if study.objectives:
        front = pareto_front(rows, study.all_objectives())
        for row in rows:
            row["pareto"] = row["trial_id"] in front
    best = report.best_row(rows, study.metric, study.mode)
    # Written locally, then copied when the experiment lives in remote storage (S3, GCS).
    remote = is_uri(experiment_path)
    out_dir = tempfile.mkdtemp(prefix="raydist-study-") if remote else experiment_path
    report.write_csv(rows, os.path.join(out_dir, "results.csv"), searched=list(study.searched))
    report.write_curves_csv(histories, os.path.join(out_dir, "learning_curves.csv"))
    report.plot_learning_curves(histories, os.path.join(out_dir, "learning_curves.png"),
                                metric=study.metric, best=best["trial_id"] if best else None,
                                title=f"{study.name}: {study.metric} per epoch (x: last epoch run)")
    best_model = export_best(best, out_dir) if best and best["checkpoint"] else None
    # Under PBT a row's values are the trial's last ones, not what trained it: no importance to read off them.
    importance = None if study.population else _importance(rows, study)
    if study.objectives:
        _draw(lambda: pareto_plot.plot_pareto(rows, os.path.join(out_dir, PARETO_PICTURE), study.all_objectives(),
                                              title=f"{study.name}: the trials on every objective"), PARETO_PICTURE)
    try:  # a picture that cannot be drawn must not cost the study its results
        # Log x axes for the fields sampled on a log scale, where their good region would otherwise be squashed.
        search_plot.plot_search_values(rows, os.path.join(out_dir, "search_values.png"), searched=list(study.searched),
                                  metric=study.metric, mode=study.mode,
                                  log_scale={k for k, d in study.searched.items() if d.kind in LOG_KINDS},
                                  title=f"{study.name}: searched values against best {study.metric}",
                                  importance=importance.shares if importance else None)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not draw search_values.png: {type(exc).__name__}: {exc}", flush=True)
    if remote:
        import pyarrow.fs

        pyarrow.fs.copy_files(out_dir, experiment_path)
        shutil.rmtree(out_dir, ignore_errors=True)
        best_model = f"{experiment_path}/{os.path.basename(best_model)}" if best_model else None
    return StudyResult(experiment_path=experiment_path, rows=rows, histories=histories, best=best,
                       best_checkpoint=best["checkpoint"] if best else None, best_model=best_model,
                       interrupted=interrupted, seconds=seconds, importance=importance)


PARETO_PICTURE = "pareto.png"


def _draw(draw, name: str) -> None:
    """A picture that cannot be drawn must not cost the study its results."""
    try:
        draw()
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not draw {name}: {type(exc).__name__}: {exc}", flush=True)


def _importance(rows: list[dict], study: Study) -> Optional[Importance]:
    """field_importance, which must not cost the study its results either."""
    try:
        return field_importance(rows, study)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not compute what mattered: {type(exc).__name__}: {exc}", flush=True)
        return None


def _saved_trials(experiment_path: str) -> dict[str, tuple[str, dict]]:
    """Trial id -> (status, config) in Tune's last saved experiment state (an interrupted study saves its
    running trials as RUNNING/PENDING; the in-memory ResultGrid no longer tells them apart)."""
    import json

    import pyarrow.fs

    fs, root = filesystem(experiment_path)
    states = sorted(info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(root))
                    if os.path.basename(info.path).startswith("experiment_state") and info.path.endswith(".json"))
    if not states:
        return {}
    with fs.open_input_stream(states[-1]) as fh:
        saved = json.loads(fh.read())
    trials = {}
    for trial_json, _ in saved.get("trial_data", []):
        trial = json.loads(trial_json)
        config = trial.get("config")
        trials[trial["trial_id"]] = (trial["status"], config if isinstance(config, dict) else {})
    return trials


def trial_history(experiment_path: str, trial_id: str, result, *, ended: bool = False) -> list[dict]:
    """Every epoch the trial reported: raydist's own record (study_history), which survives a resume in a
    new Ray session; Tune's record only for a trial that has none (a study from before it was kept).

    A trial Tune `ended` (it finished, or the scheduler stopped it) keeps only the epochs up to the last one
    Tune received. A scheduler's stop reaches a TorchTrainer trial while it trains on, and the epoch its run
    reports meanwhile is in the run's own record, but neither the scheduler nor the searcher ever saw it
    (seen on a loaded machine: ASHA stopped a trial at its epoch-4 rung, and results.csv said it ran 5
    epochs, with epoch 5's accuracy as its final one)."""
    from raydist.runs.history import read_history

    history = read_history(f"{experiment_path}/trial_{trial_id}")
    if not history:
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None and "epoch" in frame else []
    history = _dedupe_epochs(history)
    last_seen = (result.metrics or {}).get("epoch") if ended else None
    if isinstance(last_seen, (int, float)):
        history = [row for row in history if row["epoch"] <= last_seen]
    return history


def _dedupe_epochs(history: list[dict]) -> list[dict]:
    """A resumed trial can report an epoch twice (once before the interruption): keep the last report."""
    by_epoch: dict[int, dict] = {}
    for row in history:
        if isinstance(row.get("epoch"), (int, float)) and math.isfinite(row["epoch"]):
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def checkpoint_of_best_epoch(history: list[dict], best: Optional[dict], study: Study,
                     experiment_path: str) -> tuple[Optional[str], Optional[int]]:
    """(path, epoch) of the kept checkpoint that stands for the best epoch `best`: one of an epoch that
    scored as well when there is one, else the nearest kept one (the better of two as near). Train keeps
    the best few by the study's metric and the latest, so a best epoch has none only when it was not a
    checkpoint epoch (checkpoint_every > 1) or more epochs tied than were kept."""
    import pyarrow.fs

    from raydist.runs.checkpoints import merit

    if best is None:
        return None, None
    remote = is_uri(experiment_path)
    kept = []
    for h in history:
        path = h.get("checkpoint_path")
        if not isinstance(path, str) or not path:
            continue
        if remote:  # Ray reports the path inside the bucket; give it its scheme back
            path = path if is_uri(path) else f"{experiment_path.split('://')[0]}://{path}"
            fs, inner = filesystem(path)
            if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
                continue
        elif not os.path.isdir(path):  # deleted beyond keep_checkpoints
            continue
        kept.append((h, path))
    if not kept:
        return None, None
    def score(h: dict) -> float:
        return merit(h, study.metric, study.mode)

    def distance(h: dict) -> int:
        return 0 if score(h) == score(best) else abs(int(h["epoch"]) - int(best["epoch"]))

    h, path = min(kept, key=lambda c: (distance(c[0]), -score(c[0]), c[0]["epoch"]))
    return path, int(h["epoch"])


def export_best(best: dict, out_dir: str) -> str:
    """best_model.pt (same format as a run's model_final.pt) and best_config.yaml for `raydist.train --config`."""
    import ray.train

    from raydist.runs.checkpoints import CHECKPOINT_FILE, final_model_bytes, load_checkpoint_file

    with ray.train.Checkpoint(best["checkpoint"]).as_directory() as folder:  # downloads a remote one
        state = load_checkpoint_file(os.path.join(folder, CHECKPOINT_FILE))
    path = os.path.join(out_dir, "best_model.pt")
    with open(path, "wb") as fh:
        fh.write(final_model_bytes(state["model"], state["config"], state["metrics"], trial_id=best["trial_id"],
                                   checkpoint=best["checkpoint"], epoch=state["epoch"],
                                   best_epoch=best["best_epoch"]))
    with open(os.path.join(out_dir, "best_config.yaml"), "w") as fh:
        yaml.safe_dump({k: v for k, v in state["config"].items() if k not in PER_TRIAL_FIELDS}, fh, sort_keys=False)
    try:  # what the best epoch got wrong (checkpoints since issue 33 keep it); an earlier summary's files go
        _write_mistakes(state, out_dir, title=f"best trial {best['trial_id']}, epoch {state['epoch']}: "
                                              f"the validation images")
    except Exception as exc:  # noqa: BLE001 - the study's outcome matters more than its picture
        print(f"warning: could not write {out_dir}/per_class.csv and confusion.png: {type(exc).__name__}: "
              f"{exc}", flush=True)
    return path


def _write_mistakes(state: dict, out_dir: str, *, title: str) -> None:
    """per_class.csv and confusion.png beside best_model.pt, from the checkpoint's confusion matrix (none
    for a checkpoint without one)."""
    from raydist.config.fields import TrainConfig
    from raydist.data.sizes import predicted_class_names
    from raydist.output.mistakes import write_mistake_files

    confusion = state.get("confusion")
    names = state.get("class_names") or (predicted_class_names(TrainConfig.from_saved(state["config"]))
                                         if confusion is not None else [])
    write_mistake_files(out_dir, confusion.tolist() if confusion is not None else None, names, title=title)


def _plain(value):
    """numpy scalars (HyperOpt's samples) -> Python numbers, for CSV and YAML."""
    return value.item() if hasattr(value, "item") else value


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return next((line.strip() for line in reversed(text.splitlines()) if "Error" in line), text.splitlines()[0])[:300]
