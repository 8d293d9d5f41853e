"""A multi-objective study's trials on its objectives: the study's metric against each other objective, one
panel each, the Pareto front ringed and joined; no Ray here.

    plot_pareto(rows, "pareto.png", [("val_acc", "max"), ("trainable_params", "min")])

`rows` are raydist.output.report.trial_row's with the other objectives' values and `pareto` (raydist.study.pareto).
"""

from __future__ import annotations

from raydist.output.report import is_finite_number, say
from raydist.study.pareto import column


def plot_pareto(rows: list[dict], path: str, objectives: list[tuple[str, str]], *, title: str = "") -> dict:
    """Panels of (other objective, best metric); returns {objective: [(trial_id, x, y, on the front)]}."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    (metric, _), others = objectives[0], objectives[1:]
    fig = plt.figure(figsize=(max(6.0, 4.5 * len(others)), 4.5), dpi=110, layout="constrained")
    fig.suptitle(title or "the trials on every objective")
    axes = fig.subplots(1, len(others), sharey=True, squeeze=False)[0]
    y_key, plotted = column(metric, metric), {}
    for ax, (other, mode) in zip(axes, others):
        points = sorted((r[other], r[y_key], r["trial_id"], bool(r.get("pareto"))) for r in rows
                        if is_finite_number(r.get(other)) and is_finite_number(r.get(y_key)))
        plotted[other] = [(t, x, y, front) for x, y, t, front in points]
        if not points:
            say(ax, "no trial scored on both")
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=30, color="0.6", zorder=2, label="trial")
        front = [p for p in points if p[3]]
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=90, facecolors="none", edgecolors="tab:red",
                   linewidths=1.5, zorder=3, label="Pareto front")
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", alpha=0.5, zorder=1)
        for x, y, trial_id, _ in front:
            ax.annotate(trial_id, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{other} ({'lower' if mode == 'min' else 'higher'} is better)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"best {metric}")
    if "acc" in metric:
        axes[0].yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes[0].legend(loc="best", fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return plotted
