"""The scaling study's outputs: the markdown table, results.csv and the plots (images/s and efficiency
against workers, epochs and seconds to the target accuracy).
"""

from __future__ import annotations

import csv
import os
from typing import Optional

from raydist.study.scaling_grid import COLUMNS, Point, row, summarize

TABLE_COLUMNS = tuple(c for c in COLUMNS if c != "seed") + ("reached",)


def _number(key: str, value) -> str:
    if key in ("efficiency", "best_val_acc"):
        return f"{value:.1%}" if key == "best_val_acc" else f"{value:.2f}"
    if key in ("images_per_s", "epoch_seconds_to_target"):
        return f"{value:,.1f}"
    if key == "lr_peak":
        return f"{value:.4g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(key: str, r: dict) -> str:
    value = r.get(key)
    if key == "reached":
        return f"{value}/{r['repeats']}"
    if value is None:
        return "not reached" if key.endswith("to_target") else "—"
    text = _number(key, value)
    spread = r.get(f"{key}_range")
    return f"{text} ({_number(key, spread[0])}-{_number(key, spread[1])})" if spread else text


def markdown(points: list[Point], *, target: float, header: str) -> str:
    rows = summarize(points)
    repeats = max(r["repeats"] for r in rows)
    spread = (f" Each point ran {repeats} times (seeds {points[0].cfg.seed}-{points[0].cfg.seed + repeats - 1}): "
              f"the median, with the range in brackets; `reached`: in how many runs." if repeats > 1 else "")
    lines = [header, "", f"Target validation accuracy {target:.1%}. epoch_seconds_to_target: the epochs' own times "
             f"(training and validation) up to the epoch that reached it, without the run's start-up.{spread}", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(k, r) for k in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(points: list[Point], path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for p in points:
            writer.writerow(row(p))


def plot(points: list[Point], folder: str, *, target: float) -> list[str]:
    """throughput.png and accuracy.png: each point's median over its repeats, the range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(points)

    def bars(line: list[dict], key: str) -> Optional[list]:
        if not any(r.get(f"{key}_range") for r in line):
            return None
        spans = [r.get(f"{key}_range") or (r[key], r[key]) for r in line]
        return [[r[key] - low for r, (low, _) in zip(line, spans)], [high - r[key] for r, (_, high) in zip(line, spans)]]

    paths = [os.path.join(folder, "throughput.png"), os.path.join(folder, "accuracy.png")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for rule in sorted({r["rule"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            line = sorted((r for r in rows if r["batch"] == batch and r["rule"] == rule and r["images_per_s"]),
                          key=lambda r: r["workers"])
            if not line:
                continue
            drawn = ax.errorbar([r["workers"] for r in line], [r["images_per_s"] for r in line],
                                yerr=bars(line, "images_per_s"), marker="o", capsize=3,
                                label=f"batch {batch}/worker ({rule})")
            first = line[0]
            ax.plot([r["workers"] for r in line], [first["images_per_s"] * r["workers"] / first["workers"] for r in line],
                    linestyle="--", color=drawn.lines[0].get_color(), alpha=0.5)
    ax.set_xlabel("workers")
    workers = sorted({r["workers"] for r in rows})
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_ylabel("training images/s")
    ax.set_title("throughput against workers (dashed: linear scaling)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0])
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=110)
    batches = sorted({r["global_batch"] for r in rows})
    for rule, style in zip(sorted({r["rule"] for r in rows}), ("-", "--")):
        for workers in sorted({r["workers"] for r in rows}):
            line = sorted((r for r in rows if r["rule"] == rule and r["workers"] == workers),
                          key=lambda r: r["global_batch"])
            xs, label = [r["global_batch"] for r in line], f"{rule}, {workers} worker(s)"
            reached = [r for r in line if r["epochs_to_target"] is not None]
            left.errorbar([r["global_batch"] for r in reached], [r["epochs_to_target"] for r in reached],
                          yerr=bars(reached, "epochs_to_target"), marker="o", linestyle=style, capsize=3, label=label)
            right.errorbar(xs, [r["best_val_acc"] for r in line], yerr=bars(line, "best_val_acc"), marker="o",
                           linestyle=style, capsize=3, label=label)
    left.set(xscale="log", xlabel="global batch", ylabel=f"epochs to {target:.1%}",
             title="epochs to the target (missing: not reached)")
    right.set(xscale="log", xlabel="global batch", ylabel="best validation accuracy", title="best validation accuracy")
    right.axhline(target, color="grey", linestyle=":")
    for ax in (left, right):
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(title="LR rule", fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
