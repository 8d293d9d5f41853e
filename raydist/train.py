"""`python -m raydist.train`: one training run as N DDP workers of a Ray Train TorchTrainer.

    python -m raydist.train                                   # resnet8 on digits, local cluster, 2 CPU workers
    python -m raydist.train --dataset cifar10 --data-dir ~/data --model wrn16_4 --num-workers 4 --use-gpu
    python -m raydist.train --address auto                    # join a running cluster (`ray start --head`)
    python -m raydist.train --resume runs/digits-resnet8-20261123-101500 --epochs 30

Flags come from raydist.config.TrainConfig (`--help` lists them all). Bad input exits with code 2 before
Ray starts; a failed run exits 1.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Optional

import yaml

from raydist import final_eval
from raydist.config import ConfigError, TrainConfig, metric_mode, parse_cli, resolve
from raydist.data import DATASETS, DataFileCorrupt, DatasetNotFound, check_files

CONFIG_FILE = "config.yaml"


# ---- before the cluster: resolve and check everything that can be checked ---------------------------


def _is_uri(path: str) -> bool:
    return "://" in path


def _local_abspath(path: Optional[str]) -> Optional[str]:
    return path if path is None or _is_uri(path) else os.path.abspath(os.path.expanduser(path))


def worker_path(path: Optional[str], *, joined_cluster: bool) -> Optional[str]:
    """A path the workers read (data folder, weights file), made absolute here: workers (and Tune trials)
    run in folders of their own. On a cluster someone else started, `~/...` stays for each node to expand
    as its own home; a URI stays as it is."""
    if joined_cluster and path and path.startswith("~"):
        return path
    return _local_abspath(path)


def read_resume_target(path: str) -> tuple[bool, dict]:
    """For --resume: (is it a run folder?, the config saved with it).

    A run folder is continued in place: Ray Train hands its latest checkpoint to the workers. A checkpoint
    folder starts a new run from exactly that checkpoint (continuing its old run in place would make Ray
    pick that run's latest checkpoint instead).
    """
    import io

    import pyarrow.fs

    from raydist.engine import CHECKPOINT_FILE, CorruptCheckpoint, load_checkpoint_file

    fs, root = pyarrow.fs.FileSystem.from_uri(path)  # an absolute local path or a URI

    def read(name: str) -> Optional[bytes]:
        if fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(f"{root}/{name}") as fh:
            return fh.read()

    checkpoint = read(CHECKPOINT_FILE)
    if checkpoint is not None:
        try:
            return False, load_checkpoint_file(io.BytesIO(checkpoint), name=f"{path}/{CHECKPOINT_FILE}")["config"]
        except CorruptCheckpoint as exc:  # cut short by a crash, or not a checkpoint: before any cluster starts
            raise ConfigError(f"--resume {path}: {exc}") from None
    config = read(CONFIG_FILE)
    if config is not None:
        return True, _saved_config(config, f"{path}/{CONFIG_FILE}")
    raise ConfigError(f"--resume {path}: neither a run folder (with {CONFIG_FILE}) nor a checkpoint folder "
                      f"(with {CHECKPOINT_FILE})")


def _saved_config(text: bytes, where: str) -> dict:
    """A run folder's config.yaml: a mapping of config keys, else one line naming the file."""
    try:
        saved = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--resume: {where} is not valid YAML; it is the config raydist saved with the run: "
                          f"restore it, or start a new run from a checkpoint folder in that run") from None
    if not isinstance(saved, dict) or not saved:
        raise ConfigError(f"--resume: {where} holds {'nothing' if not saved else type(saved).__name__}, not the "
                          f"run's config; restore it, or start a new run from a checkpoint folder in that run")
    return saved


def check_epochs_left(resume: str, is_run_dir: bool, epochs: int) -> None:
    """--epochs is the run's total, counted from its start: at or below the checkpoint's epoch there is
    nothing left to train (Ray would run no epoch and write a final model without metrics)."""
    if is_run_dir:
        latest = latest_checkpoint(resume)
        done = int(latest.rsplit("_", 1)[1]) if latest else 0
    else:
        done = _checkpoint_epoch(resume)
    if epochs <= done:
        raise ConfigError(f"--resume {resume}: the run has trained {done} epoch(s) and --epochs {epochs} is the "
                          f"total from its start, so nothing is left to do; give --epochs above {done} to train "
                          f"{'more' if epochs == done else 'on'}")


def _checkpoint_epoch(folder: str) -> int:
    import io

    import pyarrow.fs
    import torch

    from raydist.engine import CHECKPOINT_FILE

    if not _is_uri(folder):  # mapped, not read: only the small "epoch" entry is touched
        return int(torch.load(f"{folder}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=True, mmap=True)["epoch"])
    fs, root = pyarrow.fs.FileSystem.from_uri(folder)
    with fs.open_input_stream(f"{root}/{CHECKPOINT_FILE}") as fh:
        return int(torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)["epoch"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The run folder's highest-epoch `checkpoint_epoch_NNNN` folder whose checkpoint can be read, or None.
    A newer one that cannot (cut short by a crash while it was written) is skipped with a one-line warning
    naming it."""
    import io

    import pyarrow.fs

    from raydist.engine import CHECKPOINT_FILE, CorruptCheckpoint, load_checkpoint_file

    fs, root = pyarrow.fs.FileSystem.from_uri(run_dir)  # an absolute local path or a URI
    found = sorted(os.path.basename(info.path) for info in fs.get_file_info(pyarrow.fs.FileSelector(root))
                   if os.path.basename(info.path).startswith("checkpoint_epoch_")
                   and fs.get_file_info(f"{info.path}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File)
    for name in reversed(found):
        try:
            with fs.open_input_stream(f"{root}/{name}/{CHECKPOINT_FILE}") as fh:
                load_checkpoint_file(io.BytesIO(fh.read()), name=f"{run_dir}/{name}/{CHECKPOINT_FILE}")
        except CorruptCheckpoint as exc:
            print(f"warning: {exc}; skipping it", file=sys.stderr, flush=True)
            continue
        return f"{run_dir}/{name}"
    return None


def prepare(cfg: TrainConfig, explicit: dict, config_files: Optional[list[str]] = None) -> TrainConfig:
    """Apply --resume, make paths absolute, name the run, check the data."""
    if cfg.resume:
        resume = _local_abspath(cfg.resume).rstrip("/")  # s3://.../run/ names the run "run", not ""
        is_run_dir, saved = read_resume_target(resume)
        # The saved run's settings are the defaults now; --config and flags still override them.
        saved = {k: v for k, v in saved.items() if k not in ("address", "log_dir")}
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
    name = cfg.name or f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    # On a cluster someone else started, `~/data` means each node's own home: expanded on the node.
    joined = cfg.address is not None
    cfg = dataclasses.replace(cfg, name=name, storage_path=_local_abspath(cfg.storage_path),
                              data_dir=worker_path(cfg.data_dir, joined_cluster=joined),
                              weights=worker_path(cfg.weights, joined_cluster=joined), resume=_local_abspath(cfg.resume))
    check_storage(cfg.storage_path)
    if cfg.log_dir is None and not _is_uri(cfg.storage_path):
        cfg = dataclasses.replace(cfg, log_dir=os.path.join(cfg.storage_path, name, "tensorboard"))
    cfg = dataclasses.replace(cfg, log_dir=_local_abspath(cfg.log_dir))
    if cfg.address is None:
        # A local cluster is this machine: check now, before it starts. On a cluster the data lives on the
        # nodes that run the workers, so each node's first worker checks it there (engine.load_data_once_per_node).
        check_data(cfg.dataset, cfg.data_dir, cfg.download)
    if not cfg.resume:  # a resumed run takes its weights from the checkpoint
        check_weights(cfg, on_this_machine=cfg.address is None)
    return cfg


def check_storage(path: str, flag: str = "--storage-path") -> None:
    """A local storage folder this machine can create and write in: else one line now, not an error
    after the cluster has started. (A URI is checked by Ray's storage layer when the run starts.)"""
    import tempfile

    if _is_uri(path):
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


def check_weights(cfg: TrainConfig, *, on_this_machine: bool = True) -> None:
    """The starting weights (--pretrained, --weights) exist and fit the model: else one ConfigError, before
    anything starts. On a cluster someone else started (`on_this_machine` False) the workers' nodes may
    hold files this machine lacks: what is here is checked, what is not is left to each node's workers."""
    from raydist.models.transfer import (WeightsError, build_model, pretrained_cache_file, pretrained_source,
                                         read_weights_file)

    try:
        if cfg.weights:
            if not on_this_machine and not _is_uri(cfg.weights) and not os.path.exists(os.path.expanduser(cfg.weights)):
                return
            source = read_weights_file(cfg.weights)
        elif cfg.pretrained:
            if not on_this_machine and not os.path.exists(pretrained_cache_file(cfg.model)):
                return
            source = pretrained_source(cfg.model)  # downloads into this machine's cache once, if it can
        else:
            return
        build_model(cfg.model, num_classes=cfg.num_classes(), grey_input=cfg.grey_input, source=source)
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


def check_data(dataset: str, data_dir: str, download: bool, hint: str = "") -> None:
    """A data set read from files must be there, whole (or be downloaded): else one ConfigError naming the
    missing or damaged file, before Ray starts. Every file is read, the training files included."""
    if DATASETS[dataset].needs_files and not download:
        try:
            check_files(dataset, data_dir)
        except (DatasetNotFound, DataFileCorrupt) as exc:
            raise ConfigError(f"{exc}{hint}") from None


# ---- the run ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    history: list[dict]
    final_model: str
    best_checkpoint: Optional[str]
    best_val_acc: Optional[float]
    seconds: float


def fit(cfg: TrainConfig, *, callbacks: Optional[list] = None, storage_checked: bool = False) -> RunSummary:
    """Run `cfg` on the connected (or a new local) cluster; the one code path for the CLI and Tune trials.

    `cfg.resume`, when set, is a checkpoint folder to start from or the run folder being continued (whose
    latest checkpoint Ray Train hands to the workers itself). `storage_checked`: the caller (a study) has
    checked already that every node sees `cfg.storage_path`.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydist import cluster
    from raydist.engine import FINAL_MODEL_FILE, train_loop_per_worker

    t0 = time.perf_counter()
    if cfg.address is None:  # local cluster: check the machine before starting anything
        use_gpu = cluster.check_resources(cluster_cpus=os.cpu_count() or 1, cluster_gpus=cluster.local_gpu_count(),
                                          use_gpu=cfg.use_gpu, num_workers=cfg.num_workers,
                                          cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
                                          where="this machine")
        check_sync_batchnorm(cfg, use_gpu)  # before a local cluster starts
    cluster.connect(cfg.address)
    # Against what the cluster can grow to (an autoscaling one may have no worker node yet); says when the
    # run waits for new nodes, and refuses a local storage path that not every node sees.
    use_gpu = cluster.plan_run(use_gpu=cfg.use_gpu, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                               gpus_per_worker=cfg.gpus_per_worker,
                               storage_path=None if storage_checked else cfg.storage_path)
    check_sync_batchnorm(cfg, use_gpu)
    _write_config(cfg)
    # Every epoch of the run, across restarts after a lost worker (Result.return_value holds only the last
    # attempt's), kept in <run>/history.jsonl by the controller; and a line each time a worker is replaced.
    from raydist.failures import RestartNotice
    from raydist.study_history import HistoryCallback, read_history

    run_dir = f"{cfg.storage_path}/{cfg.name}"
    checkpointed = [r["epoch"] for r in read_history(run_dir) if r.get("checkpoint_path")]
    started_unix = time.time()
    callbacks = [*(callbacks or []), HistoryCallback(run_dir),
                 RestartNotice(max_failures=cfg.max_failures, start_epoch=max(checkpointed, default=0))]

    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=cfg.storage_path, callbacks=callbacks,
            # Ray Train logs every report of every rank at INFO; our rank 0 prints one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=cfg.keep_by,
                                                         checkpoint_score_order=metric_mode(cfg.keep_by))),
    )
    result = trainer.fit()
    # This run's epochs: the ones reported since it started (a run resumed in place has older ones on record).
    history = [r for r in read_history(run_dir) if r.get("reported_unix", 0) >= started_unix] \
        or result.return_value or ([result.metrics] if result.metrics else [])
    sign = 1 if metric_mode(cfg.keep_by) == "max" else -1
    best = max(result.best_checkpoints or [], key=lambda pair: sign * pair[1].get(cfg.keep_by, -sign * math.inf),
               default=None)
    return RunSummary(run_dir=result.path, history=history, final_model=f"{result.path}/{FINAL_MODEL_FILE}",
                      best_checkpoint=best[0].path if best else None,
                      best_val_acc=best[1]["val_acc"] if best else None, seconds=time.perf_counter() - t0)


def check_sync_batchnorm(cfg: TrainConfig, use_gpu: bool) -> None:
    """PyTorch's SyncBatchNorm runs on GPUs only: on CPU workers every worker would die after the cluster
    started. (One worker has nothing to synchronise; the loop leaves its BatchNorm as it is.)"""
    if cfg.sync_batchnorm and cfg.num_workers > 1 and not use_gpu:
        raise ConfigError(f"--sync-batchnorm needs GPU workers (PyTorch's SyncBatchNorm runs on CUDA only) but "
                          f"these {cfg.num_workers} workers train on CPUs; drop --sync-batchnorm or add --use-gpu")


def _write_config(cfg: TrainConfig) -> None:
    """Save the resolved config in the run folder (local path or URI) before training starts."""
    import pyarrow.fs

    from raydist.failures import write_atomically

    fs, root = pyarrow.fs.FileSystem.from_uri(cfg.storage_path)
    fs.create_dir(f"{root}/{cfg.name}", recursive=True)
    # Atomic: a run killed while writing it must not leave a folder that --resume cannot read.
    write_atomically(f"{cfg.storage_path}/{cfg.name}/{CONFIG_FILE}",
                     yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def print_summary(summary: RunSummary) -> None:
    last = summary.history[-1] if summary.history else {}
    lines = [f"finished {len(summary.history)} epoch(s) in {summary.seconds:.1f}s"]
    if last:
        lines[0] += f": val acc {last['val_acc']:.2%}, val loss {last['val_loss']:.4f} at epoch {last['epoch']}"
        if last.get("stop_reason"):
            lines[0] += f" (stopped early: {last['stop_reason']}{': ' + last['divergence'] if last.get('divergence') else ''})"
    if summary.best_val_acc is not None:
        lines.append(f"best checkpoint:  {summary.best_checkpoint}  (val acc {summary.best_val_acc:.2%})")
    lines += [f"final model:      {summary.final_model}", f"run folder:       {summary.run_dir}"]
    print("\n".join(lines), flush=True)


def _stop_log_forwarding() -> None:
    """Ray forwards the workers' output (their tracebacks too) asynchronously; disconnecting first keeps
    the one line that names the cause the last the user sees. The full tracebacks are above it and in
    the cluster's logs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def failure_cause(exc: BaseException) -> str:
    """One line for a failed run: a worker's own message when it names a user-side cause (data or a
    checkpoint missing on a node, out of memory), else the innermost exception of the worker that raised
    (raydist.failures.root_cause)."""
    from raydist.failures import root_cause

    return root_cause(exc)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg, explicit, config_files = parse_cli(argv)
        cfg = prepare(cfg, explicit, config_files)
    except ConfigError as exc:
        print(f"raydist.train: error: {exc}", file=sys.stderr)
        return 2
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()), flush=True)
    try:
        summary = fit(cfg)
    except ConfigError as exc:  # resource checks against a running cluster
        print(f"raydist.train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a failed run is reported in one line, with Ray's log above it
        from raydist.failures import write_error_log

        cause = failure_cause(exc)
        log = write_error_log(f"{cfg.storage_path}/{cfg.name}", exc)
        _stop_log_forwarding()
        if log:
            print(f"raydist.train: every worker's traceback: {log}", file=sys.stderr)
        print(f"raydist.train: training failed: {cause}", file=sys.stderr)
        return 1
    test_line = final_eval.summary_line(final_eval.measure_run(cfg, summary))  # the test split, once, at the end
    print_summary(summary)
    if test_line:
        print(test_line, flush=True)
    last = summary.history[-1] if summary.history else {}
    return 1 if last.get("stop_reason") == "diverged" else 0


if __name__ == "__main__":
    sys.exit(main())
