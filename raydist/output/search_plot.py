"""A study's searched values against its metric: where the good region of a search is; no Ray here.

    plot_search_values(rows, "search_values.png", searched=["lr", "batch_size"], metric="val_acc", mode="max",
                       log_scale={"lr"}, importance={"lr": 0.8, "batch_size": 0.2})

`rows` are raydist.output.report.trial_row's, one per trial.
"""

from __future__ import annotations

import math
from typing import Optional

from raydist.output.report import STATUS_COLOURS, best_row, is_finite_number, is_number, say


def plot_search_values(rows: list[dict], path: str, *, searched: list[str], metric: str, mode: str,
                       log_scale: frozenset | set = frozenset(), title: str = "",
                       importance: Optional[dict[str, float]] = None) -> dict[str, list[tuple]]:
    """Where the good region of a search is: one panel per searched field (3 to a row), x the trial's sampled
    value, y its `best_{metric}`, coloured by how the trial ended; the best trial (best_row) is ringed.

    A trial with no finite best metric (it failed, or diverged before a finite epoch) is drawn as an x of its
    status colour in a strip past the worst finite score, at the bottom of the panels when `mode` is "max"
    and at the top when it is "min", so that it reads as worst either way and every trial is in every panel.
    `importance` (field -> share, raydist.study.importance) titles each panel with its field's share. Fields
    in `log_scale` get a log x axis. A field with any non-numeric value (a string, a bool, a model
    name) is categorical: its values, sorted by str, evenly spaced. In a numeric field a trial with no value
    (one that never started) cannot be placed and is left out.

    Size: 4 x 3.5 inches a panel, 8 inches wide at least, plus 1 inch for the title and legend, at 110 dpi
    (3 fields: 1320 x 495 pixels). Returns {field: [(trial_id, x value, y value or None, status), ...]}, the
    points of each panel left to right; {} (and a picture saying so) when nothing was searched.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    columns, lines = min(3, len(searched)) or 1, math.ceil(len(searched) / 3) or 1
    fig = plt.figure(figsize=(max(8.0, 4.0 * columns), 3.5 * lines + 1.0), dpi=110, layout="constrained")
    fig.suptitle(title or f"searched values against best {metric}, one point per trial")
    if not searched:
        say(fig.subplots(), "nothing was searched")
        fig.savefig(path)
        plt.close(fig)
        return {}
    axes = fig.subplots(lines, columns, sharey=True, squeeze=False).flatten()
    for ax in axes[len(searched):]:
        ax.set_visible(False)  # the empty places of the last row

    key = f"best_{metric}"
    scores = [r[key] for r in rows if is_finite_number(r.get(key))]
    unscored = len(scores) < len(rows)
    if scores:
        low, high = min(scores), max(scores)
        margin = 0.12 * ((high - low) or abs(high) or 1.0)
        unscored_y = low - margin if mode == "max" else high + margin
    else:
        unscored_y, margin = 0.0, 1.0
    best = best_row(rows, metric, mode)
    plotted: dict[str, list[tuple]] = {}
    for ax, field in zip(axes, searched):
        plotted[field] = _search_panel(ax, field, rows, key=key, best=best, log_scale=log_scale, unscored=unscored,
                                       unscored_y=unscored_y, margin=margin, scored_any=bool(scores))
        if importance and field in importance:
            ax.set_title(f"importance {importance[field]:.0%}", fontsize=9)
    for ax in axes[::columns]:
        ax.set_ylabel(f"best {metric}")
    if "acc" in metric:
        axes[0].yaxis.set_major_formatter(PercentFormatter(xmax=1.0))  # shared by every panel
    if not scores:
        axes[0].set_yticks([])  # only the strip of unscored trials: a y scale would mean nothing

    _search_legend(fig, rows, best=best, unscored=unscored, metric=metric, columns=columns)
    fig.savefig(path)
    plt.close(fig)
    return plotted


def _search_panel(ax, field: str, rows: list[dict], *, key: str, best: Optional[dict], log_scale,
                  unscored: bool, unscored_y: float, margin: float, scored_any: bool) -> list[tuple]:
    """One searched field's panel of plot_search_values; its points left to right."""
    from matplotlib.ticker import MaxNLocator

    numeric = all(is_number(r.get(field)) or r.get(field) is None for r in rows)
    if numeric:
        placed = [(float(r[field]), r) for r in rows if is_finite_number(r.get(field))]
        if field in log_scale:
            ax.set_xscale("log")
        elif placed and all(isinstance(r[field], int) for _, r in placed):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # batch sizes, epochs: no 12.5
    else:
        categories = sorted({str(r.get(field)) for r in rows})
        position = {c: i for i, c in enumerate(categories)}
        placed = [(position[str(r.get(field))], r) for r in rows]
        ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    placed.sort(key=lambda p: (p[0], p[1]["trial_id"]))
    panel_points = [(r["trial_id"], r.get(field), float(r[key]) if is_finite_number(r.get(key)) else None, r["status"])
                    for _, r in placed]
    # One scatter per (status, scored or not): a legend-sized number of artists, whatever the trial count.
    groups: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for x, r in placed:
        scored = is_finite_number(r.get(key))
        groups.setdefault((r["status"], scored), []).append((x, r[key] if scored else unscored_y))
    for (status, scored), points in groups.items():
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=30 if scored else 40, marker="o" if scored else "x", alpha=0.85,
                   color=STATUS_COLOURS.get(status, "black"), zorder=3)
    if best is not None and any(r is best for _, r in placed):
        x = next(x for x, r in placed if r is best)
        ax.scatter([x], [best[key]], s=200, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)
    ax.set_xlabel(f"{field} (log scale)" if numeric and field in log_scale else field)
    ax.grid(alpha=0.3)
    if unscored and scored_any:  # a grey band, so that the strip's height does not read as a score
        ax.axhspan(unscored_y - margin / 2, unscored_y + margin / 2, color="0.92", zorder=0)
        ax.text(0.01, unscored_y - margin / 2, "no finite value", transform=ax.get_yaxis_transform(),
                ha="left", va="bottom", fontsize=7, color="gray")  # under the x marks, not on them
    if not placed:
        say(ax, "no trial yet")
    return panel_points


def _search_legend(fig, rows: list[dict], *, best: Optional[dict], unscored: bool, metric: str,
                   columns: int) -> None:
    """plot_search_values' legend: a marker per status, the best trial's ring, the unscored x."""
    from matplotlib.lines import Line2D

    present = {r["status"] for r in rows}
    statuses = [s for s in STATUS_COLOURS if s in present] + sorted(present - set(STATUS_COLOURS))
    handles = [Line2D([], [], linestyle="", marker="o", color=STATUS_COLOURS.get(s, "black"), label=s)
               for s in statuses]
    if best is not None:
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="black", label=f"best: {best['trial_id']}"))
    if unscored:
        handles.append(Line2D([], [], linestyle="", marker="x", color="black", label=f"x: no finite best {metric}"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4 if columns < 3 else 8),
                   fontsize=8, frameon=False)
