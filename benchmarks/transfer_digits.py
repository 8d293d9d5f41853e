"""Transfer learning offline, through raydist's real loop: resnet18_imagenet pretrained on digits 0-4, then
fine-tuned on digits 5-9 with 20 labelled images per class, each fine-tuning mode against training from
scratch with the same budget; and what --input-size and --grey-input cost in training images/s on this CPU.

    python benchmarks/transfer_digits.py [--seeds 0 1 2] [--epochs 12] [--lrs 0.05 0.2 0.8 3.2]
                                         [--source FILE] [--plot docs/transfer_digits.png] [--no-costs]
    python benchmarks/transfer_digits.py --variants lp-ft --reuse docs/transfer_digits.json   # partial rerun

Everything runs in this process with `raydist.loop.run.run` (no Ray cluster), 1 worker x --threads threads,
on the CPU. Steps:
  source   resnet18_imagenet, --input-size 64, digits classes 0-4 (all 716 training images), batch 64,
           --source-lr, --source-epochs; its validation accuracy (all 0-4 validation images) is printed and
           its model_final.pt kept in --work-dir (or --source FILE skips this step).
  tuning   every variant (scratch included) once per LR of --lrs at --tune-seed (a seed not reported), on
           the target task; each variant keeps the LR with the best final val_acc (ties: lower val_loss).
  target   digits classes 5-9, --train-per-class 20 (100 training images, the same 100 whatever the
           seed), all 5-9 validation images, batch --batch-size, --epochs, cosine schedule with 1 warmup
           epoch, augment crop_flip, every variant at its LR, once per --seeds. Variants: scratch (no
           weights); from the source's weights: full, full with backbone_lr_mult 0.1, gradual
           (--unfreeze-every), lp-ft (--freeze-epochs; backbone at 0.1 x LR after the probe), linear.
  sizes    for each of --accuracy-sizes: a source pretrained at that input size as above, then scratch,
           full and linear on the target at that size, at the LRs chosen at --input-size.
  costs    training images/s of resnet18_imagenet at each of --sizes, with grey_input replicate and sum
           side by side (digits 0-4, 64 per class, batch 64, --cost-epochs epochs; the median over every
           epoch but the first, from scratch: the weights do not change the speed), and the ratio to size 32 replicate.
Printed: the source's accuracy, the LR check, a markdown table per variant (final val_acc mean +- std over
seeds, the mean of each run's best epoch, seconds per run), the accuracy-by-size and costs tables.
Written: --plot (val_acc per epoch, mean over seeds with a min-max band) and --json (every run's
per-epoch val_acc). Timings are wall-clock on whatever else the machine runs: prefer the ratios.

Partial rerun: --variants runs only the variants named (e.g. after a change to one fine-tuning mode) and
--reuse takes everything else from an earlier --json made with the same settings (the other variants' LR
check and target runs, the accuracy-by-size runs of the variants not named, the costs); the tables, the
plot and --json are then made from the merged results, and the JSON says which variants were measured
when ("measured": variant -> date, carried over from the reused file).
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import tempfile
import time

from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import FINAL_MODEL_FILE
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate

MODEL = "resnet18_imagenet"
SOURCE_CLASSES, TARGET_CLASSES = "0-4", "5-9"


def variants(args) -> dict[str, dict]:
    """Variant name -> the config fields it sets (besides the shared ones)."""
    src = dict(weights=args.source)
    return {
        "scratch": dict(),
        "full": dict(src, finetune="full"),
        "full, backbone LR x0.1": dict(src, finetune="full", backbone_lr_mult=0.1),
        f"gradual (unfreeze every {args.unfreeze_every})": dict(src, finetune="gradual",
                                                                unfreeze_every=args.unfreeze_every),
        f"lp-ft (probe {args.freeze_epochs} epochs)": dict(src, finetune="lp-ft", freeze_epochs=args.freeze_epochs),
        "linear": dict(src, finetune="linear"),
    }


def train(folder: str, **fields) -> tuple[list[dict], float]:
    """(per-epoch metrics, wall seconds) of one run in this process; its folder is removed unless kept."""
    cfg = validate(TrainConfig(dataset="digits", model=MODEL, num_workers=1, checkpoint_every=0, **fields))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        history = run(cfg, local_context(folder))
    return history, time.perf_counter() - start


def target_run(args, lr: float, seed: int, fields: dict, size: int = 0) -> dict:
    folder = tempfile.mkdtemp(prefix="transfer-digits-", dir=args.work_dir)
    try:
        history, seconds = train(folder, classes=TARGET_CLASSES, train_per_class=args.train_per_class,
                                 input_size=size or args.input_size, batch_size=args.batch_size, epochs=args.epochs,
                                 lr=lr, seed=seed, cpus_per_worker=args.threads, **fields)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    accs = [m["val_acc"] for m in history]
    return {"lr": lr, "seed": seed, "val_acc": accs, "val_loss": [m["val_loss"] for m in history],
            "trainable_params": [m["trainable_params"] for m in history], "seconds": seconds,
            "stop_reason": history[-1]["stop_reason"] if history else "no epochs"}


def pretrain_source(args, size: int) -> str:
    folder = os.path.join(args.work_dir, f"source_{size}")
    history, seconds = train(folder, classes=SOURCE_CLASSES, input_size=size, batch_size=64,
                             epochs=args.source_epochs, lr=args.source_lr, seed=0, cpus_per_worker=args.threads)
    for name in os.listdir(folder):  # keep model_final.pt only (the epoch checkpoint holds the optimizer too)
        if name.startswith("checkpoint_epoch_"):
            shutil.rmtree(os.path.join(folder, name))
    accs = " ".join(f"{m['val_acc']:.1%}" for m in history)
    print(f"source: {MODEL} on digits {SOURCE_CLASSES}, input {size}, lr {args.source_lr:g}, "
          f"{args.source_epochs} epochs in {seconds:.0f}s; val_acc per epoch: {accs}", flush=True)
    print(f"source: final val_acc {history[-1]['val_acc']:.2%} -> {os.path.join(folder, FINAL_MODEL_FILE)}",
          flush=True)
    return os.path.join(folder, FINAL_MODEL_FILE)


SAME_SETTINGS = ("seeds", "epochs", "batch_size", "train_per_class", "lrs", "tune_seed", "unfreeze_every",
                 "freeze_epochs", "input_size", "source_epochs", "source_lr", "threads")


def select_variants(parser, names: dict, wanted) -> list[str]:
    """The variant names --variants picks: each given as the full name, the name before its " (...)", or
    its first word (lp-ft, gradual)."""
    if not wanted:
        return list(names)
    picked = []
    for want in wanted:
        hits = [n for n in names if want in (n, n.split(" (")[0], n.split()[0])]
        if len(hits) != 1:
            parser.error(f"--variants {want!r} matches {hits or 'no variant'}; variants: {list(names)}")
        picked += [n for n in hits if n not in picked]
    return picked


def load_reuse(parser, args) -> dict:
    with open(args.reuse) as fh:
        saved = json.load(fh)
    differ = [f"{k}: {saved['args'].get(k)!r} there, {getattr(args, k)!r} here" for k in SAME_SETTINGS
              if saved["args"].get(k) != getattr(args, k)]
    if differ:
        parser.error(f"--reuse {args.reuse} was made with other settings ({'; '.join(differ)})")
    return saved


def score(result: dict) -> tuple:
    if result["stop_reason"] == "non_finite_loss":
        return (-1.0, 0.0)
    return (result["val_acc"][-1], -result["val_loss"][-1])


def fmt_pct(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2%} ± {std:.2%}"


def plot(results: dict, lrs: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        epochs = max(len(r["val_acc"]) for r in runs)
        curves = [r["val_acc"] + [r["val_acc"][-1]] * (epochs - len(r["val_acc"])) for r in runs]
        xs = list(range(1, epochs + 1))
        mean = [statistics.mean(c[i] for c in curves) for i in range(epochs)]
        low = [min(c[i] for c in curves) for i in range(epochs)]
        high = [max(c[i] for c in curves) for i in range(epochs)]
        style = dict(color="black", linestyle="--") if name == "scratch" else {}
        line, = ax.plot(xs, mean, label=f"{name} (lr {lrs[name]:g})", linewidth=2, **style)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (digits 5-9)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def input_size_costs(args) -> list[dict]:
    """images/s of the training epochs after the first, per (size, grey_input), run side by side."""
    rows = []
    for size in args.sizes:
        for grey in ("replicate", "sum"):
            folder = tempfile.mkdtemp(prefix="transfer-digits-cost-", dir=args.work_dir)
            try:
                history, seconds = train(folder, classes=SOURCE_CLASSES, train_per_class=64, input_size=size,
                                         grey_input=grey, batch_size=64, epochs=args.cost_epochs, lr=0.1,
                                         cpus_per_worker=args.threads)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            rates = [m["images_per_s"] for m in history[1:]] or [history[-1]["images_per_s"]]
            rows.append({"size": size, "grey_input": grey, "images_per_s": statistics.median(rates),
                         "per_epoch": [m["images_per_s"] for m in history], "seconds": seconds})
            epochs = ", ".join(f"{m['images_per_s']:.0f}" for m in history)
            print(f"cost: size {size} {grey}: {statistics.median(rates):,.1f} img/s (epochs: {epochs}; "
                  f"{seconds:.0f}s)", flush=True)
    return rows


def slim(raw: dict) -> dict:
    """The raw results, small enough to keep beside the plot: 4 decimals, NaN/inf as null, the trainable
    parameter counts of the first and last epoch only."""
    def walk(value, key=""):
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            if key == "trainable_params":
                value = value[:1] + value[-1:]
            return [walk(v) for v in value]
        if isinstance(value, float):
            return round(value, 4) if math.isfinite(value) else None
        return value

    return walk(raw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds reported per variant")
    parser.add_argument("--epochs", type=int, default=12, help="target-task epochs (every variant)")
    parser.add_argument("--batch-size", type=int, default=20, help="target-task batch (100 images: 5 steps)")
    parser.add_argument("--train-per-class", type=int, default=20, help="labelled target images per class")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.2, 0.8, 3.2],
                        help="LR per 256 images tried for every variant at --tune-seed; one value: no tuning")
    parser.add_argument("--tune-seed", type=int, default=100, help="seed of the LR check (not reported)")
    parser.add_argument("--unfreeze-every", type=int, default=2, help="gradual: epochs per unfrozen stage")
    parser.add_argument("--freeze-epochs", type=int, default=4, help="lp-ft: epochs of linear probing")
    parser.add_argument("--input-size", type=int, default=64, help="on-device resize (source and target)")
    parser.add_argument("--accuracy-sizes", type=int, nargs="*", default=[32],
                        help="also pretrain a source at each of these input sizes and run scratch, full and "
                             "linear (at the LRs chosen above) on the target at that size")
    parser.add_argument("--source", help="a source model_final.pt to reuse (default: pretrain one)")
    parser.add_argument("--source-epochs", type=int, default=8)
    parser.add_argument("--source-lr", type=float, default=0.1, help="source LR per 256 images (batch 64)")
    parser.add_argument("--threads", type=float, default=1.0, help="cpus_per_worker (torch threads); 1 because "
                        "2 threads on a 2-core machine that runs anything else slow down 3-15x")
    parser.add_argument("--work-dir", help="folder for the source model and runs (default: a new temp folder)")
    parser.add_argument("--plot", default="docs/transfer_digits.png")
    parser.add_argument("--json", default="docs/transfer_digits.json", help="raw per-epoch results ('' for none)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="run only these variants (scratch, full, 'full, backbone LR x0.1', gradual, lp-ft, "
                             "linear); with --reuse the others come from that file")
    parser.add_argument("--reuse", metavar="JSON", help="an earlier --json made with the same settings: the "
                        "variants not in --variants and the costs are taken from it and merged into --json")
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer experiment")
    parser.add_argument("--no-costs", action="store_true", help="skip the input-size cost measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    parser.add_argument("--cost-epochs", type=int, default=2, help="the first is not counted")
    args = parser.parse_args()
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="transfer-digits-")
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.perf_counter()
    raw: dict = {"args": {k: v for k, v in vars(args).items()}}
    today = time.strftime("%Y-%m-%d")
    raw["date"] = today
    saved = load_reuse(parser, args) if args.reuse else None

    if not args.no_transfer:
        names = variants(args)  # (the weights are filled in below, once the source exists)
        selected = select_variants(parser, names, args.variants)
        reused = [n for n in names if n not in selected]
        if reused and saved is None:
            names = {n: names[n] for n in selected}  # --variants alone: just those
            reused = []
        for name in reused:
            if name not in saved.get("target", {}):
                parser.error(f"--reuse {args.reuse} has no results for {name!r}: name it in --variants")
        if any("weights" in names[n] for n in selected):
            args.source = args.source or pretrain_source(args, args.input_size)
        names = {n: dict(f, weights=args.source) if "weights" in f else f for n, f in variants(args).items()
                 if n in names}
        measured = dict(saved.get("measured", {})) if saved else {}
        for name in reused:
            measured.setdefault(name, saved.get("date") or f"an earlier run ({args.reuse})")
        for name in selected:
            measured[name] = today
        raw["measured"] = {n: measured[n] for n in names}
        if saved is not None:
            raw["reused_from"] = {"file": args.reuse, "variants": reused, "args": saved["args"],
                                  "reused_from": saved.get("reused_from")}
        chosen: dict[str, float] = {}
        if len(args.lrs) > 1:
            print(f"\nLR check at seed {args.tune_seed}: final val_acc (epochs {args.epochs}, batch {args.batch_size})",
                  flush=True)
            raw["lr_check"] = {}
            for name, fields in names.items():
                if name in reused:
                    tried, chosen[name] = saved["lr_check"][name], saved["chosen_lr"][name]
                else:
                    tried = [target_run(args, lr, args.tune_seed, fields) for lr in args.lrs]
                    chosen[name] = max(tried, key=score)["lr"]
                raw["lr_check"][name] = tried
                cells = ", ".join(f"lr {r['lr']:g}: {r['val_acc'][-1]:.1%}" + (" (diverged)" if
                                  r["stop_reason"] == "non_finite_loss" else "") for r in tried)
                print(f"  {name}: {cells} -> lr {chosen[name]:g} "
                      f"({'reused' if name in reused else f'{time.perf_counter() - start:.0f}s'})", flush=True)
        else:
            chosen = {name: saved["chosen_lr"][name] if name in reused else args.lrs[0] for name in names}

        print(f"\ntarget runs: seeds {args.seeds}", flush=True)
        results: dict[str, list[dict]] = {}
        for name, fields in names.items():
            if name in reused:
                results[name] = saved["target"][name]
            else:
                results[name] = [target_run(args, chosen[name], seed, fields) for seed in args.seeds]
            finals = ", ".join(f"{r['val_acc'][-1]:.1%}" for r in results[name])
            print(f"  {name} (lr {chosen[name]:g}): final val_acc {finals} "
                  f"({'reused' if name in reused else f'{time.perf_counter() - start:.0f}s'})", flush=True)
        raw["target"] = results
        raw["chosen_lr"] = chosen

        peak = lambda lr: lr * args.batch_size / 256  # noqa: E731 - the loop's linear scaling rule
        print(f"\n{MODEL}, input {args.input_size}, digits {TARGET_CLASSES}, {args.train_per_class} training images "
              f"per class, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}\n")
        if len(args.lrs) > 1:
            print(f"| variant | {' | '.join(f'{lr:g}' for lr in args.lrs)} | chosen |")
            print("|---|" + "---|" * (len(args.lrs) + 1))
            for name, tried in raw["lr_check"].items():
                cells = " | ".join(f"{r['val_acc'][-1]:.1%}" for r in tried)
                print(f"| {name} | {cells} | {chosen[name]:g} |")
            print()
        print("| variant | LR per 256 (peak) | final val acc (mean ± std) | best-epoch val acc (mean) | "
              "trainable params (last epoch) | seconds per run |")
        print("|---|---|---|---|---|---|")
        for name, runs in results.items():
            diverged = sum(r["stop_reason"] == "non_finite_loss" for r in runs)
            note = f" ({diverged} diverged)" if diverged else ""
            print(f"| {name} | {chosen[name]:g} ({peak(chosen[name]):.4g}) | "
                  f"{fmt_pct([r['val_acc'][-1] for r in runs])}{note} | "
                  f"{statistics.mean(max(r['val_acc']) for r in runs):.2%} | "
                  f"{runs[0]['trainable_params'][-1]:,} | {statistics.mean(r['seconds'] for r in runs):.1f} |")
        if args.plot:
            os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
            plot(results, chosen, args.plot,
                 f"{MODEL} @ {args.input_size}px: digits 0-4 -> 5-9, {args.train_per_class} images/class; "
                 f"mean of seeds {args.seeds}, band min-max")
            print(f"\nplot: {args.plot}")

        if args.accuracy_sizes:
            raw["accuracy_sizes"] = {}
            rows = []
            for size in args.accuracy_sizes:
                source = None
                for name in ("scratch", "full", "linear"):
                    key = f"{size} {name}"
                    if name not in names:
                        continue
                    if name in reused and key in saved.get("accuracy_sizes", {}):
                        runs = saved["accuracy_sizes"][key]
                    else:
                        if names[name].get("weights"):
                            source = source or pretrain_source(args, size)
                        fields = dict(names[name], weights=source) if names[name].get("weights") else names[name]
                        runs = [target_run(args, chosen[name], seed, fields, size=size) for seed in args.seeds]
                    raw["accuracy_sizes"][key] = runs
                    rows.append((size, name, runs))
            print("\ntarget accuracy by input size (the sources pretrained at each size as above; LRs as above)\n")
            print("| input size | variant | final val acc (mean ± std) | seconds per run |")
            print("|---|---|---|---|")
            for size, name, runs in [(args.input_size, n, results[n]) for n in ("scratch", "full", "linear")
                                     if n in results] + rows:
                print(f"| {size} | {name} | {fmt_pct([r['val_acc'][-1] for r in runs])} | "
                      f"{statistics.mean(r['seconds'] for r in runs):.1f} |")

    reuse_costs = saved is not None and "costs" in saved and saved["args"].get("sizes") == args.sizes
    if not args.no_costs or reuse_costs:
        print(f"\ninput-size costs: {MODEL}, batch 64, 1 worker x {args.threads:g} threads"
              + (f" (reused from {args.reuse})" if reuse_costs else ""), flush=True)
        rows = saved["costs"] if reuse_costs else input_size_costs(args)
        raw["costs"] = rows
        base = next(r["images_per_s"] for r in rows if r["size"] == min(args.sizes) and r["grey_input"] == "replicate")
        by = {(r["size"], r["grey_input"]): r["images_per_s"] for r in rows}
        print(f"\n| input size | replicate img/s | sum img/s | replicate / size {min(args.sizes)} replicate | "
              f"sum / size {min(args.sizes)} replicate | sum / replicate |")
        print("|---|---|---|---|---|---|")
        for size in args.sizes:
            rep, summed = by[(size, "replicate")], by[(size, "sum")]
            print(f"| {size} | {rep:,.1f} | {summed:,.1f} | {rep / base:.3f} | {summed / base:.3f} | "
                  f"{summed / rep:.2f} |")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(slim(raw), fh, separators=(",", ":"))
        print(f"raw results: {args.json} ({os.path.getsize(args.json) / 1024:.0f} KiB)")
    print(f"\nwhole benchmark: {time.perf_counter() - start:.0f}s; work dir {args.work_dir}")


if __name__ == "__main__":
    main()
