"""The scaling study's grid: worker counts x batch sizes x LR rules (x repeats), each point a run to a
target accuracy, and the summary of their measures (median, min and max over repeats; efficiency).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Optional

from raydist.config.fields import TrainConfig
from raydist.config.rates import lr_scale
from raydist.errors import ConfigError
from raydist.preflight import validate

RULES = ("linear", "none")


@dataclasses.dataclass
class Point:
    """One run of the grid and what it measured."""
    workers: int
    batch: int  # per worker
    rule: str
    cfg: TrainConfig
    images_per_s: Optional[float] = None
    epochs_to_target: Optional[int] = None
    epoch_seconds_to_target: Optional[float] = None  # the epochs' own times up to the target: no start-up
    best_val_acc: Optional[float] = None
    epochs_run: int = 0
    efficiency: Optional[float] = None

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch * self.cfg.grad_accum

    @property
    def key(self) -> tuple:
        """The grid point a run belongs to (its repeats share it)."""
        return self.workers, self.batch, self.rule


def build_grid(base: TrainConfig, *, workers: list[int], batches: list[int], rules: list[str], target: float,
               out: str, repeats: int = 1) -> list[Point]:
    """Every run's validated config. The peak LR of the grid's smallest run is what raydist.train gives
    that run (--lr under --lr-scaling, the loop's own lr_scale); `linear` grows it in proportion to the
    global batch from there, `none` keeps it at every batch. Each run's --lr is set so that the loop, with
    the run's own --lr-scaling, trains at exactly that peak (per_256, per_worker and none alike)."""
    for name, values in (("--workers", workers), ("--batch-sizes", batches)):
        bad = [v for v in values if v < 1]
        if bad:
            raise ConfigError(f"{name} must be positive integers, got {bad[0]}")
    if not 0 < target <= 1:
        raise ConfigError(f"--target must be a validation accuracy in (0, 1], got {target}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be a positive integer, got {repeats}")
    reference = min(workers) * min(batches) * base.grad_accum
    reference_peak = base.lr * lr_scale(dataclasses.replace(base, batch_size=min(batches)), reference)
    points = []
    for rule in dict.fromkeys(rules):  # each once: a repeated rule would name two runs alike
        for w in sorted(set(workers)):
            for b in sorted(set(batches)):
                global_batch = w * b * base.grad_accum
                peak = reference_peak * global_batch / reference if rule == "linear" else reference_peak
                lr = peak / lr_scale(dataclasses.replace(base, batch_size=b), global_batch)
                cfg = dataclasses.replace(base, num_workers=w, batch_size=b, lr=lr,
                                          warmup_epochs=base.warmup_epochs if rule == "linear" else 0.0,
                                          target_accuracy=target, patience=1, storage_path=out,
                                          name=f"w{w}-b{b}-{rule}", resume=None)
                try:
                    validate(cfg)
                except ConfigError as exc:
                    raise ConfigError(f"{w} worker(s) x batch {b} ({rule}): {exc}") from None
                for seed in range(base.seed, base.seed + repeats):
                    name = cfg.name if repeats == 1 else f"{cfg.name}-s{seed}"
                    points.append(Point(w, b, rule, dataclasses.replace(cfg, seed=seed, name=name)))
    return points


def efficiencies(points: list[Point]) -> None:
    """images/s per worker, relative to the fewest workers' (the median of their repeats) with the same
    per-worker batch and rule."""
    for p in points:
        same = [q for q in points if q.batch == p.batch and q.rule == p.rule and q.images_per_s]
        fewest = min((q.workers for q in same), default=None)
        if fewest is not None and p.images_per_s:
            base = statistics.median(q.images_per_s for q in same if q.workers == fewest)
            p.efficiency = (p.images_per_s / p.workers) / (base / fewest)


def summarize(points: list[Point]) -> list[dict]:
    """One row per grid point: each measure's median over the point's repeats, with (min, max) beside it.
    epochs_to_target's median counts a repeat that never reached the target as not reached (so a point
    reached in fewer than half its repeats is "not reached"); `reached` says in how many it was."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(p.key, []).append(p)
    rows = []
    for runs in groups.values():
        r = row(runs[0])
        r["repeats"], r["reached"] = len(runs), sum(q.epochs_to_target is not None for q in runs)
        for key in ("images_per_s", "efficiency", "best_val_acc", "epochs_run"):
            values = [getattr(q, key) for q in runs if getattr(q, key) is not None]
            r[key] = statistics.median(values) if values else None
            r[f"{key}_range"] = (min(values), max(values)) if len(values) > 1 else None
        for key in ("epochs_to_target", "epoch_seconds_to_target"):
            values = sorted((getattr(q, key) for q in runs), key=lambda v: math.inf if v is None else v)
            middle = values[(len(values) - 1) // 2:len(values) // 2 + 1]  # one or two middle values
            r[key] = None if None in middle else statistics.mean(middle)
            reached = [v for v in values if v is not None]
            r[f"{key}_range"] = (min(reached), max(reached)) if len(runs) > 1 and reached else None
        rows.append(r)
    return rows


COLUMNS = ("workers", "batch", "global_batch", "rule", "seed", "lr_peak", "warmup_epochs", "images_per_s",
           "efficiency", "epochs_to_target", "epoch_seconds_to_target", "best_val_acc", "epochs_run")


def row(p: Point) -> dict:
    """One run, as results.csv has it; lr_peak is the loop's own (cfg.lr times lr_scale)."""
    return {"workers": p.workers, "batch": p.batch, "global_batch": p.global_batch, "rule": p.rule,
            "seed": p.cfg.seed, "lr_peak": p.cfg.lr * lr_scale(p.cfg, p.global_batch),
            "warmup_epochs": p.cfg.warmup_epochs, "images_per_s": p.images_per_s, "efficiency": p.efficiency,
            "epochs_to_target": p.epochs_to_target, "epoch_seconds_to_target": p.epoch_seconds_to_target,
            "best_val_acc": p.best_val_acc, "epochs_run": p.epochs_run}
