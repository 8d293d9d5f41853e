"""Ray Train's side of a run's worker: `train_loop_per_worker`, which every TorchTrainer worker runs. It
builds the loop's WorkerContext from Ray Train's context (rank, devices, reports with checkpoints, spot
notices, the run folder), resumes from Ray's latest checkpoint, and runs raydist.loop.run.run.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional

from raydist.config.fields import TrainConfig
from raydist.errors import CorruptCheckpoint, WorkerInputError, keep_traceback
from raydist.loop.context import WorkerContext, local_tensorboard_for
from raydist.loop.run import run
from raydist.ray_edge.metrics import RunMetrics
from raydist.ray_edge.stream import stream_splits
from raydist.runs.checkpoints import CHECKPOINT_FILE, CHECKPOINT_PREFIX, checkpoint_dir_name, load_checkpoint_file
from raydist.storage import write_atomically


def _quiet_ray_train_reports() -> None:
    """Ray 2.60 logs every report of every rank at INFO through a logger named after its file, which
    LoggingConfig(log_level) does not reach; rank 0's epoch line says the same in one line."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context  # RAY (internal; may move)

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def read_resume_checkpoint(path: str, *, node_id: str) -> Optional[dict]:
    """The checkpoint `--resume` names, read through Ray's storage layer (a local path or a URI such as
    s3://...) on this worker's node. A run folder that holds no checkpoint yet starts from scratch; a path
    this node cannot see is an error naming the node, never a silent fresh start."""
    import posixpath

    import pyarrow.fs
    from ray.train import Checkpoint  # RAY

    checkpoint = Checkpoint(path)  # RAY: picks the filesystem for the path
    fs = checkpoint.filesystem
    if fs.get_file_info(posixpath.join(checkpoint.path, CHECKPOINT_FILE)).type == pyarrow.fs.FileType.File:
        with checkpoint.as_directory() as folder:  # a remote one is downloaded once per node
            return load_checkpoint_file(os.path.join(folder, CHECKPOINT_FILE),
                                        name=posixpath.join(path, CHECKPOINT_FILE))
    if fs.get_file_info(posixpath.join(checkpoint.path, "config.yaml")).type == pyarrow.fs.FileType.File:
        return None  # a run folder continued in place before its first checkpoint
    raise WorkerInputError(f"--resume {path}: no {CHECKPOINT_FILE} there as seen from node {node_id}; give a "
                           f"path every node can read (shared storage such as s3://... or an NFS mount)")


def load_latest_good_checkpoint(checkpoint, *, announce: bool) -> dict:
    """The content of the run's latest checkpoint that can be read: Ray hands the latest one it recorded,
    which a crash while writing it can have left cut short; then the older checkpoint folders beside it
    are tried, newest first, and rank 0 (`announce`) says in one line which file was skipped."""
    import posixpath

    import pyarrow.fs
    from ray.train import Checkpoint  # RAY

    fs, latest = checkpoint.filesystem, checkpoint.path
    parent, name = posixpath.split(latest)
    older = sorted((posixpath.basename(info.path) for info in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                    if info.type == pyarrow.fs.FileType.Directory
                    and posixpath.basename(info.path).startswith(CHECKPOINT_PREFIX)
                    and posixpath.basename(info.path) < name), reverse=True)
    skipped = []
    for folder_name in [name] + older:
        path = posixpath.join(parent, folder_name)
        try:
            with Checkpoint(path, filesystem=fs).as_directory() as folder:  # RAY: a remote one is downloaded
                state = load_checkpoint_file(os.path.join(folder, CHECKPOINT_FILE),
                                             name=posixpath.join(path, CHECKPOINT_FILE))
        except (CorruptCheckpoint, FileNotFoundError) as exc:
            skipped.append(str(exc) if isinstance(exc, CorruptCheckpoint) else f"{path}: no {CHECKPOINT_FILE}")
            continue
        if skipped and announce:
            print(f"warning: {skipped[0]}; resuming from {path} instead", flush=True)
        return state
    raise CorruptCheckpoint(f"no readable checkpoint in {parent}: {skipped[0]}")


# The key of train_loop_config that carries the driver's console wishes beside the config's fields:
# {"epoch_lines": bool, "progress_every_s": float, "labels": {"run": ..., "study": ..., "trial": ...}}.
CONSOLE_KEY = "_console"


def _reporters(train_ctx, exported):
    """The loop's two ways to report to Ray Train: report(metrics, written folder or None), and
    report_deferred(metrics, write) for a checkpoint serialised in Ray's upload thread."""
    import ray.train  # RAY

    def report(metrics: dict, checkpoint_folder: Optional[str]) -> None:
        if exported and not metrics.get("partial_epoch"):
            exported.record(metrics)
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None  # RAY
        # ASYNC: the upload (to S3 it can take longer than an epoch) runs in Ray's background thread while
        # training goes on, and Ray deletes the local folder once it is stored; the report reaches the
        # controller (and Tune) when its checkpoint is safe, in order.
        name = checkpoint_dir_name(metrics["epoch"], metrics.get("position", 0)) if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name,  # RAY
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)  # RAY

    def report_deferred(metrics: dict, write: Callable[[str], None]) -> None:
        """A checkpoint written in Ray's upload thread: `write(folder)` serialises rank 0's host copy of the
        state there, then Ray's own copy into storage; the report reaches the controller once both are done,
        in order (ASYNC)."""
        if exported and not metrics.get("partial_epoch"):
            exported.record(metrics)
        folder = tempfile.mkdtemp(prefix="raydist-ckpt-")
        storage = train_ctx.get_storage()  # RAY

        def write_then_upload(checkpoint, name):
            write(folder)
            return storage.persist_current_checkpoint(checkpoint, name)  # RAY (internal): Ray's default upload

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),  # RAY
                         checkpoint_dir_name=checkpoint_dir_name(metrics["epoch"], metrics.get("position", 0)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,  # RAY
                         checkpoint_upload_fn=write_then_upload)  # RAY

    return report, report_deferred


def train_loop_per_worker(config: dict) -> list[dict]:
    """Entry point of every Ray Train worker (TorchTrainer has already set up the process group)."""
    import ray.train  # RAY
    import ray.train.torch  # RAY

    console = config.get(CONSOLE_KEY) or {}  # how the driver wants this run's console (not a training knob)
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != CONSOLE_KEY})
    _quiet_ray_train_reports()
    train_ctx = ray.train.get_context()  # RAY
    exported = None
    if train_ctx.get_world_rank() == 0:  # RAY

        exported = RunMetrics(console.get("labels") or {"run": cfg.name or ""})  # RAY: the dashboard's Metrics view
    node_id = ray.get_runtime_context().get_node_id()  # RAY
    checkpoint = ray.train.get_checkpoint()  # RAY: this run's latest, after a restart or --resume RUN_DIR
    resume_state = None
    if checkpoint is not None:
        resume_state = load_latest_good_checkpoint(checkpoint, announce=train_ctx.get_world_rank() == 0)  # RAY
    elif cfg.resume:  # --resume CHECKPOINT_DIR, or a run folder with no checkpoint yet
        resume_state = read_resume_checkpoint(cfg.resume, node_id=node_id)

    report, report_deferred = _reporters(train_ctx, exported)

    def preemption_info() -> Optional[dict]:
        info = ray.train.get_preemption_info()  # RAY (alpha): a barrier; SpotWatch is its only caller
        if info is None:
            return None
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()} if train_ctx.get_world_rank() == 0 \
            else {}  # RAY: rank 0 names the nodes
        return {"nodes": [(node, f"{addresses.get(node, '?')} ({node[:8]})") for node in info.preempted_node_ids],
                "ranks": info.preempted_ranks,
                "deadline_unix": info.deadline_ms / 1000 if info.deadline_ms else None}

    def write_file(name: str, data: bytes) -> None:
        import pyarrow.fs

        storage = train_ctx.get_storage()  # RAY: the run folder, local or remote (S3, NFS)
        path = f"{storage.experiment_fs_path}/{name}"
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            write_atomically(path, data)  # never a half-written model for a reader to find
        else:  # an object store publishes an object only once its upload completes
            with storage.storage_filesystem.open_output_stream(path) as out:
                out.write(data)

    log_dir, publish_logs = cfg.log_dir, None
    if log_dir is None and train_ctx.get_world_rank() == 0:  # RAY: remote storage (s3://...)
        storage = train_ctx.get_storage()  # RAY
        log_dir, publish_logs = local_tensorboard_for(storage.storage_filesystem,
                                                      f"{storage.experiment_fs_path}/tensorboard")
    ctx = WorkerContext(rank=train_ctx.get_world_rank(), world_size=train_ctx.get_world_size(),  # RAY
                        device=ray.train.torch.get_device(), report=report, write_file=write_file,  # RAY
                        resume_state=resume_state, log_dir=log_dir, publish_logs=publish_logs, node_id=node_id,
                        epoch_lines=console.get("epoch_lines", True),
                        progress_every_s=console.get("progress_every_s", 0.0),
                        preemption_info=preemption_info if cfg.is_elastic() else None,
                        devices=ray.train.torch.get_devices(),  # RAY: the worker's GPUs (ids need not be adjacent)
                        open_stream=stream_splits,  # an image folder streamed through Ray Data
                        report_deferred=report_deferred)  # rank 0's checkpoints written in Ray's upload thread
    try:
        return run(cfg, ctx)  # rank 0's history becomes Result.return_value
    except BaseException as exc:
        # Ray hands the driver the exception without its traceback (and cuts the text it shows): keep the
        # whole of it on the exception, for the run's error.log (raydist.ray_edge.failures.error_report).

        keep_traceback(exc, where=f"rank {ctx.rank} on node {node_id}")
        raise
