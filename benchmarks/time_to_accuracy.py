"""Time to accuracy on digits: the README's main command (`python -m raydist.train`) and recipe variants,
several seeds each, beside scikit-learn's SVC on the same split as the floor to beat.

    python benchmarks/time_to_accuracy.py [--seeds 0 1 2] [--target 0.99] [--variants default before ema]
                                          [--json docs/time_to_accuracy.json] [-- extra train flags]

Each run is the real command in its own process (a local Ray cluster started and stopped by it, 2 CPU
workers), as a user runs it; the runs go seed by seed with the variants interleaved, so a machine that slows
down during the hour slows every variant alike. Per run: the wall time of the whole process, the seconds from
the process's start to the epoch line that first reaches --target (none if no epoch does), the epochs' own
seconds (training and evaluation, from the run's history.jsonl: what a recipe changes, without Ray's
start-up), the final and best epochs' validation accuracy (359 images: one image is 0.28%) and the third
epoch's (where the default study's ASHA compares its trials first). Printed: a
markdown table per variant (median and range over the seeds) and the SVC line; --json keeps every run's
per-epoch curve.

Variants (--variants; flags added to the default command):
  default          no flags: the recipe the README states
  before           --augment crop_flip --input-size 32 --epochs 15 --precise-bn 0: the default before issue
                   33 (mirrored digits at 32 px, 15 epochs, BatchNorm's lagging running averages evaluated)
  no_precise_bn    --precise-bn 0: the default with BatchNorm's running averages evaluated as they are
  precise_bn_16    --precise-bn 16: statistics re-estimated from every full batch of a worker's share (11 of
                   64: 704 of its 719 images) instead of the default's 4 batches per worker
  ema              --ema 0.9
  clip_grad_norm   --clip-grad-norm 1.0 (the gradients' global norm clipped to 1 before each update)
  label_smoothing  --label-smoothing 0.1
  epochs_30        --epochs 30
  mixup            --mixup 0.2 (every image blended with a partner of its batch, shares from Beta(0.2, 0.2))
  cutmix           --cutmix 1.0 (a rectangle of a partner pasted, its share of the area from Beta(1, 1))
  mixup_cutmix     --mixup 0.2 --cutmix 1.0 --label-smoothing 0.1 (each image one of the two, timm's mix)
  randaugment      --augment randaugment (2 ops at magnitude 9 per image, after digits' crop)
  trivialaugment   --augment trivialaugment (1 op at a random magnitude per image, after digits' crop)
  random_erase     --random-erase 0.25 (a quarter of the images get a rectangle of noise)
  tta              --augment crop_flip --tta: trained mirrored (as before issue 33), evaluated plain and
                   mirror-averaged; the table's last column is the mirror-averaged final accuracy
  cifar10_gpu      CIFAR-10 on one GPU to 94% (give --target 0.94 and `-- --data-dir DIR`): the CIFAR ResNet-18,
                   crop+flip, batch 512, label smoothing 0.1, an EMA of the weights, 40 epochs at most, stopping
                   at 94%; left out in one line when CIFAR-10 is not in the data folder
"""

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "default": [],
    "before": ["--augment", "crop_flip", "--input-size", "32", "--epochs", "15", "--precise-bn", "0"],
    "no_precise_bn": ["--precise-bn", "0"],
    "precise_bn_16": ["--precise-bn", "16"],
    "clip_grad_norm": ["--clip-grad-norm", "1.0"],
    "ema": ["--ema", "0.9"],
    "label_smoothing": ["--label-smoothing", "0.1"],
    "epochs_30": ["--epochs", "30"],
    "mixup": ["--mixup", "0.2"],
    "cutmix": ["--cutmix", "1.0"],
    "mixup_cutmix": ["--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1"],
    "randaugment": ["--augment", "randaugment"],
    "trivialaugment": ["--augment", "trivialaugment"],
    "random_erase": ["--random-erase", "0.25"],
    "tta": ["--augment", "crop_flip", "--tta"],
    "cifar10_gpu": ["--dataset", "cifar10", "--model", "resnet18", "--augment", "crop_flip", "--batch-size", "512",
                    "--label-smoothing", "0.1", "--ema", "0.999", "--epochs", "40", "--target-accuracy", "0.94",
                    "--num-workers", "1", "--use-gpu"],
}


def cifar10_missing(extra: list[str]) -> str:
    """raydist's one line for a CIFAR-10 that is not in the --data-dir the runs get, else "" (checked here,
    before any run: on a cluster without GPUs the run's GPU check would speak first)."""
    from raydist.data.published import check_present, layout
    from raydist.errors import DatasetNotFound

    data_dir = "./data"
    for i, flag in enumerate(extra):
        if flag == "--data-dir" and i + 1 < len(extra):
            data_dir = extra[i + 1]
        elif flag.startswith("--data-dir="):
            data_dir = flag.split("=", 1)[1]
    try:
        check_present("train", layout("cifar10", os.path.expanduser(data_dir)), os.path.expanduser(data_dir))
    except DatasetNotFound as exc:
        return str(exc)
    return ""


EPOCH_LINE = re.compile(r"^epoch +(\d+)/\d+ .*val loss [\d.]+ acc +([\d.]+)%")
FINISHED = re.compile(r"^finished (\d+) epoch\(s\) in ([\d.]+)s: val acc ([\d.]+)%")


def one_run(flags: list[str], seed: int, target: float, extra: list[str]) -> dict:
    """`python -m raydist.train --seed S` with `flags`: its curve, time to `target`, final accuracy, wall."""
    storage = tempfile.mkdtemp(prefix="time-to-accuracy-")
    command = [sys.executable, "-u", "-m", "raydist.train", "--seed", str(seed), "--storage-path", storage,
               *flags, *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    curve, reached_s, finished = [], None, None
    for line in process.stdout:
        epoch = EPOCH_LINE.match(line)
        if epoch:
            accuracy = float(epoch.group(2)) / 100
            curve.append(accuracy)
            if reached_s is None and accuracy >= target - 1e-9:
                reached_s = time.perf_counter() - start
        if FINISHED.match(line):
            finished = line.strip()
    wall = time.perf_counter() - start
    if process.wait() != 0 or not curve:
        raise SystemExit(f"the run {' '.join(command)} failed (exit {process.returncode})")
    # the epochs' own seconds (training and evaluation), from the run's history.jsonl: the part of the wall
    # time a recipe changes, without Ray's start-up and the workers' imports
    (history,) = glob.glob(os.path.join(storage, "*", "history.jsonl"))
    with open(history) as fh:
        epochs = [json.loads(line) for line in fh if line.strip()]
    epoch_s = sum(m["epoch_time_s"] for m in epochs)
    shutil.rmtree(storage, ignore_errors=True)
    return {"seed": seed, "curve": curve, "final": curve[-1], "best": max(curve), "reached_s": reached_s,
            "wall_s": wall, "epoch_s": epoch_s, "finished": finished,
            "final_tta": epochs[-1].get("val_acc_tta")}  # --tta's mirror-averaged accuracy, else None


def svc_floor() -> dict:
    """scikit-learn's SVC (RBF kernel, its defaults) on the 8 x 8 digits, trained and scored on raydist's
    own digits split (the same training and validation images the runs have)."""
    import numpy as np
    import torch
    from sklearn.svm import SVC

    from raydist.data.registry import DATASETS
    from raydist.data.sources import digits_arrays
    from raydist.data.splits import DIGITS_SPLIT_SEED

    images, labels = digits_arrays()
    features = np.asarray(images, dtype=np.float64).reshape(len(labels), -1) / 16.0
    labels = np.asarray(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)).numpy()
    n_val = int(round(len(labels) * DATASETS["digits"].val_fraction))  # as raydist.data.sources splits
    val, train = order[:n_val], order[n_val:]
    start = time.perf_counter()
    model = SVC().fit(features[train], labels[train])
    accuracy = float((model.predict(features[val]) == labels[val]).mean())
    return {"accuracy": accuracy, "seconds": time.perf_counter() - start, "train": len(train), "val": len(val)}


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(results: dict, target: float) -> str:
    rows = [f"| variant | final val acc, median (range) | best epoch's | runs reaching {target:.1%} | "
            f"wall to {target:.1%}, median (range) | wall in all, median (range) | epochs' own seconds | "
            f"epoch 3's val acc | final mirror-averaged (--tta) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        reached = [r["reached_s"] for r in runs if r["reached_s"] is not None]
        mirrored = [100 * r["final_tta"] for r in runs if r["final_tta"] is not None]  # --tta runs only
        rows.append(f"| {name} | {_spread([100 * r['final'] for r in runs], '.2f')}% | "
                    f"{_spread([100 * r['best'] for r in runs], '.2f')}% | {len(reached)} of {len(runs)} | "
                    f"{_spread(reached, '.1f') + ' s' if reached else '-'} | "
                    f"{_spread([r['wall_s'] for r in runs], '.1f')} s | "
                    f"{_spread([r['epoch_s'] for r in runs], '.1f')} s | "
                    f"{_spread([100 * r['curve'][min(2, len(r['curve']) - 1)] for r in runs], '.1f')}% | "
                    f"{_spread(mirrored, '.2f') + '%' if mirrored else '-'} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.99, help="validation accuracy to reach (0-1)")
    parser.add_argument("--variants", nargs="+", default=["default", "before"], choices=list(VARIANTS))
    parser.add_argument("--json", help="write every run's curve and figures here")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]  # flags after -- go to every run
    floor = svc_floor()
    print(f"SVC (scikit-learn, RBF, defaults) on the same split ({floor['train']} training, {floor['val']} "
          f"validation images): {floor['accuracy']:.2%} in {floor['seconds']:.2f} s", flush=True)
    missing = cifar10_missing(extra) if "cifar10_gpu" in args.variants else ""
    if missing:  # CIFAR-10 not downloaded: the variant is left out, said in one line
        print(f"cifar10_gpu: left out: {missing}", flush=True)
    results = {name: [] for name in args.variants if not (missing and name == "cifar10_gpu")}
    for seed in args.seeds:
        for name in results:
            run = one_run(VARIANTS[name], seed, args.target, extra)
            results[name].append(run)
            reached = f"{run['reached_s']:.1f} s" if run["reached_s"] is not None else "never"
            print(f"{name} seed {seed}: final {run['final']:.2%}, best {run['best']:.2%}, {args.target:.1%} "
                  f"reached: {reached}, wall {run['wall_s']:.1f} s", flush=True)
    print(table(results, args.target))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "target": args.target, "extra_flags": extra,
                       "machine": f"{os.cpu_count()} CPUs", "svc": floor,
                       "variants": {name: VARIANTS[name] for name in results}, "runs": results}, fh, indent=1)


if __name__ == "__main__":
    main()
