"""The study's search algorithms: TPE (HyperOpt's or Optuna's) that waits for results before it models, and
random search; all with a trial concurrency that a resumed study can change.

    searcher = TPEGate(HyperOptSearch(n_initial_points=3, ...), initial_points=3, max_concurrent=8)
    searcher = TPEGate(optuna_searcher(study), initial_points=3, max_concurrent=8)   # Optuna's TPE
    searcher = RandomSearch(points_to_evaluate=..., random_state=0, max_concurrent=8)
    set_resume_concurrency(4)   # before Tuner.restore(...).fit(): the restored searcher runs 4 at once

Why the gate: hyperopt's TPE draws random points until it holds `n_initial_points` trials, and it counts
trials still running (no result yet) among them. With 8 trials at once and 3 initial points, the first 8
proposals are all made before any result exists: TPE is random search, and the trials proposed while
results are pending are modelled with an infinite loss. TPEGate proposes the start-up points (the study's
`points_to_evaluate` and random ones, `max(initial_points, len(points_to_evaluate))` in all) at once, then
holds every further proposal (Tune asks again later) until `initial_points` trials have finished with a
result (HyperOpt is told a trial's result when it finishes, not at its epochs), so TPE's first real
proposal is modelled on real results. A start-up trial that fails is replaced at once, at the study's
concurrency: hyperopt leaves failed trials out of its count, so the replacement is another random start-up
point. The gate never holds when none of its trials is running (an all-errors start would otherwise wait
forever; TPE then proposes from what it has).

A result whose metric is not finite (a diverged trial's NaN loss) reaches HyperOpt as the worst value there
is for the study's mode: hyperopt drops non-finite losses, and TPE would go on proposing the region that
diverged. (Optuna would mark such a trial failed and forget it the same way.)

Optuna's TPE is multivariate (it models the searched fields jointly, not one by one) and a constant liar
(a trial still running counts as the worst result so far, so concurrent proposals spread out instead of
piling onto the same point); it runs behind the same gate, with the study's seed, points_to_evaluate
(enqueued first), resume (Tune saves the Optuna study with the experiment) and non-finite rule.

Why concurrency lives here and not in Ray's ConcurrencyLimiter: Tune restores a study's searchers from
the state it saved, the concurrency included, so a concurrency given to `--resume` (or a bigger cluster's)
would be ignored. TPEGate and RandomSearch take the one set by `set_resume_concurrency` when restored.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Callable, Optional

from ray.tune.search import BasicVariantGenerator, Searcher

from raydist.study.distributions import GRID_KINDS, Distribution
from raydist.study.pareto import objective_values
from raydist.study.study import Study

# Set by raydist.tune just before a restored study runs: Tune rebuilds the searcher from its pickled
# state inside fit(), and this is the one value of the new command line it must take.
_resume_concurrency: Optional[int] = None


def set_resume_concurrency(max_concurrent: Optional[int]) -> None:
    global _resume_concurrency
    _resume_concurrency = max_concurrent


# Set by a study on a cluster whose autoscaler's limit is unknown (raydist.ray_edge.study.trials_that_fit_now):
# the trials to run at once now, which grows as nodes arrive; the searchers never exceed it.
_concurrency_now: Optional[Callable[[], int]] = None


def set_concurrency_now(trials_now: Optional[Callable[[], int]]) -> None:
    global _concurrency_now
    _concurrency_now = trials_now


def _limit(max_concurrent: int) -> int:
    return max_concurrent if _concurrency_now is None else min(max_concurrent, _concurrency_now())


class TPEGate(Searcher):
    """Wraps HyperOptSearch: start-up proposals at once, TPE proposals only once results exist."""

    def __init__(self, searcher: Searcher, *, initial_points: int, points_to_evaluate: int = 0,
                 max_concurrent: int):
        self.searcher = searcher
        self.initial_points = initial_points  # results TPE waits for (hyperopt's n_initial_points)
        self.startup = max(initial_points, points_to_evaluate)  # proposals that need no result
        self.max_concurrent = max_concurrent
        self.live: set[str] = set()
        self.proposed = 0
        self.failed = 0  # proposals that ended in an error: hyperopt replaces them with random start-up points
        self.results = 0  # trials that finished with a result: what TPE models
        self.epochs: dict[str, list[dict]] = {}  # a multi-objective study's live trials: their objectives per epoch
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    # -- the rule
    def waiting_for_results(self) -> bool:
        """True while every start-up point is out and fewer than initial_points trials have finished."""
        return (self.proposed - self.failed >= self.startup and self.results < self.initial_points
                and bool(self.live))

    def suggest(self, trial_id: str) -> Optional[dict]:
        if len(self.live) >= _limit(self.max_concurrent) or self.waiting_for_results():
            return None  # Tune asks again when a trial ends
        config = self.searcher.suggest(trial_id)
        if config not in (None, Searcher.FINISHED):
            self.live.add(trial_id)
            self.proposed += 1
        return config

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        objectives = self.objectives()
        epochs = self.epochs.pop(trial_id, None)
        if result and len(objectives) > 1 and epochs:
            # Told what results.csv and the Pareto front hold (raydist.study.pareto), not the last epoch's.
            result = {**result, **_trial_objectives(epochs, objectives)}
        if result:
            result = {**result, **{m: self.worst(mode) for m, mode in objectives
                                   if m in result and not _finite(result[m])}}
        if trial_id in self.live:
            self.live.discard(trial_id)
            if not error and result and all(m in result for m, _ in objectives):
                self.results += 1
            elif error:
                self.failed += 1
        # Passed on for every trial HyperOpt proposed (it ignores others); Optuna's bridge raises for a trial it
        # did not propose (RAY internal: OptunaSearch._ot_trials), so it is told of its own only.
        if trial_id in getattr(self.searcher, "_ot_trials", {trial_id: None}):
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def objectives(self) -> list[tuple[str, str]]:
        """[(metric, mode)]: one pair, or a multi-objective study's several (Optuna takes lists)."""
        if isinstance(self.metric, list):
            return list(zip(self.metric, self.mode))
        return [(self.metric, self.mode)]

    def worst(self, mode: Optional[str] = None) -> float:
        """The worst finite value of a metric, for its mode (default: the study's). Several objectives: a
        bounded one, as Optuna's multi-objective TPE scales its hypervolume reference point by 1.1."""
        worst = MULTI_OBJECTIVE_WORST if isinstance(self.metric, list) else sys.float_info.max
        return -worst if (mode or self.mode) == "max" else worst

    # -- plumbing to the wrapped searcher
    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) and "epoch" in result:
            self.epochs.setdefault(trial_id, []).append({k: result.get(k) for k in (*self.metric, "epoch")})
        if trial_id in getattr(self.searcher, "_ot_trials", {trial_id: None}):  # as in on_trial_complete
            self.searcher.on_trial_result(trial_id, result)

    # Tune saves a wrapper (an object with `.searcher`) through get_state/set_state, and the wrapped
    # HyperOptSearch through its own files.
    def get_state(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "searcher"})

    def set_state(self, state: dict) -> None:
        self.__dict__.update({"failed": 0, "epochs": {}, **state})  # a study saved before these existed
        if _resume_concurrency is not None:
            self.max_concurrent = _resume_concurrency


MULTI_OBJECTIVE_WORST = 1e30  # sys.float_info.max x 1.1 overflows to inf in Optuna's reference point


def _trial_objectives(epochs: list[dict], objectives: list[tuple[str, str]]) -> dict:
    """A trial's value of each objective from its epochs, as results.csv holds it: the best of the first
    metric, then raydist.study.pareto's rule for the others (at that best epoch, or the median)."""
    (metric, mode), others = objectives[0], objectives[1:]
    scored = [e for e in epochs if _finite(e.get(metric))]
    if not scored:
        return {}
    best = (max if mode == "max" else min)(scored, key=lambda e: e[metric])
    values = objective_values(epochs, best, [m for m, _ in others])
    return {metric: best[metric], **{m: v for m, v in values.items() if v is not None}}


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number: HyperOpt's own error says so


class RandomSearch(BasicVariantGenerator):
    """Tune's random search, whose concurrency a resume can change (it is part of the state Tune restores)
    and a growing cluster can raise (`_limit`): Tune's generator reads `max_concurrent` for each trial."""

    _max_concurrent = 0  # what an instance sets; here for one unpickled from before the property (Tune's 0: none)

    @property
    def max_concurrent(self) -> int:
        return _limit(self._max_concurrent) if self._max_concurrent > 0 else self._max_concurrent

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        self._max_concurrent = value

    def set_state(self, state: dict) -> None:
        if "max_concurrent" in state:  # saved before the property: the value is the instance's own
            state = {**state, "_max_concurrent": state["max_concurrent"]}
            del state["max_concurrent"]
        super().set_state(state)
        if _resume_concurrency is not None:
            self.max_concurrent = _resume_concurrency


# ---- the study file's distributions as Tune's ----------------------------------------------------------


def tune_domain(dist: Distribution):
    """One searched dimension as Ray Tune's sampler."""
    from ray import tune

    a = dist.args
    if dist.kind == "choice":
        return tune.choice(list(a))
    if dist.kind in GRID_KINDS:
        return tune.choice(dist.grid())  # uniform over every value, both ends, under both searchers
    if dist.kind == "qloguniform":  # bounds on the grid: both searchers stay in [low, high]
        return tune.qloguniform(*a)
    return getattr(tune, dist.kind)(*a)


def tune_space(study: Study) -> dict:
    """The study's searched fields as Tune's param_space: {"lr": tune.loguniform(...), ...}; empty for Optuna,
    which holds the space itself (OptunaSpace)."""
    if study.search == "optuna":
        return {}
    return {name: tune_domain(dist) for name, dist in study.searched.items()}


class OptunaSpace:
    """The study's searched fields asked of an Optuna trial, define-by-run: each field as Optuna's own
    distribution (integers stay integers, steps stay steps), so its TPE models the space as written, and a
    conditional field (`when`) asked only in the trials it applies to.
    Optuna has no log-scale grid: a qloguniform field is asked on the log scale and snapped to the grid (as
    HyperOpt's qloguniform does), the snapped value being the trial's. A class, not a closure: Tune pickles
    the searcher, this included, with the experiment."""

    def __init__(self, searched: dict[str, Distribution]):
        self.searched = dict(searched)

    def __call__(self, trial) -> dict:
        values = {}
        for name, dist in self.searched.items():  # a field's condition comes before it (study_file orders them)
            a = dist.args
            if not dist.applies(values):
                continue  # asked only in the trials it applies to: Optuna models it there alone
            if dist.kind == "choice":
                values[name] = trial.suggest_categorical(name, list(a))
            elif dist.kind in ("randint", "qrandint"):
                values[name] = trial.suggest_int(name, a[0], a[1], step=a[2] if len(a) == 3 else 1)
            elif dist.kind == "quniform":  # the bounds are multiples of q (checked when read): Optuna's grid
                values[name] = dist.snap(trial.suggest_float(name, a[0], a[1], step=a[2]))
            elif dist.kind == "qloguniform":
                x = trial.suggest_float(name, a[0], a[1], log=True)
                values[name] = dist.snap(min(max(round(x / a[2]) * a[2], a[0]), a[1]))
            else:
                values[name] = trial.suggest_float(name, a[0], a[1], log=dist.kind == "loguniform")
        return values


def optuna_searcher(study: Study):
    """Ray Tune's OptunaSearch over the study's space with Optuna's TPE: multivariate, a constant liar,
    `initial_points` random start-up trials, the study's seed."""
    import warnings

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise; raydist's console says it
    with warnings.catch_warnings():  # multivariate and constant_liar are "experimental" since Optuna 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: the fields of a conditional space modelled jointly within each group of trials that share
        # them (without it, a field that is sometimes absent falls back to being drawn on its own)
        sampler = optuna.samplers.TPESampler(n_startup_trials=study.initial_points, seed=study.seed,
                                             multivariate=True, group=True, constant_liar=True)
    objectives = study.all_objectives()
    metric, mode = (([m for m, _ in objectives], [d for _, d in objectives]) if len(objectives) > 1
                    else (study.metric, study.mode))  # several: Optuna's multi-objective TPE
    return OptunaSearch(space=OptunaSpace(study.searched), metric=metric, mode=mode,
                        points_to_evaluate=study.points_to_evaluate or None, sampler=sampler)
