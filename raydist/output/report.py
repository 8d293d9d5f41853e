"""A study's results as a table, `results.csv` and the pictures; no Ray here.

    rows = [trial_row(trial_id, sample, history, planned_epochs=8, metric="val_acc", mode="max")]
    write_csv(rows, "results.csv", searched=["lr", "batch_size"])
    write_curves_csv({trial_id: history}, "learning_curves.csv")
    plot_learning_curves({trial_id: history}, "learning_curves.png", metric="val_acc", best=trial_id)
    plot_run_curves(history, "curves.png")  # one run: loss, accuracy and lr per epoch
    print(format_table(rows, searched=["lr", "batch_size"], metric="val_acc"))

`history` is a trial's per-epoch metrics (the dicts raydist.loop reports), oldest first. The searched values'
picture is raydist.output.search_plot's.
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
    status = ended_status(last, epochs_run, planned_epochs, error=bool(error), interrupted=interrupted)
    return {
        "trial_id": trial_id, "status": status, **sample,
        "epochs_planned": planned_epochs, "epochs_run": epochs_run,
        f"final_{metric}": last.get(metric), f"best_{metric}": best[metric] if best else None,
        "best_epoch": best["epoch"] if best else None, "val_loss_at_best": best.get("val_loss") if best else None,
        "weights_epoch": weights_epoch,
        "final_val_acc": last.get("val_acc"), "final_val_loss": last.get("val_loss"),
        "final_train_loss": last.get("train_loss"), "images_per_s": last.get("images_per_s"),
        "seconds": seconds, "startup_s": startup_s, "checkpoint": checkpoint or "", "error": error or "",
    }


def ended_status(last: dict, epochs_run: int, planned_epochs: int, *, error: bool = False,
                 interrupted: bool = False) -> str:
    """How a trial ended, from its last reported metrics: one of the words above."""
    if error:
        return ERROR
    if last.get("stop_reason") in ("diverged", "non_finite_loss"):  # (the latter: histories before 2026-11-25)
        return DIVERGED
    if last.get("stop_reason") == "target_accuracy":
        return TARGET
    if epochs_run >= planned_epochs:
        return FINISHED
    return UNFINISHED if interrupted else STOPPED


def ranking(value: float, *, mode: str, val_loss: Optional[float] = None, epoch: Optional[int] = None,
            trial_id: str = "") -> tuple:
    """The one order of "better", for a trial's epochs and for a study's trials, that every place naming a
    best uses (results.csv, best_model.pt, the study's console, `raydist.cluster status`, the plots): the
    metric in the study's mode; on a tie (common on digits' 359 validation images) the lower validation
    loss, then the earlier epoch, then the lower trial id. A sort key: the smallest is the best."""
    return (-value if mode == "max" else value, val_loss if is_finite_number(val_loss) else math.inf,
            epoch if epoch is not None else math.inf, trial_id)


def best_record(history: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The epoch with the best finite `metric` (ties: `ranking`), or None."""
    scored = [h for h in history if is_finite_number(h.get(metric))]
    if not scored:
        return None
    return min(scored, key=lambda h: ranking(h[metric], mode=mode, val_loss=h.get("val_loss"), epoch=h.get("epoch")))


def best_row(rows: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The trial with the best metric (ties: `ranking`). A diverged or failed trial is never it: its weights
    are not a model to use, whatever an early epoch scored."""
    scored = [r for r in rows if is_finite_number(r[f"best_{metric}"]) and r["status"] not in (DIVERGED, ERROR)]
    if not scored:
        return None
    return min(scored, key=lambda r: ranking(r[f"best_{metric}"], mode=mode, val_loss=r.get("val_loss_at_best"),
                                             epoch=r.get("best_epoch"), trial_id=r["trial_id"]))


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
        points = [(int(h["epoch"]), float(h[metric])) for h in history if is_finite_number(h.get(metric))]
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


RUN_CURVES = ("train_loss", "val_loss", "train_acc", "val_acc", "lr")


def plot_run_curves(history: list[dict], path: str, *, title: str = "") -> dict[str, list[tuple[int, float]]]:
    """One run's `curves.png`, 1210 x 495 pixels: loss per epoch on the left, accuracy per epoch on the right
    (train and val each), and the learning rate dashed on a second y axis of the right panel only (on both
    it would add a line to read and nothing to learn). Returns the plotted points per curve:
    {"train_loss": [(epoch, value), ...], "val_loss", "train_acc", "val_acc", "lr", "world_size"}.

    An epoch recorded twice (a run restarted after a failure reports again the epoch it was in) is drawn
    once, from its last record; a non-finite value (a diverged epoch) is left out of its curve. Where
    `world_size` changes (a run that went on with fewer workers), a dotted line marks the first epoch at the
    new size; "world_size" lists those (epoch, workers).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    by_epoch: dict[int, dict] = {}
    for h in history:  # oldest first, so the last record of an epoch wins
        if is_finite_number(h.get("epoch")):
            by_epoch[int(h["epoch"])] = h
    epochs = sorted(by_epoch)
    plotted = {key: [(e, float(by_epoch[e][key])) for e in epochs if is_finite_number(by_epoch[e].get(key))]
               for key in RUN_CURVES}
    plotted["world_size"] = []
    size = None
    for e in epochs:
        if is_finite_number(by_epoch[e].get("world_size")):
            if size is not None and by_epoch[e]["world_size"] != size:
                plotted["world_size"].append((e, int(by_epoch[e]["world_size"])))
            size = by_epoch[e]["world_size"]

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    panels = ((loss_ax, "loss", ("train_loss", "val_loss")), (acc_ax, "accuracy", ("train_acc", "val_acc")))
    for ax, name, keys in panels:
        for key, color in zip(keys, ("tab:blue", "tab:orange")):
            if plotted[key]:
                xs, ys = zip(*plotted[key])
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=key.split("_")[0])
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for e, workers in plotted["world_size"]:
            ax.axvline(e, color="gray", linestyle=":", linewidth=1)
            ax.annotate(f"{workers} workers", xy=(e, 1), xycoords=("data", "axes fraction"), xytext=(-2, -4),
                        textcoords="offset points", rotation=90, ha="right", va="top", fontsize=7, color="gray")
        if not epochs:
            say(ax, "no epoch recorded yet")
        elif not any(plotted[key] for key in keys):
            say(ax, f"no finite {name}")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # accuracies are fractions
    handles = acc_ax.get_legend_handles_labels()[0]
    if plotted["lr"]:
        lr_ax = acc_ax.twinx()
        xs, ys = zip(*plotted["lr"])
        handles += lr_ax.plot(xs, ys, linestyle="--", linewidth=1, color="tab:gray", label="lr")
        lr_ax.set_ylabel("lr")
        lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 0.05, 3e-05: no offset
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=8, loc="best")
    if handles:
        acc_ax.legend(handles=handles, fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return plotted


# One colour per way a trial ended, the same in every picture.
STATUS_COLOURS = {FINISHED: "tab:green", TARGET: "tab:blue", STOPPED: "tab:orange", DIVERGED: "tab:purple",
                  ERROR: "tab:red", UNFINISHED: "tab:gray"}


def say(ax, text: str) -> None:
    """`text` in the middle of an empty panel, so that an empty picture says why it is empty."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="gray")


def format_table(rows: list[dict], *, searched: list[str], metric: str, mode: str, others: tuple = ()) -> str:
    """A plain-text table, best first; `others`: a multi-objective study's other objectives, whose values and
    the Pareto mark (`pareto`) follow the metric's."""
    front = [*others, "pareto"] if others else []
    columns = ["trial_id", "status", *searched, "epochs_run", f"best_{metric}", f"final_{metric}", *front, "seconds"]
    sign = -1 if mode == "max" else 1
    ordered = sorted(rows, key=lambda r: (not is_finite_number(r[f"best_{metric}"]), sign * (r[f"best_{metric}"] or 0)))
    cells = [[cell(c, r.get(c)) for c in columns] for r in ordered]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cell(column: str, value) -> str:
    """A value as the table prints it: accuracies as percentages, seconds whole, other floats to 4 digits."""
    if isinstance(value, bool):
        return "*" if column == "pareto" and value else "" if column == "pareto" else str(value)
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if "acc" in column:
            return f"{value:.2%}"
        if column == "seconds":
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_number(value) -> bool:
    """A number, finite or not (a bool is a category, not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
