"""ASHA's rungs when each trial's LR schedule spans its own epochs, against schedules that span ASHA's
budget (what raydist does under ASHA), on digits, in one process and without a Ray cluster.

    python benchmarks/asha_fairness.py [--lrs 0.1 0.4 1.6] [--short 4] [--budget 10]

Trials: every learning rate with a short and a long `epochs` (4 and 10), resnet8, 1 CPU thread, batch
64, seed 0, the validation accuracy of every epoch recorded. Two policies for the cosine schedule:
  own     each trial's schedule spans its own epochs (raydist before; a short trial has decayed at a rung)
  budget  every schedule spans the budget (`schedule_epochs` = ASHA's max_t, raydist under ASHA now)
The long trials are the same runs under both policies (their schedule spans 10 epochs either way). The
curves then go through Ray's real ASHAScheduler (max_t = budget, grace 2, reduction factor 2: rungs at
epochs 2, 4, 8, as in digits_quick) with the trials arriving one at a time, in every possible order,
each running until ASHA stops it or its epochs end. Printed: the curves at the rungs, then per policy how
often ASHA stops each long trial early and how often the study's best trial (best reported val_acc) is
the configuration that is best when every trial runs to its end.
"""

import argparse
import contextlib
import io
import itertools
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from raydist.config.fields import TrainConfig
from raydist.data.sources import load_split
from raydist.data.splits import steps_per_epoch
from raydist.loop.context import local_context
from raydist.loop.recipe import lr_factor
from raydist.loop.run import run
from raydist.preflight import validate

BATCH = 64  # images per step (1 worker)
GRACE, REDUCTION = 2, 2  # digits_quick's ASHA: rungs at epochs 2, 4, 8


def curve(*, lr: float, epochs: int, schedule_epochs: int) -> list[float]:
    """val_acc after each epoch of one trial, trained in this process."""
    cfg = TrainConfig(dataset="digits", model="resnet8", num_workers=1, cpus_per_worker=1, batch_size=BATCH,
                      lr=lr, epochs=epochs, schedule_epochs=schedule_epochs, checkpoint_every=0)
    validate(cfg)
    with tempfile.TemporaryDirectory(prefix="asha-fairness-") as folder, contextlib.redirect_stdout(io.StringIO()):
        history = run(cfg, local_context(folder))
    return [m["val_acc"] for m in history]


def schedule_factor(epoch: int, schedule_epochs: int, cfg: TrainConfig) -> float:
    """The LR factor of the last update of `epoch` (1-based) when the schedule spans `schedule_epochs`."""
    per_epoch = steps_per_epoch(len(load_split("digits", "train")), batch_size=BATCH, world_size=1)
    return lr_factor(epoch * per_epoch - 1, warmup=round(cfg.warmup_epochs * per_epoch),
                     total=schedule_epochs * per_epoch, schedule="cosine", step_every=1, gamma=1.0)


def asha(curves: dict, order: tuple, budget: int) -> dict:
    """Epochs each trial runs under Ray's ASHAScheduler, trials arriving one at a time in `order`."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=budget,
                              grace_period=GRACE, reduction_factor=REDUCTION, stop_last_trials=False)
    ran = {}
    for name in order:
        trial = SimpleNamespace(trial_id=name)
        scheduler.on_trial_add(None, trial)
        for epoch, acc in enumerate(curves[name], start=1):
            result = {"epoch": epoch, "val_acc": acc}
            if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                break
        scheduler.on_trial_complete(None, trial, result)
        ran[name] = epoch
    return ran


def asha_summary(curves: dict, budget: int, long_trials: list) -> dict:
    """Over every arrival order: how often each long trial is stopped early, how often the study's best
    trial is the truly best one (best val_acc when every trial runs to its end)."""
    truly_best = max(curves, key=lambda name: max(curves[name]))
    orders = list(itertools.permutations(curves))
    stopped = {name: 0 for name in long_trials}
    right = 0
    epochs_spent = []
    for order in orders:
        ran = asha(curves, order, budget)
        for name in long_trials:
            stopped[name] += ran[name] < len(curves[name])
        right += max(curves, key=lambda name: max(curves[name][:ran[name]])) == truly_best
        epochs_spent.append(sum(ran.values()))
    return {"orders": len(orders), "stopped": {k: v / len(orders) for k, v in stopped.items()},
            "right": right / len(orders), "truly_best": truly_best, "epochs": statistics.mean(epochs_spent)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.4, 1.6], help="peak LR per 256 images")
    parser.add_argument("--short", type=int, default=4, help="epochs of the short trials")
    parser.add_argument("--budget", type=int, default=10, help="epochs of the long trials = ASHA's max_t")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine sizes its pool to cpus_per_worker too; a shared 2-core machine
    start = time.perf_counter()

    own, budget = {}, {}  # trial name -> val_acc per epoch
    for lr in args.lrs:
        long_curve = curve(lr=lr, epochs=args.budget, schedule_epochs=args.budget)
        own[f"lr {lr:g}, {args.short} ep"] = curve(lr=lr, epochs=args.short, schedule_epochs=args.short)
        own[f"lr {lr:g}, {args.budget} ep"] = long_curve
        budget[f"lr {lr:g}, {args.short} ep"] = curve(lr=lr, epochs=args.short, schedule_epochs=args.budget)
        budget[f"lr {lr:g}, {args.budget} ep"] = long_curve
        same = budget[f"lr {lr:g}, {args.short} ep"] == long_curve[:args.short]
        print(f"lr {lr:g}: trained ({time.perf_counter() - start:.0f}s); budget-schedule short trial "
              f"{'identical to' if same else 'DIFFERS from'} the long trial's first {args.short} epochs", flush=True)
    seconds = time.perf_counter() - start

    rungs = [r for r in (GRACE * REDUCTION ** k for k in range(8)) if r <= args.short]
    cfg = TrainConfig()
    print("\nval_acc at ASHA's rungs and at the trial's end (LR factor at the rung in brackets)\n")
    print("| trial | policy | " + " | ".join(f"epoch {r}" for r in rungs) + " | end (epoch) | best |")
    print("|---|---|" + "---|" * len(rungs) + "---|---|")
    for policy, curves in (("own", own), ("budget", budget)):
        for name, accs in curves.items():
            epochs = len(accs)
            span = epochs if policy == "own" else args.budget
            cells = [f"{accs[r - 1]:.2%} ({schedule_factor(r, span, cfg):.2f})" for r in rungs]
            print(f"| {name} | {policy} | " + " | ".join(cells) + f" | {accs[-1]:.2%} ({epochs}) | {max(accs):.2%} |")

    long_trials = [name for name in own if name.endswith(f"{args.budget} ep")]
    print()
    for policy, curves in (("own", own), ("budget", budget)):
        pairs = [(f"lr {lr:g}, {args.short} ep", f"lr {lr:g}, {args.budget} ep") for lr in args.lrs]
        at = [f"epoch {r}: {sum(curves[long][r - 1] >= curves[short][r - 1] for short, long in pairs)} of "
              f"{len(pairs)}" for r in rungs]
        end = sum(curves[long][-1] > curves[short][-1] for short, long in pairs)
        print(f"{policy}: the long trial ranks at or above its short twin (same lr) at {', '.join(at)}; "
              f"it ends ahead in {end} of {len(pairs)}")
    print(f"\nRay's ASHAScheduler (max_t {args.budget}, grace {GRACE}, reduction factor {REDUCTION}), trials one at "
          f"a time in every arrival order\n")
    print("| policy | orders | long trials stopped early (share of orders) | study's best is the truly best | "
          "truly best | mean trial-epochs |")
    print("|---|---|---|---|---|---|")
    fixed = {name: own[name] for name in long_trials}  # raydist's advice: epochs fixed at the budget
    for policy, curves in (("own", own), ("budget", budget), ("budget, long trials only (epochs fixed)", fixed)):
        s = asha_summary(curves, args.budget, long_trials)
        stops = ", ".join(f"{name.split(',')[0]}: {share:.0%}" for name, share in s["stopped"].items())
        print(f"| {policy} | {s['orders']} | {stops} | {s['right']:.0%} | {s['truly_best']} | {s['epochs']:.1f} |")
    print(f"\ntraining: {seconds:.0f}s; whole benchmark: {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
