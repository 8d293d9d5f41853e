"""Search efficiency: random search and TPE (HyperOpt's, Optuna's), each with FIFO and with ASHA, over seeds:
the compute (trial-epochs) and wall time each spends before a trial reaches an accuracy every run reaches.

    python benchmarks/hpo_efficiency.py [--search-space digits_quick] [--seeds 0 1 2] [--lock FILE]
                                        [--json docs/hpo_efficiency.json]
    python benchmarks/hpo_efficiency.py --seeds 3 4 --merge docs/hpo_efficiency.json --json docs/hpo_efficiency.json

Every run is one `python -m raydist.tune` on the study file with its own seed: the study's `search.seed`
and every trial's training seed (`--set seed=S`) are both S. The sides (searcher x scheduler) change one
thing at a time: random+fifo, random+asha, hyperopt+fifo, hyperopt+asha, optuna+fifo, optuna+asha. Within a seed the sides run one
after the other, the order rotating with the seed; each run starts its own local cluster (start no other
Ray instance meanwhile; --lock FILE holds an flock on FILE for each run, not for the whole campaign).

Compute is counted in trial-epochs: every epoch any trial reported to Tune, in the order they were
reported (each report's exact time, `reported_unix` in the trial's history.jsonl; Tune's own `timestamp` is
whole seconds, and sorting by it shuffled the reports inside each second). The bar is the lowest of all
runs' best accuracies, so every run of every side reaches it; --bars adds fixed bars, which some runs may
miss. Wall time to a bar is from the command's start to the report that reached it, start-up included.
The seed-by-seed ratios to random+fifo are not paired comparisons: each side samples configurations of
its own under the same seed; the ratio of medians is the comparison to read.
--merge adds the runs of an earlier --json (same study and trials; other seeds) to the analysis.
Also reported: each trial's start-up (its start to the end of its first epoch, minus that epoch's own time).

    python benchmarks/hpo_efficiency.py --trial-paths [--repeats 3] [--json docs/trial_paths.json]

compares where one-worker trials train instead: the study as it is (its searcher, scheduler and seed) with
`--one-worker-trials in_process` against `trainer` (every trial a TorchTrainer, raydist's path before in-process
trials), --repeats pairs with the order alternating: the command's wall time, and per trial its start-up two
ways: from the trial function's start (results.csv `startup_s`) and from Tune's start of the trial's actor
(its first result's `time_this_iter_s`, which also counts the actor's start, less that epoch's time). --address
runs everything on a running cluster (each run otherwise starts its own).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from bench_env import describe, environment, load_average, ray_lock, spread, summary
from raydist.runs.history import read_history
from raydist.tune import find_study_file

SIDES = {"random+fifo": ["--search", "random", "--scheduler", "fifo"],
         "random+asha": ["--search", "random", "--scheduler", "asha"],
         "hyperopt+fifo": ["--search", "hyperopt", "--scheduler", "fifo"],
         "hyperopt+asha": ["--search", "hyperopt", "--scheduler", "asha"],
         "optuna+fifo": ["--search", "optuna", "--scheduler", "fifo"],
         "optuna+asha": ["--search", "optuna", "--scheduler", "asha"],
         # Population-based training against FIFO on the same first population (the same seeded random draw):
         # a paired comparison (--search-space digits_pbt --sides random+fifo random+pbt).
         "random+pbt": ["--search", "random", "--scheduler", "pbt"]}
BASELINE = "random+fifo"


def seeded_study(search_space: str, seed: int, folder: str) -> str:
    """A copy of the study file with search.seed = seed."""
    with open(find_study_file(search_space)) as fh:
        study = yaml.safe_load(fh)
    study.setdefault("search", {})["seed"] = seed
    path = os.path.join(folder, f"study-seed{seed}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(study, fh)
    return path


def run_study(name: str, flags: list[str], study_file: str, seed: int, args, folder: str) -> dict:
    load_before = load_average()
    start = time.time()
    command = [sys.executable, "-m", "raydist.tune", "--search-space", study_file, *flags, "--set", f"seed={seed}",
               "--storage-path", folder, "--name", name]
    if args.address:
        command += ["--address", args.address]
    if args.num_samples:
        command += ["--num-samples", str(args.num_samples)]
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - start
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows, reports, tune_startups = read_reports(os.path.join(folder, name))
    startups = [float(r["startup_s"]) for r in rows if r["startup_s"]]
    return {"start_unix": start, "seconds": seconds, "reports": reports, "load_before": load_before,
            "load_after": load_average(), "best": max(r[4] for r in reports), "trial_epochs": len(reports),
            "stopped_early": sum(r["status"] == "stopped early" for r in rows), "trials": len(rows),
            "startup_median_s": statistics.median(startups) if startups else None, "startups_s": startups,
            "tune_startup_median_s": statistics.median(tune_startups) if tune_startups else None,
            "tune_startups_s": tune_startups,
            "configs": [{k: row.get(k) for k in ("trial_id", "status", "lr", "batch_size", "epochs_run")}
                        for row in rows]}


def read_reports(experiment: str) -> tuple[list[dict], list[list], list[float]]:
    """A finished study's results.csv rows; every report Tune received, as [when reported (unix), the
    trial's own clock, trial, epoch, val_acc], in the order they were made; and each trial's start-up as
    Tune saw it (from its actor's start to its first result, less that epoch's own time)."""
    reports, tune_startups = [], []
    with open(os.path.join(experiment, "results.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        trial_dir = os.path.join(experiment, f"trial_{row['trial_id']}")
        reported = {h["epoch"]: h["reported_unix"] for h in read_history(trial_dir) if "reported_unix" in h}
        with open(os.path.join(trial_dir, "result.json")) as fh:
            for i, line in enumerate(fh):  # the epochs Tune received (a stopped trial's in-flight one is not)
                r = json.loads(line)
                reports.append([reported.get(r["epoch"], r["timestamp"]), r["time_total_s"], row["trial_id"],
                                r["epoch"], r["val_acc"]])
                if i == 0:
                    tune_startups.append(r["time_this_iter_s"] - r["epoch_time_s"])
    reports.sort()
    return rows, reports, tune_startups


def to_bar(run: dict, bar: float):
    """(trial-epochs, wall seconds) up to the first report at or above the bar; (None, None) if none."""
    for spent, report in enumerate(run["reports"], start=1):
        if report[4] >= bar:
            return spent, report[0] - run["start_unix"]
    return None, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-space", default="digits_quick")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds to run (none, with --merge: analyse only)")
    parser.add_argument("--num-samples", type=int, help="trials per run (default: the study's)")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=[s for s in SIDES if s != "random+pbt"],
                        help=f"searcher+scheduler sides to run (default: all six; {BASELINE}, the baseline of "
                             f"every ratio, always runs)")
    parser.add_argument("--bars", type=float, nargs="*", default=[0.95], help="fixed val_acc bars besides the common one")
    parser.add_argument("--lock", metavar="FILE", help="flock FILE for each run")
    parser.add_argument("--keep", metavar="DIR", help="keep the experiment folders in DIR (default: a temp folder)")
    parser.add_argument("--json", default="", help="write the raw reports here (e.g. docs/hpo_efficiency.json)")
    parser.add_argument("--merge", metavar="JSON", help="an earlier --json whose runs (other seeds) join the analysis")
    parser.add_argument("--trial-paths", action="store_true",
                        help="compare in-process one-worker trials with TorchTrainer ones instead (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="--trial-paths: pairs of runs")
    parser.add_argument("--address", help="run every study on this running cluster")
    args = parser.parse_args()
    env = environment(sys.argv)
    if args.trial_paths:
        return compare_trial_paths(args, env)
    names = [name for name in SIDES if name == BASELINE or name in args.sides]
    runs = {name: {} for name in names}  # side -> seed -> run
    if args.merge:
        with open(args.merge) as fh:
            earlier = json.load(fh)
        for key in ("search_space", "num_samples", "sides"):
            made_with = earlier["settings"].get(key, list(SIDES))  # files from before --sides ran all four
            if made_with != getattr(args, key):
                sys.exit(f"--merge {args.merge}: made with {key}={made_with!r}, not {getattr(args, key)!r}")
        if set(args.seeds) & {int(s) for s in earlier["runs"][BASELINE]}:
            sys.exit(f"--merge {args.merge}: already has some of seeds {args.seeds}")
        for name in names:
            runs[name] = {int(seed): run for seed, run in earlier["runs"][name].items()}
        env["merged"] = {"seeds": sorted(runs[BASELINE]), "environment": earlier["environment"]}
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.abspath(args.keep) if args.keep else scratch
        os.makedirs(folder, exist_ok=True)
        for seed in args.seeds:
            study_file = seeded_study(args.search_space, seed, folder)
            for name in names[seed % len(names):] + names[:seed % len(names)]:
                with ray_lock(args.lock):
                    run = run_study(f"{name}-seed{seed}", SIDES[name], study_file, seed, args, folder)
                runs[name][seed] = run
                print(f"seed {seed} {name}: best {run['best']:.2%}, {run['trial_epochs']} trial-epochs, "
                      f"{run['stopped_early']} of {run['trials']} stopped early, {run['seconds']:.0f} s; load "
                      f"{run['load_before'][0]} -> {run['load_after'][0]}", flush=True)
    env["load_average_end"] = load_average()

    common = min(run["best"] for side in runs.values() for run in side.values())
    bars = {"common": common, **{f"{b:.2%}": b for b in args.bars}}
    results = {}
    for name in names:
        side = runs[name]
        res = {"best": summary([r["best"] for r in side.values()]),
               "trial_epochs_total": summary([r["trial_epochs"] for r in side.values()], 1),
               "seconds_total": summary([r["seconds"] for r in side.values()], 1),
               "stopped_early": [r["stopped_early"] for r in side.values()], "bars": {}}
        for label, bar in bars.items():
            reached = {seed: to_bar(r, bar) for seed, r in side.items()}
            hit = {seed: v for seed, v in reached.items() if v[0] is not None}
            entry = {"bar": bar, "reached": f"{len(hit)} of {len(side)}",
                     "per_seed": {str(s): {"trial_epochs": e, "seconds": w} for s, (e, w) in reached.items()}}
            if hit:
                entry["trial_epochs"] = summary([e for e, _ in hit.values()], 1)
                entry["seconds"] = summary([w for _, w in hit.values()], 1)
            base = {s: to_bar(r, bar) for s, r in runs[BASELINE].items()}
            ratios = [hit[s][0] / base[s][0] for s in hit if base[s][0]]
            wall_ratios = [hit[s][1] / base[s][1] for s in hit if base[s][0]]
            if ratios and len(hit) == len(side) and all(b[0] for b in base.values()):
                entry["ratio_to_baseline_per_seed"] = summary(ratios, 3)
                entry["wall_ratio_to_baseline_per_seed"] = summary(wall_ratios, 3)
                entry["ratio_of_medians"] = round(entry["trial_epochs"]["median"] /
                                                  statistics.median(b[0] for b in base.values()), 3)
            res["bars"][label] = entry
        results[name] = res

    print(describe(env) + f"; load average at end {env['load_average_end']}")
    print(f"study {args.search_space}, seeds {sorted(runs[BASELINE])}; common bar (lowest best of all runs) {common:.2%}")
    for name, res in results.items():
        print(f"{name:>14}: best {spread(res['best'], '{:.2%}')}; trial-epochs in all "
              f"{spread(res['trial_epochs_total'], '{:.0f}')}; wall {spread(res['seconds_total'], '{:.0f}')} s; "
              f"stopped early {res['stopped_early']}")
        for label, entry in res["bars"].items():
            line = f"{'':>16}to {entry['bar']:.2%} ({label}): reached in {entry['reached']}"
            if "trial_epochs" in entry:
                line += (f"; trial-epochs {spread(entry['trial_epochs'], '{:.0f}')}, wall "
                         f"{spread(entry['seconds'], '{:.0f}')} s")
            if "ratio_of_medians" in entry:
                line += (f"; / {BASELINE}: trial-epochs, ratio of medians {entry['ratio_of_medians']:.2f} "
                         f"(seed by seed, not paired: {spread(entry['ratio_to_baseline_per_seed'])}), wall seed by "
                         f"seed {spread(entry['wall_ratio_to_baseline_per_seed'])}")
            print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "bars": bars, "results": results,
                       "runs": {n: {str(s): r for s, r in side.items()} for n, side in runs.items()}}, fh)
        print(f"raw results: {args.json}")


PATHS = {"in_process": ["--one-worker-trials", "in_process"], "trainer": ["--one-worker-trials", "trainer"]}


def compare_trial_paths(args, env: dict) -> None:
    """The study with in-process one-worker trials against every trial a TorchTrainer, pairs alternating."""
    pairs = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.abspath(args.keep) if args.keep else scratch
        os.makedirs(folder, exist_ok=True)
        study_file = find_study_file(args.search_space)
        for repeat in range(args.repeats):
            order = ("in_process", "trainer") if repeat % 2 == 0 else ("trainer", "in_process")
            pair = {"order": order}
            for path in order:
                with ray_lock(args.lock):
                    pair[path] = run_study(f"{path}-{repeat}", PATHS[path], study_file, 0, args, folder)
            pair["wall_ratio"] = pair["in_process"]["seconds"] / pair["trainer"]["seconds"]
            pairs.append(pair)
            print(f"pair {repeat + 1} ({' then '.join(order)}): " + "; ".join(
                f"{p}: {pair[p]['seconds']:.0f} s, start-up median {pair[p]['startup_median_s']:.1f} s "
                f"(from Tune's start {pair[p]['tune_startup_median_s']:.1f} s), best {pair[p]['best']:.2%}"
                for p in PATHS) + f"; wall in_process / trainer {pair['wall_ratio']:.2f}", flush=True)
    result = {path: {"seconds": summary([p[path]["seconds"] for p in pairs], 1),
                     "startup_s": summary([s for p in pairs for s in p[path]["startups_s"]], 2),
                     "tune_startup_s": summary([s for p in pairs for s in p[path]["tune_startups_s"]], 2),
                     "best": summary([p[path]["best"] for p in pairs])} for path in PATHS}
    result["wall_ratio"] = summary([p["wall_ratio"] for p in pairs], 3)
    env["load_average_end"] = load_average()
    print(describe(env) + f"; load average at end {env['load_average_end']}")
    print(f"study {args.search_space} as shipped, {args.repeats} pairs (median, min-max)")
    for path in PATHS:
        r = result[path]
        print(f"{path:>10}: wall {spread(r['seconds'], '{:.0f}')} s; per-trial start-up "
              f"{spread(r['startup_s'], '{:.1f}')} s from the trial function's start, "
              f"{spread(r['tune_startup_s'], '{:.1f}')} s from Tune's start of the trial; best {spread(r['best'], '{:.2%}')}")
    print(f"wall time in_process / trainer: {spread(result['wall_ratio'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "result": result, "pairs": pairs}, fh)
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
