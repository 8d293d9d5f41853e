"""Ray Train's overhead: steady-state epoch time of `python -m raydist.train` (1 worker) against the same
model, data and loop in a plain single PyTorch process, alternated several times; and the seconds from
command start to the first training step.

    python benchmarks/overhead.py [--epochs 15] [--repeats 4] [--cpus 1 2] [--lock FILE] [--json docs/overhead.json]
                                  [--address HOST:PORT]

For each CPU count in --cpus (the worker's CPUs and torch threads, on both sides; 2 on a 2-core machine is
"the worker uses every core", sharing them with Ray's own processes), --repeats pairs of runs: plain then
raydist, raydist then plain, and so on, so neither side always goes first. Steady epoch = median epoch time
over epochs 2..N of one run; the ratio raydist / plain is taken within a pair (neighbours in time) and
reported as the median over pairs with the min-max. Load averages before and after each run go in the JSON.

The raydist side starts its own local cluster (or joins --address): start no other Ray instance meanwhile. --lock FILE holds an
flock on FILE for each pair (both sides, so the two see the same neighbours), for a machine where other
Ray users take the same lock.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_env import describe, environment, load_average, ray_lock, spread, steady, summary
from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import FINAL_MODEL_FILE, load_checkpoint_file
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate


def plain_run(epochs: int, cpus: int, folder: str) -> dict:
    cfg = validate(TrainConfig(epochs=epochs, num_workers=1, cpus_per_worker=float(cpus)))
    start = time.time()
    history = run(cfg, local_context(folder))
    return {"epoch_times": [m["epoch_time_s"] for m in history], "to_first_step_s": None,
            "command_s": time.time() - start}


def raydist_run(epochs: int, cpus: int, folder: str, address=None) -> dict:
    start = time.time()
    subprocess.run([sys.executable, "-m", "raydist.train", "--epochs", str(epochs), "--num-workers", "1",
                    "--cpus-per-worker", str(cpus), "--storage-path", folder, "--name", "overhead",
                    *(["--address", address] if address else [])],
                   check=True, stdout=subprocess.DEVNULL)
    total = time.time() - start
    run_dir = os.path.join(folder, "overhead")
    final = load_checkpoint_file(os.path.join(run_dir, FINAL_MODEL_FILE))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {"epoch_times": [e.value for e in events.Scalars("epoch_time_s")],
            "to_first_step_s": final["metrics"]["first_step_unix"] - start, "command_s": total}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (the first is left out of the steady time)")
    parser.add_argument("--repeats", type=int, default=4, help="pairs (plain, raydist) per CPU count")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, os.cpu_count()],
                        help="worker CPUs = torch threads, one series each (default: 1 and every core)")
    parser.add_argument("--lock", metavar="FILE", help="flock FILE for each pair of runs")
    parser.add_argument("--json", default="", help="write the raw epoch times here (e.g. docs/overhead.json)")
    parser.add_argument("--address", help="run the raydist side on this running cluster")
    args = parser.parse_args()
    env = environment(sys.argv)
    series = {}
    with tempfile.TemporaryDirectory() as folder:
        for cpus in args.cpus:
            pairs = []
            for repeat in range(args.repeats):
                order = ("plain", "raydist") if repeat % 2 == 0 else ("raydist", "plain")
                pair = {}
                with ray_lock(args.lock):
                    for side in order:
                        load_before = load_average()
                        where = os.path.join(folder, f"{cpus}-{repeat}-{side}")
                        result = (plain_run(args.epochs, cpus, where) if side == "plain"
                                  else raydist_run(args.epochs, cpus, where, args.address))
                        pair[side] = result | {"steady_epoch_s": steady(result["epoch_times"]),
                                               "load_before": load_before, "load_after": load_average()}
                pair["order"] = order
                pair["ratio"] = pair["raydist"]["steady_epoch_s"] / pair["plain"]["steady_epoch_s"]
                pairs.append(pair)
                print(f"cpus {cpus}, pair {repeat + 1} ({' then '.join(order)}): plain "
                      f"{pair['plain']['steady_epoch_s']:.3f} s, raydist {pair['raydist']['steady_epoch_s']:.3f} s, "
                      f"ratio {pair['ratio']:.3f}; load {pair[order[0]]['load_before'][0]} -> "
                      f"{pair[order[1]]['load_after'][0]}", flush=True)
            series[str(cpus)] = {
                "pairs": pairs,
                "ratio": summary([p["ratio"] for p in pairs], 3),
                "plain_steady_s": summary([p["plain"]["steady_epoch_s"] for p in pairs], 3),
                "raydist_steady_s": summary([p["raydist"]["steady_epoch_s"] for p in pairs], 3),
                "to_first_step_s": summary([p["raydist"]["to_first_step_s"] for p in pairs], 1),
                "raydist_command_s": summary([p["raydist"]["command_s"] for p in pairs], 1)}
    env["load_average_end"] = load_average()
    print(describe(env) + f"; load average at end {env['load_average_end']}")
    print(f"model resnet8, data digits, 1 worker, {args.epochs} epochs per run, {args.repeats} pairs per CPU count "
          "(median, min-max over pairs)")
    for cpus, s in series.items():
        print(f"{cpus} CPU(s): plain {spread(s['plain_steady_s'], '{:.3f}')} s, raydist "
              f"{spread(s['raydist_steady_s'], '{:.3f}')} s per steady epoch; ratio raydist / plain "
              f"{spread(s['ratio'], '{:.3f}')}; command start to first step {spread(s['to_first_step_s'], '{:.1f}')} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args), "series": series}, fh, indent=1)
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
