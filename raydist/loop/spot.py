"""Spot notices in an elastic run: checked at steps every rank agrees on, a checkpoint inside the epoch when
a node is reclaimed, and the lines a resize prints.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from raydist.config.fields import TrainConfig
from raydist.loop.context import WorkerContext, report_with_checkpoint
from raydist.loop.evaluate import EpochSums
from raydist.parallel.elastic import FIRST_CHECK_AFTER, Step, check_every


class SpotWatch:
    """An elastic run's spot notices. Every rank asks (ctx.preemption_info, a barrier in Ray Train) every
    K optimizer steps and at each epoch end. On a notice every rank writes a just-in-time checkpoint at that
    step boundary, reports it, and trains on; while the notice lasts each later check writes a newer one, so
    a reclaim repeats at most K steps. Ray Train then restarts the group without the reclaimed node, from
    the latest checkpoint, on its own budget (FailureConfig.max_preemption_failures).

    K (--preemption-check-every 0, the default) is chosen after timing FIRST_CHECK_AFTER steps and one check,
    so that the checks cost under 1% of the training time; every rank agrees on the slowest rank's figures."""

    def __init__(self, cfg: TrainConfig, ctx: WorkerContext, state):
        self.cfg, self.ctx, self.state = cfg, ctx, state
        self.every = cfg.preemption_check_every
        self.steps = 0  # since the last check (or since timing started)
        self.timing_from: Optional[float] = None
        self.notice: Optional[dict] = None
        self.checkpoints = 0  # just-in-time checkpoints written for the current notice
        self.check_s: list[float] = []  # how long each check took (for the record)

    def _check(self) -> Optional[dict]:
        if self.ctx.preemption_info is None:
            return None
        t0 = time.perf_counter()
        info = self.ctx.preemption_info()
        self.check_s.append(time.perf_counter() - t0)
        return info

    def after_step(self, step: Step, sums: EpochSums) -> None:
        if self.ctx.preemption_info is None:  # one process, no Ray: nothing reclaims it
            return
        if self.every == 0:  # automatic: time some steps and one check, then choose K
            if self.timing_from is None:
                self.timing_from, self.steps = time.perf_counter(), 0
                return
            self.steps += 1
            if self.steps < FIRST_CHECK_AFTER:
                return
            step_s = (time.perf_counter() - self.timing_from) / self.steps
            info = self._check()
            self.every = self._agree(self.check_s[-1], step_s)
            self.steps = 0
            self._on(info, sums)
            return
        self.steps += 1
        if self.steps >= self.every:
            self.steps = 0
            self._on(self._check(), sums)

    def at_epoch_end(self, sums: EpochSums) -> None:
        info = self._check()
        if info is None:
            self.notice, self.checkpoints = None, 0
        elif self.notice is None:
            self.notice = info  # the epoch's own checkpoint, written next, is the just-in-time one
            self._say(info, f"checkpoint at the end of epoch {self.state.epoch + 1}")

    def _agree(self, check_s: float, step_s: float) -> int:
        every = check_every(check_s, step_s)
        if self.state.world > 1:  # every rank must check at the same steps: the slowest rank's cadence
            figures = torch.tensor([check_s, step_s], dtype=torch.float64, device=self.state.device)
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
            check_s, step_s = figures.tolist()
            every = check_every(check_s, step_s)
        if self.state.rank == 0 and self.ctx.epoch_lines:
            print(f"spot notices: checked every {every} step(s) (a check takes {check_s * 1000:.1f} ms, a step "
                  f"{step_s * 1000:.1f} ms)", flush=True)
        return every

    def _on(self, info: Optional[dict], sums: EpochSums) -> None:
        if info is None:
            self.notice, self.checkpoints = None, 0
            return
        t0 = time.perf_counter()
        state, ctx = self.state, self.ctx
        totals = torch.stack([sums.loss, sums.correct, sums.count]).double()
        if state.world > 1:
            dist.all_reduce(totals)
        loss, correct, count, lr_sum, updates, norm_sum = state.with_carried(
            [*totals.tolist(), sums.lr_sum, sums.updates, float(sums.grad_norm)])
        nan = float("nan")
        metrics = {"epoch": state.epoch, "position": state.position, "images_seen": state.images_seen(),
                   "partial_epoch": True, "world_size": state.world, "global_batch": state.layout.global_batch,
                   "train_loss": loss / max(count, 1), "train_acc": correct / max(count, 1),
                   "val_loss": nan, "val_acc": nan, "lr": lr_sum / max(updates, 1), "stop_reason": "",
                   self.cfg.keep_by: nan}  # never ranked above an epoch's checkpoint; kept while the latest
        checkpoint = state.state_dict(metrics, epoch_sums=[loss, correct, count, lr_sum, updates, norm_sum]) \
            if state.rank == 0 else None
        report_with_checkpoint(ctx, metrics, checkpoint)
        self.checkpoints += 1
        if self.notice is None:
            self.notice = info
            self._say(info, f"checkpoint at epoch {state.epoch + 1}, step {state.steps_done()}/"
                            f"{state.updates_per_epoch} "
                            f"written in {time.perf_counter() - t0:.1f} s")

    def wait_for_restart(self, exc: BaseException) -> None:
        """After a notice, a collective that fails (the reclaimed node's workers went, and gloo or NCCL says
        so) is the reclaim, not a fault: raising it would make Ray Train count a failure against
        --max-failures. This rank waits instead, while Ray Train sees the reclaimed workers die and, at the
        notice's deadline, restarts the group from the latest checkpoint on its preemption budget."""
        if self.state.rank == 0 or self.state.rank in self.notice.get("ranks", []):
            print(f"rank {self.state.rank}: the group lost contact after the spot notice "
                  f"({str(exc).splitlines()[0][:120]}); waiting for Ray Train to restart it", flush=True)
        deadline = self.notice.get("deadline_unix") or time.time() + 120
        while time.time() < deadline + 300:  # Ray Train tears the group down at the deadline
            time.sleep(1.0)

    def _say(self, info: dict, what: str) -> None:
        if self.state.rank != 0 or not self.ctx.epoch_lines:
            return
        nodes = ", ".join(address for _, address in info["nodes"])
        left = (f", {max(0.0, info['deadline_unix'] - time.time()):.0f} s left"
                if info.get("deadline_unix") else "")
        print(f"node {nodes} reclaimed (spot notice{left}; ranks {', '.join(map(str, info['ranks']))}): {what}; "
              f"training on until Ray Train restarts without it", flush=True)


def resize_line(resumed: Optional[dict], state) -> str:
    """What an elastic run says when its group (re)starts: the workers it trains on, where in the run, and
    the batch layout, e.g. "2 worker(s) joined: continuing on 4 workers at epoch 5, step 0/23; ..."."""
    where = (f"at epoch {state.epoch + 1}, step {state.steps_done()}/"
             f"{state.updates_per_epoch}")
    before = (resumed or {}).get("world_size")
    if before is None or before == state.world:
        head = f"elastic: training on {state.world} worker(s) {where}" if resumed else \
            f"elastic: starting on {state.world} worker(s) (between {state.cfg.fewest_workers()} and {state.cfg.num_workers})"
    elif state.world > before:
        head = f"{state.world - before} worker(s) joined: continuing on {state.world} workers {where}"
    else:
        head = f"{before - state.world} worker(s) gone: continuing on {state.world} worker(s) {where}"
    return f"{head}; {state.layout.describe()}"
