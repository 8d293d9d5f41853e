"""The library behind `python -m raydist.train` and every Tune trial: prepare a run, check it, fit it.

    cfg = prepare(cfg, explicit)              # --resume applied, paths absolute, run named, data and weights checked
    summary = fit(cfg)                        # N DDP workers of a Ray Train TorchTrainer, on the connected cluster
    summary = fit_in_trial(cfg, ...)          # a one-worker Tune trial: the loop in the trial's own process

Everything that can be checked before a cluster starts is checked in `prepare` (bad input is a
ConfigError: one line, exit 2, nothing written). `fit` checks resources against the cluster (what it can
grow to), writes the run's config.yaml and runs raydist.engine's worker loop. The command modules
(raydist.train, raydist.tune) parse and print around these.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

from raydist.errors import ConfigError
from raydist.config.fields import TrainConfig, metric_mode, require_package
from raydist.cli import resolve
from raydist.data.registry import DATASETS
from raydist.data.sources import check_files
from raydist.errors import DataFileCorrupt, DatasetNotFound
from raydist.errors import FolderError
from raydist.runs.run_folder import check_epochs_left, read_resume_target, write_config
from raydist.runs.checkpoints import latest_checkpoint
from raydist.storage import is_uri
from raydist.storage import filesystem
from raydist.data.sizes import classes_predicted


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
        saved = {k: v for k, v in saved.items() if k not in ("address", "log_dir", "verbose")}
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
    name = cfg.name or f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
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
    from raydist.data.sources import folder_index
    from raydist.loop.worker_data import folder_copy_bytes, streams_folder
    from raydist.data.sizes import input_side
    from raydist.ray_edge.stream import DECODE_CPUS
    from raydist.data.folder import fits_in_memory, host_memory_bytes, stored_size

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
            source = pretrained_source(cfg.model)  # downloads into this machine's cache once, if it can
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


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    history: list[dict]
    final_model: str
    best_checkpoint: Optional[str]
    best_val_acc: Optional[float]
    seconds: float


def fit(cfg: TrainConfig, *, callbacks: Optional[list] = None, storage_checked: bool = False,
        console: Optional[dict] = None, draw_curves: bool = True) -> RunSummary:
    """Run `cfg` on the connected (or a new local) cluster as a TorchTrainer: `python -m raydist.train`, and
    every Tune trial with two or more workers (or all of them, when the study says so).

    `cfg.resume`, when set, is a checkpoint folder to start from or the run folder being continued (whose
    latest checkpoint Ray Train hands to the workers itself). `storage_checked`: the caller (a study) has
    checked already that every node sees `cfg.storage_path`. `console`: what rank 0 prints and the labels
    of its exported metrics (raydist.ray_edge.worker.CONSOLE_KEY; default: a single run's epoch lines and progress).
    The run folder gets curves.png from its whole history, however the run ends (unless `draw_curves` is
    False: a study draws its trials together).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydist.ray_edge import session
    from raydist.ray_edge import planning
    from raydist.ray_edge.worker import CONSOLE_KEY, train_loop_per_worker
    from raydist.runs.checkpoints import FINAL_MODEL_FILE

    t0 = time.perf_counter()
    if cfg.address is None:  # local cluster: check the machine before starting anything
        use_gpu = planning.check_resources(cluster_cpus=os.cpu_count() or 1, cluster_gpus=planning.local_gpu_count(),
                                          use_gpu=cfg.use_gpu, num_workers=cfg.fewest_workers(),
                                          cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
                                          where="this machine")
        check_sync_batchnorm(cfg, use_gpu)  # before a local cluster starts
    # The console is the run's: its lines without Ray's prefix, unless --verbose asks for Ray's own output.
    session.connect(cfg.address, quiet=not cfg.verbose, bare_run_lines=True)
    # Against what the cluster can grow to (an autoscaling one may have no worker node yet); says when the
    # run waits for new nodes, and refuses a local storage path that not every node sees.
    # An elastic run needs its minimum to start.
    use_gpu = planning.plan_run(use_gpu=cfg.use_gpu, num_workers=cfg.fewest_workers(),
                               cpus_per_worker=cfg.cpus_per_worker,
                               gpus_per_worker=cfg.gpus_per_worker,
                               storage_path=None if storage_checked else cfg.storage_path)
    check_sync_batchnorm(cfg, use_gpu)
    write_config(cfg)
    # Every epoch of the run, across restarts after a lost worker (Result.return_value holds only the last
    # attempt's), kept in <run>/history.jsonl by the controller; and a line each time a worker is replaced.
    from raydist.ray_edge.failures import RestartNotice
    from raydist.ray_edge.history import HistoryCallback
    from raydist.runs.history import read_history

    run_dir = f"{cfg.storage_path}/{cfg.name}"
    checkpointed = [r["epoch"] for r in read_history(run_dir) if r.get("checkpoint_path")]
    started_unix = time.time()
    callbacks = [*(callbacks or []), HistoryCallback(run_dir),
                 RestartNotice(max_failures=cfg.max_failures, start_epoch=max(checkpointed, default=0),
                               elastic=cfg.is_elastic())]

    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    if console is None:
        console = {"epoch_lines": True, "progress_every_s": session.progress_every_s(), "labels": {"run": cfg.name}}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.to_dict(), CONSOLE_KEY: console},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # An elastic run: Ray Train starts on what fits of the range, asks the autoscaler for the maximum and
        # restarts the group larger (from the latest checkpoint) when room appears, every resize_check_s.
        scaling_config=ray.train.ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.is_elastic() else cfg.num_workers,
            use_gpu=use_gpu, resources_per_worker=resources, elastic_resize_monitor_interval_s=cfg.resize_check_s),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=cfg.storage_path, callbacks=callbacks,
            # Ray Train logs every report of every rank at INFO; our rank 0 prints one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Nodes reclaimed with notice (spot) draw on their own budget; max_failures stays for real faults.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   max_preemption_failures=cfg.max_preemptions),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=cfg.keep_by,
                                                         checkpoint_score_order=metric_mode(cfg.keep_by))),
    )
    try:
        result = trainer.fit()
    finally:
        if draw_curves:
            write_run_curves(run_dir, cfg.name)
        if session.LIVE_BAR is not None:
            session.LIVE_BAR.clear()
    # This run's epochs: the ones reported since it started (a run resumed in place has older ones on record).
    history = [r for r in read_history(run_dir) if r.get("reported_unix", 0) >= started_unix] \
        or result.return_value or ([result.metrics] if result.metrics else [])
    sign = 1 if metric_mode(cfg.keep_by) == "max" else -1
    best = max((pair for pair in result.best_checkpoints or [] if not pair[1].get("partial_epoch")),
               key=lambda pair: sign * pair[1].get(cfg.keep_by, -sign * math.inf), default=None)
    return RunSummary(run_dir=result.path, history=history, final_model=f"{result.path}/{FINAL_MODEL_FILE}",
                      best_checkpoint=best[0].path if best else None,
                      best_val_acc=best[1]["val_acc"] if best else None, seconds=time.perf_counter() - t0)


def fit_in_trial(cfg: TrainConfig, *, trial_path: str, on_report: Callable[[dict], None],
                 started_unix: Optional[float] = None, console: Optional[dict] = None) -> RunSummary:
    """A one-worker Tune trial, trained in the trial's own process: no Train controller, worker group or
    process group to start, which is most of a small trial's start-up. The run folder is kept as a
    TorchTrainer run keeps it (config.yaml, checkpoint_epoch_NNNN/ ranked by keep_by, model_final.pt,
    tensorboard/), history.jsonl gets each epoch before Tune does, and a trial that Tune restarts (after a
    failure, or on a study's --resume) continues from the latest readable checkpoint in its run folder.
    `on_report(metrics)` hands each epoch to Tune (ray.tune.report, in raydist.tune). The trial's resources
    are the worker's: on a GPU trial Ray has made its one GPU the process's cuda:0. `started_unix`: when the
    trial started, for the history's timings (default: now). `console`: as for `fit` (its progress aside:
    a study's console has a line per trial epoch)."""
    import ray
    import torch

    from raydist.ray_edge.metrics import RunMetrics

    from raydist.runs.checkpoints import FINAL_MODEL_FILE
    from raydist.loop.run import run
    from raydist.loop.context import run_folder_context
    from raydist.runs.checkpoints import latest_readable_checkpoint
    from raydist.runs.history import HistoryWriter

    t0, started = time.perf_counter(), time.time()
    write_config(cfg)
    run_dir = f"{cfg.storage_path}/{cfg.name}"
    history = HistoryWriter(trial_path, started_unix)
    latest = latest_readable_checkpoint(run_dir)  # skips, with a line, a latest one cut short by a crash
    resume_state = latest[1] if latest else None
    if latest:
        print(f"resuming from {latest[0]}", flush=True)

    console = console or {}
    exported = RunMetrics(console.get("labels") or {"run": cfg.name})  # the dashboard's Metrics view

    def report(metrics: dict, checkpoint_path: Optional[str]) -> None:
        history.add(metrics, checkpoint_path)  # on record first, whatever Tune then decides
        exported.record(metrics)
        on_report({**metrics, "checkpoint_path": checkpoint_path})

    device = torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")  # RAY
    kept = None
    if latest:
        kept, recovered = _checkpoints_in_folder(history, run_dir, latest)
        if recovered:  # Tune never got this epoch either: it hears of it now, before the next one
            on_report({**recovered, "checkpoint_path": latest[0]})
    ctx = run_folder_context(cfg, run_dir=run_dir, device=device, report=report, resume_state=resume_state,
                             node_id=ray.get_runtime_context().get_node_id(),  # RAY
                             kept=kept, epoch_lines=console.get("epoch_lines", True))
    try:
        run(cfg, ctx)
    except BaseException as exc:
        from raydist.errors import keep_traceback

        keep_traceback(exc, where=f"the trial's process on node {ctx.node_id}")
        raise
    epochs = [r for r in history.records  # this attempt's
              if r.get("reported_unix", 0) >= started and not r.get("recovered")]
    sign = 1 if metric_mode(cfg.keep_by) == "max" else -1
    best = max(history.kept_checkpoints(), key=lambda c: sign * c[0].get(cfg.keep_by, -sign * math.inf),
               default=None)
    return RunSummary(run_dir=run_dir, history=epochs, final_model=f"{run_dir}/{FINAL_MODEL_FILE}",
                      best_checkpoint=best[1] if best else None, best_val_acc=best[0]["val_acc"] if best else None,
                      seconds=time.perf_counter() - t0)


CURVES_FILE = "curves.png"


def write_run_curves(run_dir: str, title: str) -> Optional[str]:
    """<run>/curves.png from the run's whole history.jsonl (a resumed run continues the same picture);
    written locally, then copied when the run folder is a URI. A picture that cannot be drawn is a line,
    never the run's failure."""
    import shutil
    import tempfile

    from raydist.output import report
    from raydist.runs.history import read_history

    try:
        history = read_history(run_dir)
        if is_uri(run_dir):
            import pyarrow.fs

            local = tempfile.mkdtemp(prefix="raydist-curves-")
            report.plot_run_curves(history, os.path.join(local, CURVES_FILE), title=title)
            fs, inner = filesystem(run_dir)
            pyarrow.fs.copy_files(os.path.join(local, CURVES_FILE), f"{inner}/{CURVES_FILE}",
                                  destination_filesystem=fs)
            shutil.rmtree(local, ignore_errors=True)
        else:
            if not os.path.isdir(run_dir):
                return None
            report.plot_run_curves(history, os.path.join(run_dir, CURVES_FILE), title=title)
        return f"{run_dir}/{CURVES_FILE}"
    except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more than its picture
        print(f"warning: could not draw {run_dir}/{CURVES_FILE}: {type(exc).__name__}: {exc}", flush=True)
        return None


def _checkpoints_in_folder(history, run_dir: str,
                           latest: tuple[str, dict]) -> tuple[list[tuple[dict, str]], Optional[dict]]:
    """(metrics, path) of every checkpoint in a resumed trial's run folder, for the ranking that decides
    which are kept, and the metrics of the resumed checkpoint when its epoch was never recorded (else None).
    A trial's process that died after writing a checkpoint but before its report left that checkpoint
    without a history record: its metrics come from the checkpoint, and when it is the one the trial
    resumes from, its epoch goes on record (the learning curve has no hole, and the folder is pruned like
    any other)."""
    from raydist.errors import CorruptCheckpoint
    from raydist.runs.checkpoints import checkpoint_folders, read_checkpoint

    kept, recovered = history.kept_checkpoints(), None
    recorded = {path for _, path in kept}
    for path in checkpoint_folders(run_dir):
        if path in recorded:
            continue
        try:
            state = latest[1] if path == latest[0] else read_checkpoint(path)
        except CorruptCheckpoint:
            continue  # cut short: never resumed from, left for the user to see
        if isinstance(state.get("metrics"), dict):
            kept.append((state["metrics"], path))
            if path == latest[0]:
                history.recover(state["metrics"], path)
                recovered = state["metrics"]
    return kept, recovered


def check_sync_batchnorm(cfg: TrainConfig, use_gpu: bool) -> None:
    """PyTorch's SyncBatchNorm runs on GPUs only: on CPU workers every worker would die after the cluster
    started. (One worker has nothing to synchronise; the loop leaves its BatchNorm as it is.)"""
    if cfg.sync_batchnorm and cfg.num_workers > 1 and not use_gpu:
        raise ConfigError(f"--sync-batchnorm needs GPU workers (PyTorch's SyncBatchNorm runs on CUDA only) but "
                          f"these {cfg.num_workers} workers train on CPUs; drop --sync-batchnorm or add --use-gpu")


def failure_cause(exc: BaseException) -> str:
    """One line for a failed run: a worker's own message when it names a user-side cause (data or a
    checkpoint missing on a node, out of memory), else the innermost exception of the worker that raised
    (raydist.ray_edge.failures.root_cause)."""
    from raydist.ray_edge.failures import root_cause

    return root_cause(exc)
