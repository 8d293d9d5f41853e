"""What the loop needs from whoever launched it (WorkerContext: rank, device, reporting with checkpoints,
the run folder, spot notices, streams), and the contexts of plain processes: a local one for tests and
benchmarks, and a one-worker trial's that keeps its own run folder as Ray Train does.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import CHECKPOINT_FILE, checkpoint_dir_name, checkpoints_to_keep
from raydist.storage import filesystem, write_atomically

# "module:function" (importable on every node): called with every micro-batch a rank trains on, as keyword
# arguments epoch, end (the step's end position in the epoch), world, rank and indices (the images). For
# audits of which images an epoch used across resizes and resumes (the tests and benchmarks/elastic_digits.py
# pass benchmarks/image_trace.py:record); reading the indices syncs with the device, so it is off unless set.
MICRO_BATCH_HOOK_ENV = "RAYDIST_MICRO_BATCH_HOOK"


def micro_batch_hook() -> Optional[Callable[..., None]]:
    """The function RAYDIST_MICRO_BATCH_HOOK names, imported once per worker, or None."""
    spec = os.environ.get(MICRO_BATCH_HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class WorkerContext:
    """What the loop needs from whoever launched it."""
    rank: int
    world_size: int
    device: torch.device
    # (metrics, checkpoint folder or None), called on every rank; returns the seconds it spent storing the
    # checkpoint before returning (None when that happens in the background, as Ray Train's upload does)
    report: Callable[[dict, Optional[str]], Optional[float]]
    write_file: Callable[[str, bytes], None]  # writes a file into the run folder (rank 0 calls it)
    resume_state: Optional[dict] = None  # a loaded checkpoint to continue from
    log_dir: Optional[str] = None  # TensorBoard folder for rank 0
    publish_logs: Optional[Callable[[], None]] = None  # copies log_dir into the run folder (remote storage)
    node_id: str = "local"  # the machine this rank runs on: the data is checked once per node
    epoch_lines: bool = True  # rank 0 prints a line per epoch (a study's driver prints its own instead)
    progress_every_s: float = 0.0  # rank 0's progress line inside a long epoch this often (0: never)
    # an elastic run's spot-notice check, a barrier every rank calls equally often: None, or
    # {"nodes": [(node id, address)], "ranks": [...], "deadline_unix": float or None}
    preemption_info: Optional[Callable[[], Optional[dict]]] = None
    # every GPU this worker holds, `device` first (Ray Train's get_devices); the stages of --model-parallel
    devices: Optional[list] = None
    # (cfg, device, log, rank) -> the image folder's (train, val) streams; the Ray edge's Ray Data pipeline
    # (raydist.ray_edge.stream). None: this context cannot stream (a plain process holds folders in memory).
    open_stream: Optional[Callable[..., tuple]] = None
    on_micro_batch: Optional[Callable[..., None]] = field(default_factory=micro_batch_hook)
    # (metrics, write) where write(folder) writes the checkpoint file: reports a checkpoint whose writing
    # and upload happen in the background (Ray Train's upload thread). None: report() with a written folder.
    report_deferred: Optional[Callable[[dict, Callable[[str], None]], None]] = None


@dataclass
class LocalContext(WorkerContext):
    """A single process, no Ray: checkpoints go to <run_dir>/checkpoint_epoch_NNNN/ (the names of a Ray run's
    folders), reports to `reported`."""
    run_dir: str = ""
    reported: list = field(default_factory=list)


def local_context(run_dir: str, device: str = "cpu", resume_state: Optional[dict] = None,
                  log_dir: Optional[str] = None) -> LocalContext:
    os.makedirs(run_dir, exist_ok=True)
    ctx: LocalContext

    def report(metrics: dict, checkpoint_folder: Optional[str]) -> None:
        ctx.reported.append(dict(metrics))
        if checkpoint_folder:
            name = checkpoint_dir_name(metrics["epoch"], metrics.get("position") or 0)
            shutil.copytree(checkpoint_folder, os.path.join(run_dir, name), dirs_exist_ok=True)
            shutil.rmtree(checkpoint_folder, ignore_errors=True)

    def write_file(name: str, data: bytes) -> None:

        write_atomically(os.path.join(run_dir, name), data)

    ctx = LocalContext(rank=0, world_size=1, device=torch.device(device), report=report, write_file=write_file,
                       resume_state=resume_state, log_dir=log_dir, run_dir=run_dir)
    return ctx


def local_tensorboard_for(fs, target: str) -> tuple[str, Callable[[], None]]:
    """TensorBoard for a run in remote storage (s3://...), which it cannot write to: a local folder for the
    events, and the function that copies them to `target` (<run>/tensorboard on `fs`) after every
    epoch (event files are small), so a URI run has its curves beside its checkpoints. `run` removes the
    local folder when the run ends."""
    import pyarrow.fs

    log_dir = tempfile.mkdtemp(prefix="raydist-tensorboard-")

    def publish_logs() -> None:
        fs.create_dir(target, recursive=True)  # a local filesystem (file://) needs it made
        pyarrow.fs.copy_files(log_dir, target, destination_filesystem=fs)

    return log_dir, publish_logs


def run_folder_context(cfg: TrainConfig, *, run_dir: str, device: torch.device, node_id: str,
                       report: Callable[[dict, Optional[str]], None], resume_state: Optional[dict] = None,
                       kept: Optional[list[tuple[dict, str]]] = None, epoch_lines: bool = True,
                       open_stream: Optional[Callable[..., tuple]] = None, pin_every: int = 0) -> WorkerContext:
    """One process that trains alone and keeps its run folder itself, as Ray Train does for a multi-worker
    run (a one-worker Tune trial: no worker group): each checkpoint goes to `run_dir`/checkpoint_epoch_NNNN/
    (a local path or a URI), the best `keep_checkpoints` by `keep_by` and the latest are kept, and
    `report(metrics, checkpoint_path or None)` passes every epoch on. `kept`: the (metrics, path) of the
    checkpoints already in the folder, when a trial resumes there. `epoch_lines`: print a line per epoch
    (a study's driver prints its own lines instead). `open_stream`: the image folder's streams, when this
    process can reach Ray Data (a Tune trial can: raydist.ray_edge.stream.stream_splits). `pin_every`: the
    checkpoints of the last two epochs that are multiples of it are kept too (PBT's offers)."""
    import posixpath

    checkpoints = list(kept or [])
    def prune() -> None:
        keep = checkpoints_to_keep(checkpoints, cfg.keep_by, cfg.keep_checkpoints, pin_every=pin_every)
        for _, path in checkpoints:
            if path not in keep:
                fs, inner = filesystem(path)
                fs.delete_dir(inner)
        checkpoints[:] = [c for c in checkpoints if c[1] in keep]

    def report_and_keep(metrics: dict, folder: Optional[str]) -> float:
        path, t0 = None, time.perf_counter()
        if folder:
            path = posixpath.join(run_dir, checkpoint_dir_name(metrics["epoch"]))
            with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as fh:
                write_atomically(posixpath.join(path, CHECKPOINT_FILE), fh.read())
            shutil.rmtree(folder, ignore_errors=True)
            checkpoints[:] = [c for c in checkpoints if c[1] != path] + [(metrics, path)]
            prune()
        stored_s = time.perf_counter() - t0  # training waits for this copy; not for Tune's handling below
        report(metrics, path)
        return stored_s

    def write_file(name: str, data: bytes) -> None:
        write_atomically(posixpath.join(run_dir, name), data)

    log_dir, publish_logs = cfg.log_dir, None
    if log_dir is None:  # remote storage
        fs, inner = filesystem(posixpath.join(run_dir, "tensorboard"))
        log_dir, publish_logs = local_tensorboard_for(fs, inner)
    return WorkerContext(rank=0, world_size=1, device=device, report=report_and_keep, write_file=write_file,
                         resume_state=resume_state, log_dir=log_dir, publish_logs=publish_logs, node_id=node_id,
                         epoch_lines=epoch_lines, open_stream=open_stream)


def host_copy(state):
    """`state` with every tensor copied to host memory (pinned when it comes from a GPU), for writing while
    training goes on and changes the originals in place. Containers are copied; other values are shared."""
    if isinstance(state, torch.Tensor):
        if state.device.type == "cpu":
            return state.detach().clone()
        copy = torch.empty(state.shape, dtype=state.dtype, pin_memory=True)
        return copy.copy_(state.detach(), non_blocking=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if type(state) in (list, tuple):
        return type(state)(host_copy(value) for value in state)
    return state


def report_with_checkpoint(ctx: WorkerContext, metrics: dict, state: Optional[dict]) -> float:
    """Report `metrics` with a checkpoint of `state` (rank 0; the other ranks pass None). The report owns
    the local folder and removes it once the checkpoint is stored (Ray Train: after its background upload;
    a one-worker trial: copied into storage before the report returns). Where the context writes in the
    background (ctx.report_deferred: Ray Train), rank 0 only copies the state to host memory and goes on;
    serialising (about 200 MB for resnet50 with momentum) and the upload happen in Ray's upload thread
    while the other ranks no longer wait for them at the report. Returns the seconds the checkpoint held
    training up: the copy; else serialising and writing it, plus a synchronous copy into storage (not the
    time the report may wait for Tune)."""
    if state is None:  # ranks other than 0 report metrics only
        ctx.report(metrics, None)
        return 0.0
    t0 = time.perf_counter()
    if ctx.report_deferred is not None:
        snapshot = host_copy(state)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)  # the pinned copies are complete before training changes the state
        seconds = time.perf_counter() - t0
        ctx.report_deferred(metrics, lambda folder: torch.save(snapshot, os.path.join(folder, CHECKPOINT_FILE)))
        return seconds
    folder = tempfile.mkdtemp(prefix="raydist-ckpt-")
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
    seconds = time.perf_counter() - t0
    stored_s = ctx.report(metrics, folder)
    return seconds + (stored_s if isinstance(stored_s, (int, float)) else 0.0)
