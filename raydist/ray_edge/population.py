"""Population-based training on Ray Tune (raydist.study.population says what it is): the scheduler, the
offers trials make at each perturbation, and the exploit as a trial meets it when it starts again.

How an exploit travels. At an epoch of a perturbation a trial reports, beside its metrics, a Tune
checkpoint that holds only an offer (OFFER_FILE: which trial, which of its raydist checkpoint folders,
which epoch, its values); Tune keeps these few bytes per offer, never a copy of the weights. When PBT
decides that trial A takes trial B's weights, it sets A's config to B's perturbed one and hands A B's
latest offer as its checkpoint; A's process starts again, reads the offer (`take_offer`), copies B's
checkpoint into its own run folder (raydist.runs.lineage), and resumes from it with its new values. B keeps
the checkpoints of its last two perturbations whatever their metric (`pin_every`), so an offer PBT still
holds can be taken.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Optional

from ray.tune.schedulers import PopulationBasedTraining  # RAY
from ray.tune.schedulers.pb2 import PB2  # RAY

from raydist.output.report import cell
from raydist.runs.lineage import Donor, DonorGone, adopt, already_adopted, short_value
from raydist.study.distributions import GRID_KINDS
from raydist.study.population import PERTURBATION_FACTORS, nearest, perturbation_epochs, perturbed_fields
from raydist.study.study import Study

OFFER_FILE = "raydist_offer.json"


class KeepInRange:
    """PBT's custom explore step: each perturbed value moved back into what its field samples (x1.2 can leave
    a range; a grid or an integer needs one of its values)."""

    def __init__(self, study: Study):
        self.searched = {name: study.searched[name] for name in perturbed_fields(study.searched)}

    def __call__(self, config: dict) -> dict:
        return {**config, **{name: nearest(dist, config[name]) for name, dist in self.searched.items()
                             if name in config}}


def population_scheduler(study: Study):
    """Ray's PopulationBasedTraining (or PB2) over the study's perturbed fields, on the `epoch` clock."""
    from raydist.ray_edge.search import tune_domain

    fields = {name: study.searched[name] for name in perturbed_fields(study.searched)}
    common = dict(time_attr="epoch", perturbation_interval=study.perturbation_interval,
                  quantile_fraction=study.quantile_fraction, custom_explore_fn=KeepInRange(study), synch=study.synch)
    if study.scheduler == "pb2":
        bounds = {name: [dist.args[0], dist.args[1]] for name, dist in fields.items()}
        scheduler = PB2WithLineage(hyperparam_bounds=bounds, **common)
    else:
        # A choice or a grid moves to a neighbouring value; a range is multiplied (then kept in it).
        mutations = {name: list(dist.args) if dist.kind == "choice" else dist.grid() if dist.kind in GRID_KINDS
                     else tune_domain(dist) for name, dist in fields.items()}
        scheduler = PBTWithLineage(hyperparam_mutations=mutations, resample_probability=study.resample_probability,
                                   perturbation_factors=PERTURBATION_FACTORS, **common)
    scheduler.last_epoch = study.base_config().epochs
    return scheduler


class _Lineage:
    """Mixed into PBT and PB2: perturbs at the epochs of the offers, never at the last, and says each
    exploit in one line."""

    last_epoch = None  # the trials' last epoch: set by population_scheduler

    def on_trial_result(self, tune_controller, trial, result):
        # PBT perturbs at the epochs that carry an offer, and only there: its own clock (the epoch of the last
        # perturbation) starts again at 0 when Tune re-adds a restarted trial and on --resume, after which
        # it would perturb at epochs without one. A trial's last epoch is no perturbation: weights taken
        # there would train no further.
        epoch = result.get(self._time_attr)
        if not isinstance(epoch, int) or not perturbation_epochs(epoch, self._perturbation_interval) \
                or (self.last_epoch is not None and epoch >= self.last_epoch):
            return self.CONTINUE
        if trial in self._trial_state:
            self._trial_state[trial].last_perturbation_time = epoch - self._perturbation_interval
        return super().on_trial_result(tune_controller, trial, result)

    def _exploit(self, tune_controller, trial, trial_to_clone):
        own, donor = self._trial_state[trial], self._trial_state[trial_to_clone]
        before = dict(trial_to_clone.config)
        super()._exploit(tune_controller, trial, trial_to_clone)
        changes = ", ".join(f"{k} {short_value(before.get(k))} -> {short_value(v)}" for k, v in trial.config.items()
                            if k in self._hyperparam_mutations)
        at = (donor.last_result or {}).get("epoch")
        print(f"trial {trial.trial_id} ({self._metric} {cell(self._metric, self._metric_op * own.last_score)}) "
              f"takes trial {trial_to_clone.trial_id}'s weights of epoch {at} ({self._metric} "
              f"{cell(self._metric, self._metric_op * donor.last_score)}): {changes}", flush=True)


class PBTWithLineage(_Lineage, PopulationBasedTraining):
    pass


class PB2WithLineage(_Lineage, PB2):
    pass


def offering_report(study: Study, trial_id: str, values: dict) -> Callable[[dict], None]:
    """`on_report` for a trial under PBT: ray.tune.report, with an offer at each perturbation's epoch."""
    import ray.tune

    def report(metrics: dict) -> None:
        path, epoch = metrics.get("checkpoint_path"), metrics.get("epoch")
        if not path or not isinstance(epoch, int) or not perturbation_epochs(epoch, study.perturbation_interval):
            ray.tune.report(metrics)
            return
        folder = tempfile.mkdtemp(prefix="raydist-offer-")
        try:
            with open(os.path.join(folder, OFFER_FILE), "w") as fh:
                json.dump(Donor(trial_id, path, epoch, values).to_dict(), fh)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))  # Tune copies it
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return report


def take_offer(study: Study, *, trial_id: str, trial_path: str, run_dir: str, values: dict,
               started_unix: Optional[float] = None) -> Optional[dict]:
    """At a trial's (re)start under PBT: when Tune hands it another trial's offer that it has not taken
    yet, take it (raydist.runs.lineage.adopt) and return the exploit's history record; else None (a first
    start, or a restart that resumes its own run folder)."""
    import ray.tune

    from raydist.runs.history import read_history

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, OFFER_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as fh:
            donor = Donor(**json.load(fh))
    if donor.trial_id == trial_id or already_adopted(read_history(trial_path), donor, study.perturbation_interval):
        return None
    try:
        record = adopt(donor, trial_path=trial_path, run_dir=run_dir, values=values, metric=study.metric,
                       started_unix=started_unix)
    except DonorGone:  # pruned while this trial waited for a slot: its own weights, with the new values
        print(f"trial {trial_id}: trial {donor.trial_id}'s checkpoint of epoch {donor.epoch} is gone "
              f"({donor.checkpoint}); it continues from its own latest checkpoint with the new values", flush=True)
        return None
    if study.verbose:  # else the driver has said it (the scheduler's exploit line)
        print(f"continuing from trial {donor.trial_id}'s checkpoint of epoch {donor.epoch}", flush=True)
    return record
