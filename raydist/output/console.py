"""What raydist prints while it works, and what it keeps off the console; no Ray here.

    lines = without_ray_noise(lines)              # drops Ray's known-harmless internal lines, nothing else
    progress = EpochProgress(epoch=3, epochs=15, steps=400, images_per_step=128, every_s=30)
    progress.step(done)                           # rank 0, each step: a line every `every_s` once 5 s passed
    trial_started_line(...), trial_epoch_line(...), trial_ended_line(...), study_status_line(...)

Ray's log forwarding hands the driver every line its workers and actors print (raydist.cluster installs
`without_ray_noise` there). Progress lines carry PROGRESS_MARK so that a driver on a terminal can redraw
them in place as a live bar (LiveBar) while a driver whose output goes to a file or `ray job logs` prints
each of them (the worker then writes one every ~30 s, not every second).
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from typing import Callable, Iterable, Optional

from raydist.output.report import ERROR, STOPPED, is_finite_number

# Lines Ray 2.60 prints on every run that say nothing about the user's run and read like failures. Each
# entry: a pattern of the line, and whether the indented line after it (a warning's source line) goes too.
# Anything not matched here is printed as Ray forwards it: real warnings and errors are never hidden.
RAY_NOISE = (
    # Ray Train's controller imports Ray Data, whose ExecutionOptions warns about its own deprecated field.
    (re.compile(r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated"), True),
    # Ray Train's PreemptionWatcher actor: a core_worker notice at error level about how Ray built it.
    (re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .* has constructor arguments in "
                r"the object store and max_restarts > 0"), False),
)

# The driver's own Ray logger lines that raydist says better itself: the token notice (raydist prints where
# the token is when it starts a cluster).
RAY_DRIVER_NOISE = re.compile(r"^Token authentication is enabled for this Ray cluster\.")

PROGRESS_MARK = "progress:"  # how the driver tells a progress line from any other worker line
# Held while the driver prints a line of its own and while Ray's forwarding thread prints a batch of the
# workers' lines: print() writes a line and its newline separately, so without it a study's event line
# could start after a forwarded line's text, on the same line (the likely cause of a CI failure, 2026-12-07).
PRINT_LOCK = threading.RLock()


# A process Ray stops (a finished trial's actor, a worker group's at teardown) gets SIGTERM, and Ray's handler
# raises SystemExit wherever the process is: inside a garbage-collector callback Python can only print it, as
# "Exception ignored in: ..." and a traceback through Ray's `sigterm_handler` to "SystemExit". Such a block
# says nothing about the run; it is dropped whole when one forwarded batch holds it whole.
_IGNORED_START = re.compile(r"^Exception ignored in: ")
_IGNORED_END = re.compile(r"^SystemExit\b")
_RAY_SIGTERM_FRAME = re.compile(r"ray/_private/worker\.py\", line \d+, in sigterm_handler$")


def without_ray_noise(lines: Iterable[str]) -> list[str]:
    """`lines` less Ray's known-harmless internal lines (RAY_NOISE, and the SystemExit that Ray's SIGTERM
    handler raises in a stopping process), in order."""
    return _without_line_noise(_without_sigterm_blocks(list(lines)))


def _without_sigterm_blocks(lines: list[str]) -> list[str]:
    kept: list[str] = []
    i = 0
    while i < len(lines):
        if _IGNORED_START.search(lines[i]):
            end = None
            for j in range(i + 1, min(len(lines), i + 30)):
                if _IGNORED_START.search(lines[j]):  # another block begins: this one was not Ray's
                    break
                if _IGNORED_END.search(lines[j]):
                    end = j
                    break
            if end is not None and any(_RAY_SIGTERM_FRAME.search(line) for line in lines[i:end]):
                i = end + 1
                continue
        kept.append(lines[i])
        i += 1
    return kept


def _without_line_noise(lines: Iterable[str]) -> list[str]:
    kept: list[str] = []
    drop_source_line = False
    for line in lines:
        if drop_source_line and line.startswith((" ", "\t")):
            drop_source_line = False
            continue
        drop_source_line = False
        for pattern, with_source_line in RAY_NOISE:
            if pattern.search(line):
                drop_source_line = with_source_line
                break
        else:
            kept.append(line)
    return kept


# ---- progress inside an epoch ------------------------------------------------------------------------


class EpochProgress:
    """Rank 0's sign of life during a long epoch: fraction done, images/s, the epoch's ETA.

    Nothing for the first `quiet_s` seconds (a short epoch prints nothing); then a line every `every_s`
    seconds (30 for a log, 1 for a driver on a terminal, which redraws it in place). `step` costs a clock
    read: no tensor is touched, so no device sync."""

    def __init__(self, *, epoch: int, epochs: int, steps: int, images_per_step: int, every_s: float,
                 quiet_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 out: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.epoch, self.epochs, self.steps, self.images_per_step = epoch, epochs, steps, images_per_step
        self.every_s, self.quiet_s, self.clock, self.out = every_s, quiet_s, clock, out
        self.t0 = clock()
        self.next_at = self.t0 + max(quiet_s, every_s)  # a log's first line after every_s, a bar's after quiet_s
        self.printed = 0

    def step(self, done: int) -> None:
        """`done` steps of `steps` are finished."""
        if self.every_s <= 0 or done <= 0 or done >= self.steps:
            return
        now = self.clock()
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        self.printed += 1
        self.out(progress_line(self.epoch, self.epochs, done, self.steps, now - self.t0, self.images_per_step))


def progress_line(epoch: int, epochs: int, done: int, steps: int, elapsed_s: float, images_per_step: int) -> str:
    fraction = done / max(steps, 1)
    rate = done * images_per_step / elapsed_s if elapsed_s > 0 else 0.0
    eta = elapsed_s * (steps - done) / done if done else math.nan
    return (f"{PROGRESS_MARK} epoch {epoch}/{epochs} {bar(fraction)} {fraction:4.0%}  step {done}/{steps}  "
            f"{rate:,.0f} img/s  ETA {duration(eta)}")


def bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def duration(seconds: float) -> str:
    """12s, 4m05s, 2h03m; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LiveBar:
    """The driver's side of progress lines on a terminal: each is drawn over the last, and any other line
    first clears it. (Lines go to `stream`; this class never prints on its own.)"""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.showing = False

    def show(self, line: str) -> None:
        text = line.split(PROGRESS_MARK, 1)[1].strip()
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.showing = True

    def clear(self) -> None:
        if self.showing:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.showing = False


# ---- a study's console: one line per trial event -----------------------------------------------------


def values_text(values: dict) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in values.items())


def trial_started_line(trial_id: str, values: dict, resources: str, *, restarted: bool = False) -> str:
    return f"trial {trial_id} {'restarted' if restarted else 'started'}: {values_text(values)}  ({resources})"


def trial_epoch_line(trial_id: str, result: dict, *, epochs: int, metric: str, best: Optional[float]) -> str:
    text = f"trial {trial_id} epoch {int(result['epoch']):>3}/{epochs}  {metric} {metric_text(metric, result.get(metric))}"
    if best is not None:
        text += f" (best {metric_text(metric, best)})"
    if metric != "val_acc" and "val_acc" in result:
        text += f"  val_acc {metric_text('val_acc', result['val_acc'])}"
    if is_finite_number(result.get("train_loss")):
        text += f"  train_loss {result['train_loss']:.4f}"
    if is_finite_number(result.get("epoch_time_s")):
        text += f"  {result['epoch_time_s']:.1f}s"
    return text


def report_every(epochs: int, lines_per_trial: int = 20) -> int:
    """Every epoch for trials of up to `lines_per_trial` epochs; else every Nth (and always the last)."""
    return max(1, math.ceil(epochs / lines_per_trial))


def trial_ended_line(trial_id: str, *, status: str, epochs_run: int, epochs: int, metric: str,
                     best: Optional[float], best_epoch: Optional[int], seconds: Optional[float],
                     rung: Optional[int] = None, reason: str = "") -> str:
    """status: raydist.output.report's words (finished, stopped early, target reached, diverged, error)."""
    best_text = (f"best {metric} {metric_text(metric, best)} at epoch {best_epoch}" if best is not None
                 else f"no finite {metric}")
    took = f", {duration(seconds)}" if seconds is not None else ""
    if status == STOPPED:
        where = f"at the epoch-{rung} rung" if rung else f"after epoch {epochs_run}"
        return f"trial {trial_id} stopped early by ASHA {where} ({epochs_run}/{epochs} epochs, {best_text}{took})"
    if status == ERROR:
        return f"trial {trial_id} failed: {reason} (after {epochs_run}/{epochs} epochs)"
    extra = f": {reason}" if reason else ""
    return f"trial {trial_id} {status}{extra} ({epochs_run}/{epochs} epochs, {best_text}{took})"


def study_status_line(*, elapsed_s: float, running: int, pending: int, done: int, total: int,
                      best: Optional[tuple[str, float, dict]], metric: str, remaining_s: Optional[float]) -> str:
    """The study's state in one line, printed at a fixed interval."""
    text = f"[{duration(elapsed_s)}] trials: {running} running, {pending} pending, {done}/{total} done"
    if best:
        trial_id, value, values = best
        text += f"  | best {trial_id} {metric} {metric_text(metric, value)} ({values_text(values)})"
    if remaining_s is not None:
        text += f"  | about {duration(remaining_s)} left"
    return text


def remaining_estimate(*, finished_durations: list[float], running: list[tuple[float, int, int]], not_started: int,
                       concurrency: int) -> Optional[float]:
    """Seconds left. A running trial (elapsed s, epochs done, epochs planned) needs its elapsed time per
    epoch for each epoch left (an upper bound under ASHA, which may stop it sooner), or the rest of the
    mean duration of the trials that ended while it has no epoch yet; the trials not started take that
    mean each, `concurrency` at a time. None until a trial has ended."""
    if not finished_durations:
        return None
    mean = sum(finished_durations) / len(finished_durations)
    running_left = [elapsed * (planned - done) / done if done else max(0.0, mean - elapsed)
                    for elapsed, done, planned in running]
    slots = max(1, concurrency)
    return (sum(running_left) + not_started * mean) / slots


def metric_text(metric: str, value) -> str:
    if not is_finite_number(value):
        return "-"
    return f"{value:.2%}" if "acc" in metric else f"{value:.4g}"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- a training run's first lines --------------------------------------------------------------------------

_LR_IS = {"per_256": "per 256 images", "per_worker": "per worker batch", "none": "as given"}
_NOT_SHOWN = ("name", "storage_path", "wandb_id")  # named in the first line and the last; W&B's own line


def run_start_lines(cfg) -> list[str]:
    """What a run is about to do, in a few lines: the data, model, workers and device; the global batch and
    the peak LR the loop reaches (not --lr's own value, which is per 256 images by default); the settings
    that differ from the defaults; where the whole config is (config.yaml in the run folder)."""
    from raydist.config.fields import TrainConfig
    from raydist.config.rates import lr_scale

    device = {True: "GPU", False: "CPU", None: "GPUs if the cluster has them, else CPUs"}[cfg.use_gpu]
    gpu_auto = "bf16 (fp16 on GPUs before compute capability 8.0)"
    precision = cfg.precision if cfg.precision != "auto" else (gpu_auto if cfg.use_gpu else "fp32"
                                                              if cfg.use_gpu is False else f"{gpu_auto} on GPU, fp32 on CPU")
    workers = cfg.workers_text()
    global_batch = cfg.global_batch_at(cfg.num_workers)
    peak = cfg.lr * lr_scale(cfg, global_batch)
    split = (f"{global_batch} images per optimizer step, whatever the worker count" if cfg.is_elastic()
             and cfg.elastic_batch == "global" else f"{cfg.num_workers} x {cfg.batch_size}"
             + (f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else ""))
    warmup = f", warmup {cfg.warmup_epochs:g} epoch(s)" if cfg.warmup_epochs else ""
    defaults = TrainConfig().to_dict()
    changed = [f"{k}={v}" for k, v in cfg.to_dict().items() if k not in _NOT_SHOWN and v != defaults.get(k)]
    return [f"run {cfg.name}: {cfg.dataset}, {cfg.model}, {workers} worker(s) on {device}, {precision}",
            f"  global batch {global_batch} ({split}); peak LR {peak:.4g} (--lr {cfg.lr:g} {_LR_IS[cfg.lr_scaling]})"
            f"{warmup}, {cfg.lr_schedule} schedule, {cfg.epochs} epochs",
            "  set: " + (", ".join(changed) if changed else "the defaults"),
            f"  the whole config: {cfg.storage_path}/{cfg.name}/config.yaml"]
