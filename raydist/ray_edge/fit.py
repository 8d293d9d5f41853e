"""Run a prepared config: `fit` on a Ray Train TorchTrainer (N DDP workers on the connected cluster) for
`python -m raydist.train` and multi-worker trials, `fit_in_trial` for a one-worker Tune trial in the
trial's own process; each returns a RunSummary. `failure_cause` says a failed run's cause in one line.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

from raydist.config.fields import TrainConfig
from raydist.config.values import metric_mode
from raydist.errors import CorruptCheckpoint, keep_traceback
from raydist.loop.context import run_folder_context
from raydist.loop.run import run
from raydist.output.run_curves import write_confusion_picture, write_run_curves
from raydist.ray_edge import planning, session
from raydist.ray_edge.metrics import RunMetrics
from raydist.ray_edge.stream import stream_splits
from raydist.ray_edge.worker import CONSOLE_KEY, train_loop_per_worker
from raydist.run_config import check_sync_batchnorm
from raydist.runs.checkpoints import (
    FINAL_MODEL_FILE,
    best_checkpoint,
    checkpoint_folders,
    latest_readable_checkpoint,
    read_checkpoint,
)
from raydist.runs.history import HistoryWriter, read_history
from raydist.runs.run_folder import write_config


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    history: list[dict]
    final_model: str
    best_checkpoint: Optional[str]
    best_val_acc: Optional[float]
    seconds: float
    confusion_picture: Optional[str] = None  # confusion.png beside per_class.csv, when the run wrote them


def fit(cfg: TrainConfig, *, callbacks: Optional[list] = None, storage_checked: bool = False,
        console: Optional[dict] = None, draw_curves: bool = True) -> RunSummary:
    """Run `cfg` on the connected (or a new local) cluster as a TorchTrainer: `python -m raydist.train`, and
    every Tune trial with two or more workers (or all of them, when the study says so).

    `cfg.resume`, when set, is a checkpoint folder to start from or the run folder being continued (whose
    latest checkpoint Ray Train hands to the workers itself). `storage_checked`: the caller (a study) has
    checked already that every node sees `cfg.storage_path`. `console`: what rank 0 prints and the labels
    of its exported metrics (raydist.ray_edge.worker.CONSOLE_KEY; default: a single run's epoch lines and progress).
    The run folder gets curves.png from its whole history, however the run ends, and confusion.png from the
    per_class.csv of its last epoch (unless `draw_curves` is False: a study draws its trials together).
    """

    from raydist.ray_edge.failures import RestartNotice
    from raydist.ray_edge.history import HistoryCallback

    t0 = time.perf_counter()
    use_gpu = _connect_and_plan(cfg, storage_checked=storage_checked)
    write_config(cfg)
    # Every epoch of the run, across restarts after a lost worker (Result.return_value holds only the last
    # attempt's), kept in <run>/history.jsonl by the controller; and a line each time a worker is replaced.
    run_dir = f"{cfg.storage_path}/{cfg.name}"
    checkpointed = [r["epoch"] for r in read_history(run_dir) if r.get("checkpoint_path")]
    started_unix = time.time()
    callbacks = [*(callbacks or []), HistoryCallback(run_dir),
                 RestartNotice(max_failures=cfg.max_failures, start_epoch=max(checkpointed, default=0),
                               elastic=cfg.is_elastic())]

    if console is None:
        console = {"epoch_lines": True, "progress_every_s": session.progress_every_s(), "labels": {"run": cfg.name}}
    trainer = _torch_trainer(cfg, use_gpu=use_gpu, callbacks=callbacks, console=console)
    picture = None
    try:
        result = trainer.fit()
    finally:
        if draw_curves:
            write_run_curves(run_dir, cfg.name)
            picture = write_confusion_picture(run_dir, f"{cfg.name}: the saved model on the validation images")
        if session.LIVE_BAR is not None:
            session.LIVE_BAR.clear()
    # This run's epochs: the ones reported since it started (a run resumed in place has older ones on record).
    history = [r for r in read_history(run_dir) if r.get("reported_unix", 0) >= started_unix] \
        or result.return_value or ([result.metrics] if result.metrics else [])
    # Ray's kept checkpoints as (metrics, path); a spot notice's inside an epoch is no epoch's result.
    kept = [(metrics, checkpoint.path) for checkpoint, metrics in result.best_checkpoints or []
            if not metrics.get("partial_epoch")]
    best = best_checkpoint(kept, cfg.keep_by)
    return RunSummary(run_dir=result.path, history=history, final_model=f"{result.path}/{FINAL_MODEL_FILE}",
                      best_checkpoint=best[1] if best else None,
                      best_val_acc=best[0]["val_acc"] if best else None, seconds=time.perf_counter() - t0,
                      confusion_picture=picture)


def _connect_and_plan(cfg: TrainConfig, *, storage_checked: bool) -> bool:
    """Check this machine (a local cluster), connect, and plan the run against what the cluster can grow to;
    whether the workers use GPUs."""

    if cfg.address is None:  # local cluster: check the machine before starting anything
        use_gpu = planning.check_resources(cluster_cpus=os.cpu_count() or 1,
                                           cluster_gpus=planning.local_gpu_count(), use_gpu=cfg.use_gpu,
                                           num_workers=cfg.fewest_workers(), cpus_per_worker=cfg.cpus_per_worker,
                                           gpus_per_worker=cfg.gpus_per_worker, where="this machine")
        check_sync_batchnorm(cfg, use_gpu)  # before a local cluster starts
    # The console is the run's: its lines without Ray's prefix, unless --verbose asks for Ray's own output.
    session.connect(cfg.address, quiet=not cfg.verbose, bare_run_lines=True)
    # Against what the cluster can grow to (an autoscaling one may have no worker node yet); says when the
    # run waits for new nodes, and refuses a local storage path that not every node sees.
    # An elastic run needs its minimum to start.
    use_gpu = planning.plan_run(use_gpu=cfg.use_gpu, num_workers=cfg.fewest_workers(),
                                cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
                                storage_path=None if storage_checked else cfg.storage_path,
                                # A study's trial waits as Tune placed it; the study bounds its own wait.
                                wait_for_workers_s=None if storage_checked else cfg.wait_for_workers_s)
    check_sync_batchnorm(cfg, use_gpu)
    return use_gpu


def worker_environment(cfg: TrainConfig, use_gpu: bool) -> dict:
    """What a run's workers need in their environment before Ray Train creates their process group. An
    elastic GPU run: NCCL's watchdog aborts the communicator of a collective that fails or times out and
    raises in the waiting ranks (TORCH_NCCL_ASYNC_ERROR_HANDLING=2) rather than killing their process (Ray
    sets 1), so that a rank left by a reclaimed peer waits for Ray Train's restart (raydist.loop.spot)
    instead of dying as a fault counted against --max-failures. The timeout that bounds the wait is set
    once the data is loaded (raydist.parallel.elastic.ELASTIC_COLLECTIVE_TIMEOUT_S)."""
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"} if use_gpu and cfg.is_elastic() else {}


def _torch_trainer(cfg: TrainConfig, *, use_gpu: bool, callbacks: list, console: dict):
    """The run's Ray Train TorchTrainer: its workers run raydist.ray_edge.worker.train_loop_per_worker."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    worker_env = worker_environment(cfg, use_gpu)
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
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            # Ray Train logs every report of every rank at INFO; our rank 0 prints one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Nodes reclaimed with notice (spot) draw on their own budget; max_failures stays for real faults.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   max_preemption_failures=cfg.max_preemptions),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=cfg.keep_by,
                                                         checkpoint_score_order=metric_mode(cfg.keep_by))),
    )
    return trainer


def fit_in_trial(cfg: TrainConfig, *, trial_path: str, on_report: Callable[[dict], None],
                 started_unix: Optional[float] = None, console: Optional[dict] = None,
                 pin_every: int = 0, history_extra: Optional[dict] = None) -> RunSummary:
    """A one-worker Tune trial, trained in the trial's own process: no Train controller, worker group or
    process group to start, which is most of a small trial's start-up. The run folder is kept as a
    TorchTrainer run keeps it (config.yaml, checkpoint_epoch_NNNN/ ranked by keep_by, model_final.pt,
    tensorboard/), history.jsonl gets each epoch before Tune does, and a trial that Tune restarts (after a
    failure, or on a study's --resume) continues from the latest readable checkpoint in its run folder.
    `on_report(metrics)` hands each epoch to Tune (ray.tune.report, in raydist.tune). The trial's resources
    are the worker's: on a GPU trial Ray has made its one GPU the process's cuda:0. `started_unix`: when the
    trial started, for the history's timings (default: now). `console`: as for `fit` (its progress aside:
    a study's console has a line per trial epoch). `pin_every`: keep the checkpoints of the last two epochs
    that are multiples of it whatever their metric (a PBT trial's offers, raydist.ray_edge.population).
    `history_extra`: added to each epoch's history record (a PBT trial's values, which change mid-run)."""
    import ray
    import torch

    t0, started = time.perf_counter(), time.time()
    write_config(cfg)
    run_dir = f"{cfg.storage_path}/{cfg.name}"
    history = HistoryWriter(trial_path, started_unix)
    latest = latest_readable_checkpoint(run_dir)  # skips, with a line, a latest one cut short by a crash
    resume_state = latest[1] if latest else None
    console = console or {}
    if latest and console.get("epoch_lines", True):  # a study's driver says when a trial starts again
        print(f"resuming from {latest[0]}", flush=True)

    exported = RunMetrics(console.get("labels") or {"run": cfg.name})  # the dashboard's Metrics view

    def report(metrics: dict, checkpoint_path: Optional[str]) -> None:
        # on record first, whatever Tune then decides
        history.add({**metrics, **(history_extra or {})}, checkpoint_path)
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
                             kept=kept, epoch_lines=console.get("epoch_lines", True), pin_every=pin_every,
                             open_stream=stream_splits)  # a trial streams an image folder as a worker does
    try:
        run(cfg, ctx)
    except BaseException as exc:

        keep_traceback(exc, where=f"the trial's process on node {ctx.node_id}")
        raise
    epochs = [r for r in history.records  # this attempt's
              if r.get("reported_unix", 0) >= started and not r.get("recovered")]
    best = best_checkpoint(history.kept_checkpoints(), cfg.keep_by)
    return RunSummary(run_dir=run_dir, history=epochs, final_model=f"{run_dir}/{FINAL_MODEL_FILE}",
                      best_checkpoint=best[1] if best else None, best_val_acc=best[0]["val_acc"] if best else None,
                      seconds=time.perf_counter() - t0)


def _checkpoints_in_folder(history, run_dir: str,
                           latest: tuple[str, dict]) -> tuple[list[tuple[dict, str]], Optional[dict]]:
    """(metrics, path) of every checkpoint in a resumed trial's run folder, for the ranking that decides
    which are kept, and the metrics of the resumed checkpoint when its epoch was never recorded (else None).
    A trial's process that died after writing a checkpoint but before its report left that checkpoint
    without a history record: its metrics come from the checkpoint, and when it is the one the trial
    resumes from, its epoch goes on record (the learning curve has no hole, and the folder is pruned like
    any other)."""

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


def failure_cause(exc: BaseException) -> str:
    """One line for a failed run: a worker's own message when it names a user-side cause (data or a
    checkpoint missing on a node, out of memory), else the innermost exception of the worker that raised
    (raydist.ray_edge.failures.root_cause)."""
    from raydist.ray_edge.failures import root_cause

    return root_cause(exc)
