"""A study's results as a table, `results.csv` and `learning_curves.png`; no Ray here.

    rows = [trial_row(trial_id, sample, history, planned_epochs=8, metric="val_acc", mode="max")]
    write_csv(rows, "results.csv", searched=["lr", "batch_size"])
    write_curves_csv({trial_id: history}, "learning_curves.csv")
    plot_learning_curves({trial_id: history}, "learning_curves.png", metric="val_acc", best=trial_id)
    print(format_table(rows, searched=["lr", "batch_size"], metric="val_acc"))

`history` is a trial's per-epoch metrics (the dicts raydist.engine reports), oldest first.
"""

from __future__ import annotations

import csv
import math
from typing import Optional

# Why a trial ended, in the words the table and results.csv use.
FINISHED = "finished"            # ran all its epochs
TARGET = "target reached"        # early stop at --target-accuracy
STOPPED = "stopped early"         # the scheduler (ASHA) cut it short
DIVERGED = "diverged"            # a loss went non-finite or exploded (engine.divergence)
ERROR = "error"                  # raised (e.g. out of memory); see the error column
UNFINISHED = "unfinished"        # interrupted; `--resume` continues it


def trial_row(trial_id: str, sample: dict, history: list[dict], *, planned_epochs: int, metric: str, mode: str,
              error: Optional[str] = None, checkpoint: Optional[str] = None, weights_epoch: Optional[int] = None,
              interrupted: bool = False, seconds: Optional[float] = None, startup_s: Optional[float] = None) -> dict:
    """One trial's summary: its sampled values, how it ended, its final and best metric.

    `checkpoint` is the kept checkpoint that stands for the best epoch, from epoch `weights_epoch` (the best
    epoch itself, or an equally good one, when kept; else the nearest kept one).
    """
    last = history[-1] if history else {}
    epochs_run = int(last.get("epoch", 0))
    best = best_record(history, metric, mode)
    exported = next((h for h in history if h.get("epoch") == weights_epoch), None)
    if best and exported and exported[metric] == best[metric]:
        best = exported  # of equally good epochs, the one whose weights are exported
    if error:
        status = ERROR
    elif last.get("stop_reason") in ("diverged", "non_finite_loss"):  # (the latter: histories before 2026-11-25)
        status = DIVERGED
    elif last.get("stop_reason") == "target_accuracy":
        status = TARGET
    elif epochs_run >= planned_epochs:
        status = FINISHED
    else:
        status = UNFINISHED if interrupted else STOPPED
    return {
        "trial_id": trial_id, "status": status, **sample,
        "epochs_planned": planned_epochs, "epochs_run": epochs_run,
        f"final_{metric}": last.get(metric), f"best_{metric}": best[metric] if best else None,
        "best_epoch": best["epoch"] if best else None, "weights_epoch": weights_epoch,
        "final_val_acc": last.get("val_acc"), "final_val_loss": last.get("val_loss"),
        "final_train_loss": last.get("train_loss"), "images_per_s": last.get("images_per_s"),
        "seconds": seconds, "startup_s": startup_s, "checkpoint": checkpoint or "", "error": error or "",
    }


def best_record(history: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The epoch with the best finite `metric` (the earliest of equals), or None."""
    scored = [h for h in history if _finite(h.get(metric))]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda h: sign * h[metric])  # max() keeps the first of equal keys


def best_row(rows: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The trial with the best metric. A diverged or failed trial is never it: its weights are not a model
    to use, whatever an early epoch scored."""
    scored = [r for r in rows if _finite(r[f"best_{metric}"]) and r["status"] not in (DIVERGED, ERROR)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[f"best_{metric}"])


def write_csv(rows: list[dict], path: str, *, searched: list[str]) -> None:
    """One row per trial; columns: id, status, the searched values, then the outcome."""
    if not rows:
        columns = ["trial_id", "status", *searched]
    else:
        columns = list(rows[0])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


CURVE_COLUMNS = ("trial_id", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s",
                 "images_per_s", "trainable_params")


def write_curves_csv(histories: dict[str, list[dict]], path: str) -> None:
    """Every trial's per-epoch metrics in long form: the data behind learning_curves.png."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CURVE_COLUMNS)
        for trial_id, history in histories.items():
            for h in history:
                writer.writerow([trial_id, *(h.get(c, "") for c in CURVE_COLUMNS[1:])])


def plot_learning_curves(histories: dict[str, list[dict]], path: str, *, metric: str,
                         best: Optional[str] = None, title: str = "") -> dict[str, list[tuple[int, float]]]:
    """`metric` per epoch for every trial (stopped ones end early, marked x); returns the plotted points."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plotted: dict[str, list[tuple[int, float]]] = {}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for trial_id, history in histories.items():
        points = [(int(h["epoch"]), float(h[metric])) for h in history if _finite(h.get(metric))]
        if not points:
            continue
        plotted[trial_id] = points
        xs, ys = zip(*points)
        is_best = trial_id == best
        line, = ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.5 if is_best else 1.0,
                        alpha=1.0 if is_best else 0.6, label=f"{trial_id} (best)" if is_best else trial_id,
                        zorder=3 if is_best else 2)
        ax.plot(xs[-1:], ys[-1:], marker="x", markersize=8, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per epoch, every trial (x: last epoch run)")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=7, ncol=2 if len(plotted) > 8 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return plotted


def format_table(rows: list[dict], *, searched: list[str], metric: str, mode: str) -> str:
    """A plain-text table, best first."""
    columns = ["trial_id", "status", *searched, "epochs_run", f"best_{metric}", f"final_{metric}", "seconds"]
    sign = -1 if mode == "max" else 1
    ordered = sorted(rows, key=lambda r: (not _finite(r[f"best_{metric}"]), sign * (r[f"best_{metric}"] or 0)))
    cells = [[cell(c, r.get(c)) for c in columns] for r in ordered]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cell(column: str, value) -> str:
    """A value as the table prints it: accuracies as percentages, seconds whole, other floats to 4 digits."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if "acc" in column:
            return f"{value:.2%}"
        if column == "seconds":
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
