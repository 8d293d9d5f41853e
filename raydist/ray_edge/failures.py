"""What a failed or restarted run says: its cause in one line, every traceback in the run folder, a line
when a lost worker is replaced, and file writes that a crash cannot leave half done.

    cause = root_cause(exc)                     # "OutOfMemory: out of memory on cpu training resnet8 ..."
    where = write_error_log(run_dir, exc)       # <run_dir>/error.log: every worker's traceback
    RestartNotice(max_failures=1)               # in a Train RunConfig(callbacks=...): one line per restart
    write_atomically("runs/x/config.yaml", b"...")

Ray Train's WorkerGroupError says "Training failed due to worker errors:" followed by each worker's
traceback, often 80-160 lines, and the cause sits somewhere inside them. A user reads the last line: it
must name the root cause (a WorkerInputError's own sentence, else the innermost exception of the first
worker that failed), and the tracebacks go to a file that the line names.
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import Optional

from ray.train import UserCallback  # RAY: the restart notice runs in the Train controller

from raydist.errors import TRACEBACK_ATTRIBUTE, WorkerInputError
from raydist.storage import write_atomically

ERROR_LOG = "error.log"  # in the run folder (a study's trial: in the trial folder)


# ---- the cause in one line --------------------------------------------------------------------------


def worker_errors(exc: BaseException) -> list[tuple[Optional[int], BaseException]]:
    """(rank, error) of every worker that failed, lowest rank first; (None, exc) for a driver-side error."""
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> error
    return sorted(failures.items()) if failures else [(None, exc)]


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps, outermost first: a RayTaskError's `cause` (the worker's own exception), a
    failed health check's dead actor, and explicit `raise ... from ...` links."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = (getattr(error, "cause", None) if isinstance(getattr(error, "cause", None), BaseException) else None) \
            or getattr(error, "health_check_failure", None) or error.__cause__
    return chain


def is_process_loss(error: BaseException) -> bool:
    """A process that died (a Train worker or a trial's own process: killed, out of host memory, its node
    gone) rather than one that raised."""
    try:
        from ray.exceptions import RayActorError  # RAY
    except ImportError:
        return False
    return any(isinstance(e, RayActorError) for e in _chain(error))


def lost_worker(error: BaseException) -> tuple[str, str]:
    """(node address, pid) of a worker process that died, from Ray's ActorDiedError text ("?" if unsaid)."""
    text = "\n".join(str(e) for e in _chain(error))
    ip = re.search(r"\bip: (\S+)", text)
    pid = re.search(r"\bpid: (\d+)", text)
    return (ip.group(1) if ip else "?"), (pid.group(1) if pid else "?")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def describe(rank: Optional[int], error: BaseException) -> str:
    """One line for one worker's failure."""
    chain = _chain(error)
    own = next((e for e in chain if isinstance(e, WorkerInputError)), None)
    if own is not None:  # raydist's own sentence, naming the bad input and the fix
        return _first_line(str(own))
    if is_process_loss(error):
        node, pid = lost_worker(error)
        who = f"the worker of rank {rank}" if rank is not None else "a worker"
        return f"{who} (pid {pid}) on node {node} died without raising an error (killed, or out of host memory)"
    inner = chain[-1]
    message = _first_line(str(inner))
    where = f" (rank {rank})" if rank is not None else ""
    return f"{type(inner).__name__}: {message}{where}" if message else f"{type(inner).__name__}{where}"


def root_cause(exc: BaseException) -> str:
    """The run's cause in one line. A WorkerInputError on any rank is the user's cause; else the first
    rank that raised (the other ranks then fail in their collectives, a consequence); else a lost worker."""

    errors = worker_errors(exc)
    for rank, error in errors:
        if any(isinstance(e, WorkerInputError) for e in _chain(error)):
            return describe(rank, error)
    raised = [(rank, error) for rank, error in errors if not is_process_loss(error)]
    return describe(*(raised or errors)[0]) if errors else _first_line(f"{type(exc).__name__}: {exc}")


# ---- the tracebacks in the run folder ---------------------------------------------------------------


def error_report(exc: BaseException) -> str:
    """Every worker's whole traceback as the worker kept it (else as the driver has it), then the driver's."""
    parts = [f"cause: {root_cause(exc)}\n"]
    for rank, error in worker_errors(exc):
        if rank is None:
            continue
        kept = next((getattr(e, TRACEBACK_ATTRIBUTE) for e in _chain(error) if hasattr(e, TRACEBACK_ATTRIBUTE)),
                    None)
        parts.append(f"\n==== rank {rank} ====\n" + (kept or "".join(traceback.format_exception(error))))
    parts.append("\n==== driver ====\n" + "".join(traceback.format_exception(exc)))
    return "".join(parts)


def write_error_log(folder: str, exc: BaseException) -> Optional[str]:
    """Write error_report(exc) to <folder>/error.log (a local path or URI); its path, or None if the folder
    cannot be written (the cause line is still printed)."""
    path = f"{folder.rstrip('/')}/{ERROR_LOG}"
    try:
        write_atomically(path, error_report(exc).encode())
    except Exception:  # noqa: BLE001 - a log that cannot be written must not hide the cause
        return None
    return path


# ---- files a crash cannot leave half written --------------------------------------------------------


# ---- a worker lost and replaced ---------------------------------------------------------------------


class RestartNotice(UserCallback):
    """Runs in the Train controller. On a worker failure that Ray Train will retry (`max_failures`), prints
    one line saying which worker was lost, where, and the epoch the run restarts from, e.g.
    "worker lost on node 10.0.0.5 (rank 1, pid 4242); restarting from epoch 4, restart 1 of 1"."""

    def __init__(self, *, max_failures: int, start_epoch: int = 0, elastic: bool = False):
        self.max_failures = max_failures
        self.checkpoint_epoch = start_epoch  # epochs done at the latest checkpoint
        self.checkpoint_position = 0  # ... and images into the next one (a spot notice's checkpoint)
        self.failures = 0
        # An elastic run's lost node may have been reclaimed with notice: Ray Train counts that against the
        # preemption budget, not max_failures, and keeps polling the group until the notice's deadline.
        self.elastic = elastic
        self.said: set = set()

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is not None and metrics:
            self.checkpoint_epoch = int(metrics[0]["epoch"])
            self.checkpoint_position = int(metrics[0].get("position") or 0)

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        rank, error = sorted(worker_exceptions.items())[0]
        losses = [(r, e) for r, e in sorted(worker_exceptions.items()) if is_process_loss(e)]
        if losses:
            rank, error = losses[0]
            node, pid = lost_worker(error)
            what = f"worker lost on node {node} (rank {rank}, pid {pid})"
        else:
            what = f"worker failed ({describe(rank, error)})"
        where = f"epoch {self.checkpoint_epoch + 1}" + (
            f", image {self.checkpoint_position}" if self.checkpoint_position else "")
        if self.elastic:
            if what in self.said:  # Ray polls a group in a preemption's drain many times
                return
            self.said.add(what)
            print(f"raydist: {what}; restarting on the workers that fit from {where} (a node reclaimed with "
                  f"notice counts against --max-preemptions, any other loss against --max-failures)",
                  file=sys.stderr, flush=True)
            return
        self.failures += 1
        if self.failures > self.max_failures:  # Ray raises: the driver prints the cause
            return
        print(f"raydist: {what}; restarting from {where}, restart {self.failures} of {self.max_failures}",
              file=sys.stderr, flush=True)


