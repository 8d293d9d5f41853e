"""A multi-objective study's trials weighed on every objective: each trial's value of each, and the Pareto
front (the trials no other trial beats on one objective without losing on another). No Ray here.

    values = objective_values(history, best_record, ["epoch_time_s", "trainable_params"])
    front = pareto_front(rows, [("val_acc", "max"), ("trainable_params", "min")])   # {trial ids}

A trial's value of the study's metric is its best (`best_{metric}`, as for every study); of the others:
the median epoch time and throughput over its epochs (the first epoch's start-up and compilation would
otherwise dominate a short trial), and the trainable parameters of its best epoch.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

MEDIAN_OVER_EPOCHS = ("epoch_time_s", "images_per_s")
NOT_A_MODEL = ("diverged", "error")  # raydist.output.report's DIVERGED and ERROR (that layer is above this one)


def objective_values(history: list[dict], best: Optional[dict], metrics: list[str]) -> dict[str, Optional[float]]:
    """Each of `metrics` for one trial (None when it reported none)."""
    out: dict[str, Optional[float]] = {}
    for metric in metrics:
        if metric in MEDIAN_OVER_EPOCHS:
            seen = [h[metric] for h in history if _finite(h.get(metric))]
            out[metric] = statistics.median(seen) if seen else None
        else:
            value = (best or {}).get(metric)
            out[metric] = value if _finite(value) else None
    return out


def column(metric: str, primary: str) -> str:
    """The results.csv column holding a trial's value of an objective."""
    return f"best_{metric}" if metric == primary else metric


def pareto_front(rows: list[dict], objectives: list[tuple[str, str]]) -> set[str]:
    """The trial ids on the front, among the rows with a finite value of every objective (the first objective's
    column is `best_{metric}`); a diverged or failed trial is never on it (its weights are not a model to
    use, as raydist.output.report.best_row says)."""
    primary = objectives[0][0]
    points = {}
    for row in rows:
        if row.get("status") in NOT_A_MODEL:
            continue
        values = [row.get(column(m, primary)) for m, _ in objectives]
        if all(_finite(v) for v in values):
            points[row["trial_id"]] = [v if mode == "max" else -v for v, (_, mode) in zip(values, objectives)]
    return {t for t, p in points.items()
            if not any(_dominates(q, p) for u, q in points.items() if u != t)}


def _dominates(a: list[float], b: list[float]) -> bool:
    """a is at least as good as b on every objective and better on one (all as "higher is better")."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
