"""`python -m raydist.scaling`: how the global batch size changes synchronous data-parallel training.

    python -m raydist.scaling                                         # digits, 1-2 CPU workers, batches 32-128
    python -m raydist.scaling --workers 1 2 4 8 --batch-sizes 64 128 256 --target 0.93 \
        --dataset cifar10 --data-dir ~/data --model resnet18 --epochs 30 --use-gpu --address auto

The question of the Horovod batch-size study raydist replaces. For every worker count x per-worker batch
size of the grid, and for each LR rule, one raydist training run (`raydist.ray_edge.fit.fit`, one after the other
on one cluster) that stops when validation accuracy reaches --target:
- rule `linear`: the linear scaling rule with warmup: the grid's smallest run trains at the peak LR
  raydist.train gives it (--lr under --lr-scaling), every other run at that peak times its global batch
  over the smallest one's, each reached after --warmup-epochs;
- rule `none`: the smallest run's peak LR for every batch, and no warmup. It differs from `linear` in two
  things at once, the LR and the warmup, and a difference between the rules is theirs together.
Reported per run: steady training throughput (median images/s over epochs 2 and later), scaling efficiency
(images/s over workers x the images/s of the fewest workers with the same per-worker batch, per worker),
the epochs to the target, the epoch seconds to the target (the sum of the epochs' own times, training and
validation, up to the epoch that reached it; the run's start-up, checkpoint copies and final evaluation
are not in it) and the best validation accuracy. `--repeats N` runs every point N times, with seeds
--seed .. --seed + N - 1: results.csv has every run, the table and the plots the median and the range.
Every flag not listed under "scaling" is a `raydist.train` flag and sets the runs' common config.

Written to --out (default runs/scaling-<time>/): results.md (the table, with machine, command and date),
results.csv, throughput.png (images/s against workers, per batch size, with linear scaling dashed) and
accuracy.png (epochs to the target and best validation accuracy against the global batch, per rule), and
each run's own folder. Bad input exits 2 before any cluster starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Optional

from raydist.cli import OneLineErrorParser, parse_cli
from raydist.errors import ConfigError
from raydist.output.scaling_report import markdown, plot, write_csv
from raydist.study.scaling_grid import RULES, Point, build_grid, efficiencies

# ---- the grid ---------------------------------------------------------------------------------------------


def measure(point: Point, history: list[dict], target: float) -> None:
    """Fill in a point from its run's per-epoch metrics."""
    steady = [h["images_per_s"] for h in history[1:]] or [h["images_per_s"] for h in history]
    point.images_per_s = statistics.median(steady) if steady else None
    point.epochs_run = len(history)
    point.best_val_acc = max((h["val_acc"] for h in history), default=None)
    reached = next((i for i, h in enumerate(history) if h["val_acc"] >= target), None)
    point.epochs_to_target = point.epoch_seconds_to_target = None
    if reached is not None:
        point.epochs_to_target = int(history[reached]["epoch"])
        point.epoch_seconds_to_target = sum(h["epoch_time_s"] for h in history[:reached + 1])


# ---- the outputs ------------------------------------------------------------------------------------------


# ---- command line -----------------------------------------------------------------------------------------


# raydist.train settings every run of the grid sets itself: given as flags (or in a --config file) they
# would be overridden silently, so they are refused.
SET_BY_THE_GRID = {"num_workers": "--workers", "batch_size": "--batch-sizes", "target_accuracy": "--target",
                   "patience": "--target (a run stops at the first epoch that reaches it)",
                   "name": "--out (each run is named w<workers>-b<batch>-<rule>, -s<seed> with --repeats)",
                   "resume": None, "wandb_id": "--wandb alone (each run of the grid is a W&B run of its own)"}


DESCRIPTION = """\
How the global batch size changes data-parallel training: one raydist training run per worker count x
per-worker batch size x LR rule, each to --target; a table (results.md), results.csv, throughput.png and
accuracy.png in --out.

example:
  python -m raydist.scaling --workers 1 2 4 --batch-sizes 64 128 256 --target 0.9 --use-gpu --address auto"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="raydist.scaling", description=DESCRIPTION, add_help=False, allow_abbrev=False,
                epilog="Every other flag is a raydist.train flag and passes through to every run (python -m "
                       "raydist.train --help lists them), except "
                       + ", ".join("--" + k.replace("_", "-") for k in SET_BY_THE_GRID) + ", which the grid sets.")
    g = p.add_argument_group("scaling")
    g.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128],
                   help="per-worker batch sizes (default: 32 64 128)")
    g.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES),
                   help="LR rules: linear (the smallest run's peak LR scaled by the global batch, with warmup), "
                        "none (the smallest run's peak LR at every batch, and no warmup) (default: both)")
    g.add_argument("--target", type=float, default=0.9, help="validation accuracy each run stops at (default: 0.9)")
    g.add_argument("--repeats", type=int, default=1,
                   help="runs per point, seeds --seed .. --seed + N - 1; the table shows the median and the range "
                        "(default: 1)")
    g.add_argument("--out", help="folder for the results and runs (default: <--storage-path>/scaling-<time>)")
    g.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[Point]]:
    args, rest = build_parser().parse_known_args(argv)
    if args.help:  # its own flags; raydist.train's are listed by raydist.train --help (the epilog says so)
        build_parser().print_help()
        raise SystemExit(0)
    base, explicit, config_files = parse_cli(rest, prog="raydist.scaling")
    check_not_set_by_the_grid(explicit, config_files)
    if args.out and "storage_path" in explicit:
        raise ConfigError(f"--storage-path {explicit['storage_path']} with --out {args.out}: the runs go into "
                          f"--out; give one of them (--storage-path alone puts the study in "
                          f"<storage-path>/scaling-<time>)")
    from raydist.storage import is_uri

    out = args.out or os.path.join(base.storage_path, f"scaling-{time.strftime('%Y%m%d-%H%M%S')}")
    if is_uri(out):
        raise ConfigError(f"--out {out}: the study writes its table and plots with local files; give a local "
                          f"folder (or a mounted one) as --out, or a local --storage-path")
    out = os.path.abspath(os.path.expanduser(out))
    points = build_grid(base, workers=args.workers, batches=args.batch_sizes, rules=args.rules, target=args.target,
                        out=out, repeats=args.repeats)
    taken = [p.cfg.name for p in points if os.path.exists(os.path.join(out, p.cfg.name))]
    if taken:  # Ray Train would continue such a run from its checkpoints, and its figures would be the old run's
        raise ConfigError(f"--out {out} holds run folders of an earlier study ({', '.join(taken)}); give a new "
                          f"--out (each study measures fresh runs)")
    from raydist.run_config import check_storage, prepare

    check_storage(out, "--out")
    points = [dataclasses.replace(p, cfg=prepare(p.cfg, explicit={})) for p in points]
    if base.address is None:  # a local cluster is this machine: the grid's largest run must fit it
        check_largest_fits(points, cpus=os.cpu_count() or 1, gpus=None, where="this machine")
    return args, points


def check_not_set_by_the_grid(explicit: dict, config_files: list[str]) -> None:
    import yaml

    given = [(f"--{key.replace('_', '-')}", key) for key in explicit]
    for path in config_files:
        with open(os.path.expanduser(path)) as fh:
            given += [(f"{key} in {path}", key) for key in (yaml.safe_load(fh) or {})]
    for where, key in given:
        if key in SET_BY_THE_GRID:
            instead = SET_BY_THE_GRID[key]
            raise ConfigError(f"{where}: every run of the grid sets {key} itself"
                              + (f"; use {instead}" if instead else "; a scaling study starts every run afresh"))


def check_largest_fits(points: list[Point], *, cpus: float, gpus: Optional[float], where: str) -> None:
    """Every run fits the cluster, checked on the grid's largest before the first run starts (not hours
    later, when its turn comes). `gpus` None: this machine's count."""
    from raydist.ray_edge import planning

    largest = max(points, key=lambda p: p.workers)
    cfg = largest.cfg
    try:
        planning.check_resources(cluster_cpus=cpus, cluster_gpus=planning.local_gpu_count() if gpus is None else gpus,
                                use_gpu=cfg.use_gpu, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                                gpus_per_worker=cfg.gpus_per_worker, where=where)
    except ConfigError as exc:  # said in this command's flags: the grid sets --num-workers from --workers
        raise ConfigError(f"the grid's largest run ({cfg.name}): {str(exc).replace('--num-workers', '--workers')}") \
            from None


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, points = parse(argv)
    except ConfigError as exc:
        print(f"raydist.scaling: error: {exc}", file=sys.stderr)
        return 2
    from raydist.ray_edge.fit import fit

    if points[0].cfg.address is not None:  # a cluster someone else started: as large as it can grow
        from raydist.ray_edge import planning, session

        try:
            session.connect(points[0].cfg.address, quiet=not points[0].cfg.verbose, bare_run_lines=True)
            cap = planning.capacity()
            check_largest_fits(points, cpus=cap.max_cpus, gpus=cap.max_gpus, where=cap.where)
        except ConfigError as exc:
            print(f"raydist.scaling: error: {exc}", file=sys.stderr)
            return 2
    out = points[0].cfg.storage_path
    print(f"scaling study: {len(points)} runs ({', '.join(p.cfg.name for p in points)}) into {out}", flush=True)
    for i, point in enumerate(points, start=1):
        print(f"---- run {i}/{len(points)}: {point.workers} worker(s) x batch {point.batch} = global batch "
              f"{point.global_batch}, LR rule {point.rule}, seed {point.cfg.seed}", flush=True)
        try:
            summary = fit(point.cfg)
        except ConfigError as exc:  # resources checked against the cluster
            print(f"raydist.scaling: error: {exc}", file=sys.stderr)
            return 2
        measure(point, summary.history, args.target)
    efficiencies(points)
    header = (f"# Scaling study: {points[0].cfg.dataset}, {points[0].cfg.model}\n\n"
              f"{datetime.date.today().isoformat()}; `python -m raydist.scaling {' '.join(argv)}`; "
              f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    table = markdown(points, target=args.target, header=header)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(table)
    write_csv(points, os.path.join(out, "results.csv"))
    pictures = plot(points, out, target=args.target)
    print(table)
    print(f"results: {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.csv')}; plots: "
          f"{', '.join(pictures)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
