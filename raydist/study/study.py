"""A study: the fixed and searched fields, searcher, scheduler, failures and console settings, and how a
sampled trial becomes a TrainConfig (planned epochs, per-trial resources, corner checks before any trial).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from raydist.config.fields import TrainConfig, coerce_values
from raydist.config.values import fold_model_args, merge_config_values, require_package
from raydist.errors import ConfigError
from raydist.preflight import validate
from raydist.study.population import POPULATION_KEYS, POPULATION_SCHEDULERS, check_population

MAX_CORNERS = 4096  # combinations of the searched fields' extremes checked one by one before a study starts


MAX_SEED = 2**32 - 1  # the searchers' seeds go to numpy's RandomState, which takes 0 .. 2^32 - 1


METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")


# What a multi-objective study may weigh against its metric (each trial's value: raydist.study.pareto).
OBJECTIVES = ("epoch_time_s", "images_per_s", "trainable_params")


SEARCH_ALGORITHMS = ("hyperopt", "optuna", "random")


SCHEDULERS = ("asha", "fifo", "pbt", "pb2")  # pbt/pb2: population-based training (raydist.study.population)


# Set per trial by raydist.tune, so a study may not set them.
PER_TRIAL_FIELDS = ("address", "name", "storage_path", "log_dir", "resume")


TOP_LEVEL_KEYS = ("name", "description", "metric", "mode", "num_samples", "max_concurrent", "search", "scheduler",
                  "failures", "one_worker_trials", "console", "fixed", "searched", "points_to_evaluate")


ONE_WORKER_TRIALS = ("in_process", "trainer")  # how a one-worker trial trains: in its own process, or a TorchTrainer


SEARCH_KEYS = ("algorithm", "initial_points", "seed")


SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", *POPULATION_KEYS)


FAILURE_KEYS = ("worker_restarts", "trial_restarts")


CONSOLE_KEYS = ("verbose", "status_every_s")


@dataclass
class Study:
    path: str
    fixed: dict
    searched: dict  # field -> Distribution
    description: str = ""
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: Optional[int] = None
    search: str = "hyperopt"
    initial_points: int = 3
    seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0
    perturbation_interval: int = 2  # pbt/pb2: epochs between perturbations (raydist.study.population)
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    synch: bool = False  # pbt/pb2: every trial waits for the others at each perturbation
    points_to_evaluate: list = field(default_factory=list)
    objectives: tuple = ()  # a multi-objective study's other (metric, mode) pairs, after metric and mode
    given_name: Optional[str] = None  # the file's `name` key
    worker_restarts: int = 0  # a trial's worker group restarted from its checkpoint (Train's max_failures)
    trial_restarts: int = 1  # a failed trial run again from its checkpoint (Tune's max_failures)
    one_worker_trials: str = "in_process"  # ONE_WORKER_TRIALS
    verbose: bool = False  # the console: Ray's own full output and every trial's epoch lines (raydist.tune)
    saved_verbose: Optional[bool] = None  # on --resume, the study file's own `verbose` (--verbose is for now)
    status_every_s: float = 30.0  # the console: a status line this often (0: never)

    def check_search(self) -> None:
        """The search algorithm and scheduler against what the study asks of them (several objectives,
        conditional fields)."""
        if self.search == "optuna":
            require_package("optuna", f"{self.path}: search.algorithm optuna")
        if self.population:
            check_population(self)
        if self.objectives and self.search == "hyperopt":
            raise ConfigError(f"{self.path}: metric lists {len(self.objectives) + 1} objectives, which "
                              f"search.algorithm optuna models together (and random search samples blind); "
                              f"HyperOpt's TPE optimises one: use algorithm optuna (or random; --search on the command "
                              f"line)")
        if self.objectives and self.scheduler == "asha":
            raise ConfigError(f"{self.path}: metric lists {len(self.objectives) + 1} objectives, but ASHA stops "
                              f"trials by one metric; give scheduler: {{type: fifo}} or --scheduler fifo (every trial "
                              f"runs to its end)")
        conditional = [name for name, dist in self.searched.items() if dist.when]
        if conditional and self.search == "hyperopt":
            # Ray's HyperOpt bridge samples a flat space: every field in every trial, which TPE would then model
            # as if the fields that did not apply had acted.
            raise ConfigError(f"{self.path}: searched.{conditional[0]} has a condition (when), which "
                              f"search.algorithm optuna samples only where it applies and random search leaves out "
                              f"where it does not; HyperOpt cannot: use algorithm optuna (or random)")

    @property
    def population(self) -> bool:
        """Population-based training (pbt, pb2): trials take each other's weights mid-run."""
        return self.scheduler in POPULATION_SCHEDULERS

    def all_objectives(self) -> list[tuple[str, str]]:
        """[(metric, mode), then the other objectives]: one pair for a study of one metric."""
        return [(self.metric, self.mode), *self.objectives]

    def in_process(self, cfg: TrainConfig) -> bool:
        """Does this trial train in its own process (no Ray Train worker group)?"""
        return cfg.num_workers == 1 and not cfg.is_elastic() and self.one_worker_trials == "in_process"

    def every_trial_in_process(self) -> bool:
        """Do all trials train in their own processes (then one process can serve trial after trial)?"""
        return all(self.in_process(cfg) for cfg in self._corner_configs())

    @property
    def name(self) -> str:
        """The `name` key, else the file name: a study saved as <experiment>/study.yaml keeps its name."""
        return self.given_name or os.path.splitext(os.path.basename(self.path))[0]

    @property
    def max_epochs(self) -> int:
        """ASHA's max_t (its budget): the most epochs any trial can run."""
        if "epochs" in self.searched:
            return int(max(self.searched["epochs"].extremes()))
        return self.base_config().epochs

    @property
    def warnings(self) -> list[str]:
        """One sentence per unfair or surprising setting, for the study's start (follows --scheduler)."""
        out = []
        if self.scheduler == "asha" and "epochs" in self.searched:
            budget = self.max_epochs
            out.append(f"{self.name}: epochs is searched under ASHA, which compares trials at its rungs, so raydist "
                       f"stretches every trial's LR schedule over the budget ({budget} epochs) to keep them at the "
                       f"same point of it, and a trial with fewer epochs ends before its LR has decayed; fix epochs "
                       f"at the budget (fixed: {{epochs: {budget}}}) and let ASHA decide how long each trial runs")
        if self.search in ("hyperopt", "optuna") and self.initial_points >= self.num_samples:
            out.append(f"{self.name}: search.initial_points {self.initial_points} >= num_samples "
                       f"{self.num_samples}: every trial is a random start-up point and TPE never models a "
                       f"result (a random search); give more trials or fewer initial_points")
        if len(self.points_to_evaluate) > self.num_samples:
            out.append(f"{self.name}: only the first {self.num_samples} of the {len(self.points_to_evaluate)} "
                       f"points_to_evaluate run (num_samples {self.num_samples})")
        if self.scheduler == "asha" and "schedule_epochs" in self.fixed:
            out.append(f"{self.name}: schedule_epochs {self.fixed['schedule_epochs']} is replaced by ASHA's budget "
                       f"({self.max_epochs} epochs) in every trial")
        return out

    def base_config(self) -> TrainConfig:
        return TrainConfig(**self.fixed)

    def _with(self, values: dict) -> dict:
        """The fixed values with `values` (searched ones, `model_args.NAME` among them) on top."""
        return self._scheduled(merge_config_values(self.fixed, fold_model_args(values)))

    def applying(self, values: dict) -> dict:
        """The values with every searched field that does not apply to this trial left out (its `when`
        fails, or it is not among the values: a choice of null is a value); values of other keys are kept as
        given. Parents come first in `searched` (study_file orders them), so a chain of conditions is decided
        in one pass."""
        out = {k: v for k, v in values.items() if k not in self.searched}
        for name, dist in self.searched.items():
            if name in values and dist.applies(out):
                out[name] = values[name]
        return out

    def decode(self, sample: dict) -> dict:
        """A Tune sample as config values: the fields that apply to the trial (a conditional field drawn by a
        searcher that draws every field is dropped where its condition fails), with qloguniform's float
        noise removed (HyperOpt and Tune round to q in floating point: 3 x 0.1 comes back as
        0.30000000000000004)."""
        out = self.applying(sample)
        for name, dist in self.searched.items():
            if dist.kind == "qloguniform" and name in out:
                try:
                    out[name] = dist.snap(out[name])
                except ValueError:
                    pass  # not a sample of this study; trial_config validates it as given
        return out

    def trial_config(self, sample: dict) -> TrainConfig:
        """The validated TrainConfig of one trial: defaults < fixed < the sampled values (< ASHA's budget
        as the span of the LR schedule)."""
        return validate(self.planned_config(sample))

    def planned_config(self, sample: dict) -> TrainConfig:
        """A trial's config as planned, not validated: what Tune reserves for it, its console line and its
        planned epochs are read from this. A sample the checks would refuse (possible only past MAX_CORNERS
        or for a check that is not monotone in a range) still gets a trial, which fails in one line (its row:
        error) while the study goes on; trial_config is that check."""
        values = merge_config_values({"max_failures": self.worker_restarts, **self.fixed},
                                     coerce_values(self.decode(sample), f"{self.path}: trial"))
        return TrainConfig(**self._scheduled(values))

    def _scheduled(self, values: dict) -> dict:
        # Under ASHA every schedule spans the budget, so trials at a rung are at the same LR factor.
        return {**values, "schedule_epochs": self.max_epochs} if self.scheduler == "asha" else values

    def per_trial_resources(self, cluster_has_gpus: bool, *, fewest: bool = False) -> tuple[float, float]:
        """(CPUs, GPUs) the largest trial asks for; use_gpu unset means GPUs when the cluster has them.
        `fewest`: what it needs to start (an elastic trial's minimum; the same as the above for fixed ones)."""
        worst = (0.0, 0.0)
        for cfg in self._corner_configs():
            workers = cfg.fewest_workers() if fewest else cfg.num_workers
            use_gpu = cluster_has_gpus if cfg.use_gpu is None else cfg.use_gpu
            gpus = workers * cfg.gpus_per_worker if use_gpu else 0.0
            worst = (max(worst[0], workers * cfg.cpus_per_worker), max(worst[1], gpus))
        return worst

    def smallest_trial_bundles(self, cluster_has_gpus: bool) -> list[dict]:
        """The smallest trial's resources as one {CPU, GPU} bundle per worker (an elastic trial at its
        minimum): what a study's start waits for on an autoscaling cluster."""
        return min((self._bundles(cfg, cluster_has_gpus) for cfg in self._corner_configs()),
                   key=lambda b: (sum(x["GPU"] for x in b), sum(x["CPU"] for x in b)))

    @staticmethod
    def _bundles(cfg: TrainConfig, cluster_has_gpus: bool) -> list[dict]:
        use_gpu = cluster_has_gpus if cfg.use_gpu is None else cfg.use_gpu
        return [{"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker if use_gpu else 0.0}] * cfg.fewest_workers()

    def smallest_worker(self, cluster_has_gpus: bool) -> dict:
        """{CPU, GPU} of the smallest worker any trial can have (each at its smallest over the space)."""
        shapes = [b[0] for b in (self._bundles(cfg, cluster_has_gpus) for cfg in self._corner_configs())]
        return {"CPU": min(b["CPU"] for b in shapes), "GPU": min(b["GPU"] for b in shapes)}

    def _corner_configs(self):
        return (cfg for _, cfg in self._corners())

    def _corners(self):
        """Every combination of the searched fields' extremes (both ends of a range, every choice): a
        sample lies between them, so a bad combination (2 workers x batch 1024 on digits' 1,438 training
        images) is refused before any trial starts, not when Tune creates that trial. Combinations that
        move fewer fields off their low end come first, so that one bad bound is named on its own. Above
        MAX_CORNERS combinations: each field at each extreme, the others all at their low or all at their
        high end. Yields (which combination, in words; its config)."""
        names = list(self.searched)
        ends = [self.searched[name].extremes() for name in names]
        if math.prod(len(e) for e in ends) <= MAX_CORNERS:
            picks = sorted(itertools.product(*(range(len(e)) for e in ends)), key=lambda p: sum(i > 0 for i in p))
        else:
            picks = [tuple(0 for _ in names)]
            for base in ([0] * len(names), [len(e) - 1 for e in ends]):
                for j, values in enumerate(ends):
                    picks += [tuple(base[:j] + [i] + base[j + 1:]) for i in range(len(values))]
            picks = list(dict.fromkeys(picks))
        for pick in picks:
            values = self.applying({name: ends[j][i] for j, (name, i) in enumerate(zip(names, pick))})
            moved = [(name, ends[j][i]) for j, (name, i) in enumerate(zip(names, pick)) if i > 0 and name in values]
            if not moved:
                words = ""
            elif len(moved) == 1:
                words = f"searched {moved[0][0]} reaches {moved[0][1]}: "
            else:
                words = f"searched {' with '.join(f'{name} {value}' for name, value in moved)}: "
            yield words, TrainConfig(**self._with(values))
