"""What mattered in a study: each searched field's share of the variation of the study's metric over its
scored trials, by functional ANOVA (fANOVA: Hutter et al., ICML 2014) on a random forest fitted to the trials,
as Optuna computes it (`optuna.importance.FanovaImportanceEvaluator`).

    found = field_importance(rows, study)     # Importance(shares={"lr": 0.71, ...}, trials=8) or None
    found.line()                              # "what mattered (fANOVA over 8 scored trials): lr 71%, ..."

Every scored trial counts, the ones ASHA stopped early with the best value they reached (their fields are
part of why they were stopped). With few trials the shares are rough: the line says how many trials they
come from. Optuna is the [optuna] extra; without it there is no importance (None: the summary has no line).
No Ray here: it reads results.csv's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from raydist.study.distributions import Distribution
from raydist.study.study import Study

MIN_TRIALS = 3  # fewer scored trials than this say nothing a reader could use


@dataclass(frozen=True)
class Importance:
    shares: dict[str, float]  # field -> share of the metric's variance, summing to 1, most important first
    trials: int  # the scored trials the shares come from

    def line(self) -> str:
        parts = ", ".join(f"{name} {share:.0%}" for name, share in self.shares.items())
        return f"what mattered (fANOVA over {self.trials} scored trials): {parts}"


def field_importance(rows: list[dict], study: Study) -> Optional[Importance]:
    """The searched fields' importance for `best_{metric}`; None when Optuna is missing, fewer than
    MIN_TRIALS trials scored, or one field alone was searched (its share would be 100% by definition).
    Conditional fields (`when`) are left out: fANOVA needs a field's value in every trial."""
    try:
        import optuna
    except ImportError:
        return None
    fields = {name: dist for name, dist in study.searched.items() if not dist.when}
    if len(fields) < 2:
        return None
    key = f"best_{study.metric}"
    scored = [r for r in rows if _finite(r.get(key)) and all(n in r for n in fields)]
    if len(scored) < MIN_TRIALS or len({r[key] for r in scored}) < 2:
        return None
    distributions = {name: optuna_distribution(dist) for name, dist in fields.items()}
    trials = [optuna.trial.create_trial(params={n: _param(fields[n], r[n]) for n in fields},
                                        distributions=distributions, value=float(r[key])) for r in scored]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" is not the user's news
    try:
        record = optuna.create_study(direction="maximize" if study.mode == "max" else "minimize")
        record.add_trials(trials)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=study.seed)
        shares = optuna.importance.get_param_importances(record, evaluator=evaluator, normalize=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return Importance({name: float(share) for name, share in shares.items()}, len(scored))


def optuna_distribution(dist: Distribution):
    """A study file's distribution as Optuna's: floats and integers on their scale and step; a choice as a
    category; qloguniform (no log grid in Optuna) as the log-scale float range it is drawn from."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    a = dist.args
    if dist.kind == "choice":
        return CategoricalDistribution(list(a))
    if dist.kind in ("randint", "qrandint"):
        return IntDistribution(a[0], a[1], step=a[2] if len(a) == 3 else 1)
    if dist.kind == "quniform":
        return FloatDistribution(a[0], a[1], step=a[2])
    return FloatDistribution(a[0], a[1], log=dist.kind in ("loguniform", "qloguniform"))


def _param(dist: Distribution, value):
    """The value as the distribution samples it: a choice's own object, a grid value without the float noise
    Tune's rounding leaves (0.7000000000000001 for 0.7), which Optuna would find outside the range."""
    try:
        return dist.snap(value)
    except ValueError:
        return value


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
