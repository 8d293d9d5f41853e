"""Population-based training in a study (`scheduler: {type: pbt}` or `pb2`): its settings, the fields it may
change mid-run, and the checks that refuse what it cannot do, before Ray starts.

    scheduler: {type: pbt, perturbation_interval: 2, quantile_fraction: 0.25, resample_probability: 0.25}
    scheduler: {type: pb2, perturbation_interval: 2}     # PB2: a GP bandit picks the new values (ranges only)

Every `perturbation_interval` epochs a trial in the bottom `quantile_fraction` of the population (by the
study's metric) takes the weights, optimizer state and config of a trial in the top fraction (the exploit:
from that trial's raydist checkpoint of that epoch) and perturbs the fields PBT may change (PERTURBABLE,
the searched ones): x0.8 or x1.2 within the searched range, a neighbouring value of a choice or grid, or,
with `resample_probability`, a fresh sample. The other searched fields (model, batch size, ...) are drawn for
the first population and travel with the weights. Trials all run `epochs`; the LR schedule spans them, so
a trial that takes another's weights at epoch 4 continues that schedule at epoch 5 with its new peak LR.
"""

from __future__ import annotations

import math
from typing import Any

from raydist.errors import ConfigError
from raydist.study.distributions import Distribution

POPULATION_SCHEDULERS = ("pbt", "pb2")

POPULATION_KEYS = ("perturbation_interval", "quantile_fraction", "resample_probability", "synch")

# What a resumed run applies as given (raydist.run_config.RESUME_FIXED keeps the shapes): numbers the
# optimizer, the loss or the augmentation reads at every step, so a change mid-run acts from the next epoch.
PERTURBABLE = ("lr", "weight_decay", "momentum", "label_smoothing", "mixup", "cutmix", "mix_prob", "random_erase",
               "backbone_lr_mult", "clip_grad_norm")

# What a trial's resources are read from (raydist.ray_edge.trials.trial_resources): fixed under PBT.
RESOURCE_FIELDS = ("num_workers", "min_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu")

# Ray's PBT multiplies a number by one of these (its defaults).
PERTURBATION_FACTORS = (1.2, 0.8)


def perturbed_fields(searched: dict[str, Distribution]) -> list[str]:
    """The searched fields PBT changes mid-run, in the study's order."""
    return [name for name in searched if name in PERTURBABLE]


def read_population_settings(study, section: dict) -> None:
    """The scheduler section's PBT keys onto `study` (checked); keys of another scheduler are refused."""
    path = study.path
    if study.scheduler in POPULATION_SCHEDULERS:
        asha_keys = sorted({"grace_period", "reduction_factor"} & set(section))
        if asha_keys:
            raise ConfigError(f"{path}: scheduler.{asha_keys[0]} is ASHA's; {study.scheduler} takes: "
                              f"{', '.join(POPULATION_KEYS)}")
    else:
        pbt_keys = sorted(set(POPULATION_KEYS) & set(section))
        if pbt_keys:
            raise ConfigError(f"{path}: scheduler.{pbt_keys[0]} is population-based training's; give scheduler: "
                              f"{{type: pbt}} (or pb2) to use it")
        return
    interval = section.get("perturbation_interval", study.perturbation_interval)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"{path}: scheduler.perturbation_interval must be a whole number of epochs >= 1, "
                          f"got {interval!r}")
    study.perturbation_interval = interval
    fraction = section.get("quantile_fraction", study.quantile_fraction)
    if not _number(fraction) or not 0 < fraction <= 0.5:
        raise ConfigError(f"{path}: scheduler.quantile_fraction must be a number in (0, 0.5] (the share of the "
                          f"population that copies the top share), got {fraction!r}")
    study.quantile_fraction = float(fraction)
    resample = section.get("resample_probability", study.resample_probability)
    if not _number(resample) or not 0 <= resample <= 1:
        raise ConfigError(f"{path}: scheduler.resample_probability must be a number in [0, 1], got {resample!r}")
    if study.scheduler == "pb2" and "resample_probability" in section:
        raise ConfigError(f"{path}: scheduler.resample_probability is PBT's; PB2 chooses every new value with its "
                          f"bandit (remove it, or use type: pbt)")
    study.resample_probability = float(resample)
    synch = section.get("synch", study.synch)
    if not isinstance(synch, bool):
        raise ConfigError(f"{path}: scheduler.synch must be true or false, got {synch!r}")
    study.synch = synch


def check_population(study) -> None:
    """What PBT/PB2 cannot do in this study, in one line each (ConfigError)."""
    path, kind = study.path, study.scheduler
    if study.objectives:
        raise ConfigError(f"{path}: metric lists {len(study.objectives) + 1} objectives, but {kind} ranks the "
                          f"population by one; give one metric, or scheduler: {{type: fifo}}")
    if study.search != "random":
        raise ConfigError(f"{path}: search.algorithm {study.search} cannot run under scheduler {kind}: a trial's "
                          f"values change mid-run, so a searcher would learn from results its values did not "
                          f"give; the first population is drawn at random (search.algorithm random, the default "
                          f"under {kind})")
    if study.num_samples < 2:
        raise ConfigError(f"{path}: num_samples {study.num_samples}: {kind} needs a population of at least 2 trials")
    for name in ("epochs", "checkpoint_every"):
        if name in study.searched:
            raise ConfigError(f"{path}: searched.{name}: under {kind} every trial runs the same epochs and "
                              f"checkpoints at each perturbation; fix {name}")
    for name in RESOURCE_FIELDS:
        if name in study.searched:
            raise ConfigError(f"{path}: searched.{name}: under {kind} a trial that takes another's weights takes "
                              f"its values too, but keeps the resources Tune gave it at its start; fix {name}")
    fields = perturbed_fields(study.searched)
    if not fields:
        raise ConfigError(f"{path}: scheduler {kind} perturbs searched fields mid-run, and none of this study's "
                          f"can change mid-run; search one of: {', '.join(PERTURBABLE)}")
    for name in fields:
        dist = study.searched[name]
        if dist.when:
            raise ConfigError(f"{path}: searched.{name} has a condition (when), but {kind} changes it mid-run in "
                              f"every trial; drop the condition or fix {name}")
        if kind == "pb2" and dist.kind == "choice":
            raise ConfigError(f"{path}: searched.{name} is a choice, and PB2 models ranges only; give it a range "
                              f"(uniform, loguniform, ...) or use type: pbt")
    cfg = study.base_config()
    if study.perturbation_interval >= cfg.epochs:
        raise ConfigError(f"{path}: scheduler.perturbation_interval {study.perturbation_interval} is not below "
                          f"epochs {cfg.epochs}: no trial would ever be perturbed; give a shorter interval")
    if not cfg.checkpoint_every:
        raise ConfigError(f"{path}: checkpoint_every 0 saves only the last epoch, which leaves {kind} no "
                          f"checkpoint to exploit; give checkpoint_every 1 (the default) or a divisor of "
                          f"perturbation_interval {study.perturbation_interval}")
    if study.perturbation_interval % cfg.checkpoint_every:
        raise ConfigError(f"{path}: scheduler.perturbation_interval {study.perturbation_interval} is not a "
                          f"multiple of checkpoint_every {cfg.checkpoint_every}: the exploit step copies the "
                          f"checkpoint of the perturbation's epoch; make it a multiple")
    trainer = next((c for c in study._corner_configs() if not study.in_process(c)), None)
    if trainer is not None:
        raise ConfigError(f"{path}: {kind} exploits checkpoints of trials that train in their own process (one "
                          f"worker, one_worker_trials: in_process); this study has trials of {trainer.workers_text()} "
                          f"worker(s) as TorchTrainer runs: fix num_workers 1 (and one_worker_trials in_process)")


def nearest(dist: Distribution, value: Any) -> Any:
    """`value` moved into what `dist` samples: a range's nearest end, a grid's nearest value, a choice
    unchanged when it is one (PBT's x0.8/x1.2 can step outside a range or off a grid)."""
    if dist.kind == "choice":
        return dist.snap(value)
    low, high = dist.args[0], dist.args[1]
    value = min(max(float(value), low), high)
    if dist.kind in ("uniform", "loguniform"):
        return value
    grid = dist.grid() if dist.kind != "qloguniform" else None
    if grid is not None:
        return min(grid, key=lambda v: abs(v - value))
    q = dist.args[2]
    return dist.snap(min(max(round(value / q) * q, low), high))


def perturbation_epochs(epoch: int, interval: int) -> bool:
    """Is `epoch` one at which PBT perturbs (every `interval` epochs from the start; a trial that took
    another's weights continues at that trial's epoch, so this holds across exploits)?"""
    return epoch > 0 and epoch % interval == 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def search_given(raw: dict, settings: dict | None) -> bool:
    """Did the study file or the command line name a search algorithm (else PBT draws at random)?"""
    return bool((raw.get("search") or {}).get("algorithm") or (settings or {}).get("search"))


def scheduler_section(study) -> dict:
    """The study's scheduler as its file writes it (save_study)."""
    if study.scheduler in POPULATION_SCHEDULERS:
        section = {"type": study.scheduler, "perturbation_interval": study.perturbation_interval,
                   "quantile_fraction": study.quantile_fraction, "synch": study.synch}
        if study.scheduler == "pbt":
            section["resample_probability"] = study.resample_probability
        return section
    return {"type": study.scheduler, "grace_period": study.grace_period, "reduction_factor": study.reduction_factor}
