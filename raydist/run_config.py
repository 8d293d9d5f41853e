"""The library behind `python -m raydist.train` and every Tune trial: prepare a run, check it, fit it.

    cfg = prepare(cfg, explicit)              # --resume applied, paths absolute, run named, data and weights checked
    summary = fit(cfg)                        # N DDP workers of a Ray Train TorchTrainer, on the connected cluster
    summary = fit_in_trial(cfg, ...)          # a one-worker Tune trial: the loop in the trial's own process

Everything that can be checked before a cluster starts is checked in `prepare` (bad input is a
ConfigError: one line, exit 2, nothing written). `fit` checks resources against the cluster (what it can
grow to), writes the run's config.yaml and runs raydist.loop's worker loop. The command modules
(raydist.train, raydist.tune) parse and print around these.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

from raydist.cli import resolve
from raydist.config.fields import TrainConfig
from raydist.config.values import saved_config_values
from raydist.config.values import require_package
from raydist.data.registry import DATASETS
from raydist.data.sizes import classes_predicted
from raydist.data.sources import check_files
from raydist.errors import ConfigError, DataFileCorrupt, DatasetNotFound, FolderError
from raydist.runs.checkpoints import latest_checkpoint
from raydist.runs.run_folder import check_epochs_left, read_resume_target
from raydist.storage import is_uri

# ---- before the cluster: resolve and check everything that can be checked ---------------------------


def _local_abspath(path: Optional[str]) -> Optional[str]:
    return path if path is None or is_uri(path) else os.path.abspath(os.path.expanduser(path))


def worker_path(path: Optional[str], *, joined_cluster: bool) -> Optional[str]:
    """A path the workers read (data folder, weights file), made absolute here: workers (and Tune trials)
    run in folders of their own. On a cluster someone else started, `~/...` stays for each node to expand
    as its own home; a URI stays as it is."""
    if joined_cluster and path and path.startswith("~"):
        return path
    return _local_abspath(path)


def new_wandb_id() -> str:
    import secrets

    return "raydist-" + secrets.token_hex(8)


def prepare(cfg: TrainConfig, explicit: dict, config_files: Optional[list[str]] = None) -> TrainConfig:
    """Apply --resume, make paths absolute, name the run, check the data."""
    if cfg.resume:
        resume = _local_abspath(cfg.resume).rstrip("/")  # s3://.../run/ names the run "run", not ""
        is_run_dir, saved = read_resume_target(resume)
        # The saved run's settings are the defaults now; --config and flags still override them.
        saved = {k: v for k, v in saved_config_values(saved).items() if k not in ("address", "log_dir", "verbose")}
        if not is_run_dir:  # a checkpoint folder starts a new run: a W&B run of its own
            saved.pop("wandb_id", None)
        saved.update(resume=resume, name=os.path.basename(resume) if is_run_dir else None)
        if is_run_dir:
            saved["storage_path"] = os.path.dirname(resume)
        cfg = resolve({k: v for k, v in explicit.items() if k != "resume"}, config_files, base=saved)
        check_resume_compatible(saved, cfg, resume)
        check_epochs_left(resume, is_run_dir, cfg.epochs)
        target = os.path.join(_local_abspath(cfg.storage_path), cfg.name) if cfg.name else None
        if is_run_dir and target != resume:
            # Continued under another --name/--storage-path: Ray would look for checkpoints in the new
            # folder and find none, so start from the old run's latest checkpoint explicitly.
            cfg = dataclasses.replace(cfg, resume=latest_checkpoint(resume) or resume)
            if "wandb_id" not in explicit:  # a new run folder, a new W&B run
                cfg = dataclasses.replace(cfg, wandb_id=None)
    name = cfg.name or f"{cfg.dataset}-{cfg.model.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.wandb and cfg.wandb_id is None:
        # One raydist run is one W&B run: a new id, kept in config.yaml for its restarts and --resume (an id
        # made from the run folder's path would continue an old W&B run when a deleted run's name is reused).
        cfg = dataclasses.replace(cfg, wandb_id=new_wandb_id())
    # On a cluster someone else started, `~/data` means each node's own home: expanded on the node.
    joined = cfg.address is not None
    cfg = dataclasses.replace(cfg, name=name, storage_path=_local_abspath(cfg.storage_path),
                              data_dir=worker_path(cfg.data_dir, joined_cluster=joined),
                              weights=worker_path(cfg.weights, joined_cluster=joined), resume=_local_abspath(cfg.resume))
    check_storage(cfg.storage_path)
    if cfg.wandb:
        require_package("wandb", "--wandb")
    if cfg.log_dir is None and not is_uri(cfg.storage_path):
        cfg = dataclasses.replace(cfg, log_dir=os.path.join(cfg.storage_path, name, "tensorboard"))
    cfg = dataclasses.replace(cfg, log_dir=_local_abspath(cfg.log_dir))
    if cfg.address is None:
        # A local cluster is this machine: check now, before it starts. On a cluster the data lives on the
        # nodes that run the workers, so each node's first worker checks it there (engine.load_data_once_per_node).
        check_data(cfg.dataset, cfg.data_dir, cfg.download)
        if cfg.dataset == "folder":
            check_folder_fits(cfg)
    if not cfg.resume:  # a resumed run takes its weights from the checkpoint
        check_weights(cfg, on_this_machine=cfg.address is None)
    return cfg


def check_storage(path: str, flag: str = "--storage-path") -> None:
    """A local storage folder this machine can create and write in: else one line now, not an error
    after the cluster has started. (A URI is checked by Ray's storage layer when the run starts.)"""
    import tempfile

    if is_uri(path):
        return
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder; give a folder path")
    try:  # os.access says yes to root on read-only mounts and /proc: try it, leaving nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".raydist-write-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot create folders in {existing} ({exc.strerror or exc}); give a "
                          f"folder this user can write") from None


def check_folder_fits(cfg: TrainConfig, memory_bytes: Optional[int] = None, cluster_cpus: Optional[float] = None
                      ) -> None:
    """Before Ray starts on this machine: `--data-loader memory` must fit its workers' copies in half of its
    memory, and the streamed path (asked for, or auto's choice) needs CPUs the workers leave free for Ray
    Data's decoding."""
    from raydist.data.folder import DECODE_CPUS, fits_in_memory, host_memory_bytes, stored_size
    from raydist.data.sizes import input_side
    from raydist.data.sources import folder_index
    from raydist.loop.worker_data import folder_copy_bytes, streams_folder

    memory_bytes = host_memory_bytes() if memory_bytes is None else memory_bytes
    per_worker = folder_copy_bytes(cfg)
    if cfg.data_loader == "memory" and not fits_in_memory(per_worker, cfg.num_workers, memory_bytes):
        images, side = folder_index(cfg.data_dir, cfg.val_fraction).total(), stored_size(input_side(cfg))
        raise ConfigError(f"--data-dir {cfg.data_dir}: {images} images stored at {side}x{side} pixels take "
                          f"{per_worker / 2**30:.1f} GiB in each of the {cfg.num_workers} workers, more than half of "
                          f"this machine's {memory_bytes / 2**30:.1f} GiB; use --data-loader stream (or auto), a "
                          f"smaller --input-size, or fewer workers per machine")
    cpus = float(os.cpu_count() or 1) if cluster_cpus is None else cluster_cpus
    if streams_folder(cfg, workers_here=cfg.num_workers, memory_bytes=memory_bytes) and cpus - cfg.num_workers * cfg.cpus_per_worker < DECODE_CPUS:
        raise ConfigError(f"--data-loader {cfg.data_loader}: the streamed path decodes images on CPUs the workers "
                          f"leave free, but {cfg.num_workers} workers x --cpus-per-worker {cfg.cpus_per_worker:g} take "
                          f"all {cpus:g} CPUs of this machine; use a smaller --cpus-per-worker or fewer workers")


def check_weights(cfg: TrainConfig, *, on_this_machine: bool = True) -> None:
    """The starting weights (--pretrained, --weights) exist and fit the model: else one ConfigError, before
    anything starts. On a cluster someone else started (`on_this_machine` False) the workers' nodes may
    hold files this machine lacks: what is here is checked, what is not is left to each node's workers."""
    from raydist.errors import WeightsError
    from raydist.models.transfer import build_model, pretrained_cache_file, pretrained_source, read_weights_file

    try:
        if cfg.weights:
            if not on_this_machine and not is_uri(cfg.weights) and not os.path.exists(os.path.expanduser(cfg.weights)):
                return
            source = read_weights_file(cfg.weights)
        elif cfg.pretrained:
            if not on_this_machine and not os.path.exists(pretrained_cache_file(cfg.model)):
                return
            # downloads into this machine's cache once, if it can
            source = pretrained_source(cfg.model, model_args=cfg.model_args)
        else:
            return
        build_model(cfg.model, num_classes=classes_predicted(cfg), grey_input=cfg.grey_input, source=source,
                    model_args=cfg.model_args)
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None


# A checkpoint's weights and optimizer state fit only the same network, classes and optimizer type. Every
# other setting (LR, decay, momentum, batch, workers, epochs, schedule) applies to the resumed run as given.
RESUME_FIXED = ("model", "dataset", "fake_num_classes", "optimizer", "classes", "grey_input",  # the shapes
                "val_fraction")  # another split would move trained-on images into validation


def check_resume_compatible(saved: dict, cfg: TrainConfig, resume: str) -> None:
    # A transfer run's optimizer holds a group per unit (head, stages), a run from scratch two in all.
    was_transfer = bool(saved.get("pretrained") or saved.get("weights"))
    if cfg.starts_pretrained() != was_transfer:
        raise ConfigError(f"--resume {resume}: the run started "
                          f"{'from pretrained weights' if was_transfer else 'from scratch'}; a checkpoint continues "
                          f"as it started (its weights come from the checkpoint): drop --pretrained/--weights "
                          f"or start a new run")
    for name in RESUME_FIXED:
        old = saved.get(name, getattr(TrainConfig, name))
        if getattr(cfg, name) != old:
            old = "unset" if old is None else old
            raise ConfigError(f"--resume {resume}: --{name.replace('_', '-')} {getattr(cfg, name)} differs from "
                              f"the run's {old}; a checkpoint continues with the same {name} (start a new run "
                              f"with --{name.replace('_', '-')} {getattr(cfg, name)} instead)")
    old_args = saved.get("model_args") or {}
    if cfg.model_args != old_args:
        def text(args):
            return " ".join(f"{k}={v}" for k, v in sorted(args.items())) or "none"
        raise ConfigError(f"--resume {resume}: --model-arg {text(cfg.model_args)} differs from the run's "
                          f"{text(old_args)}; a checkpoint continues with the same model arguments (start a new "
                          f"run for another shape)")


def check_data(dataset: str, data_dir: str, download: bool, hint: str = "") -> None:
    """A data set read from files must be there, whole (or be downloaded): else one ConfigError naming the
    missing or damaged file, before Ray starts. Every file is read, the training files included."""
    if DATASETS[dataset].needs_files and not download:
        try:
            check_files(dataset, data_dir)
        except (DatasetNotFound, DataFileCorrupt, FolderError) as exc:
            raise ConfigError(f"{exc}{hint}") from None


# ---- the run ------------------------------------------------------------------------------------------


def check_sync_batchnorm(cfg: TrainConfig, use_gpu: bool) -> None:
    """PyTorch's SyncBatchNorm runs on GPUs only: on CPU workers every worker would die after the cluster
    started. (One worker has nothing to synchronise; the loop leaves its BatchNorm as it is.)"""
    if cfg.sync_batchnorm and cfg.num_workers > 1 and not use_gpu:
        raise ConfigError(f"--sync-batchnorm needs GPU workers (PyTorch's SyncBatchNorm runs on CUDA only) but "
                          f"these {cfg.num_workers} workers train on CPUs; drop --sync-batchnorm or add --use-gpu")


