"""An elastic run (2 -> 4 -> 2 workers) against fixed 2- and 4-worker runs of the same recipe on digits, on a
real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a CPU-less head, 2-CPU worker nodes).

    python benchmarks/elastic_digits.py --out docs/elastic_digits.json --plot docs/elastic_digits.png

Every run trains the same optimisation: global batch 128 (per-worker batch 32, with gradient accumulation on
2 workers), the same LR schedule, `--epochs` epochs. The elastic run (`--num-workers 2-4`) starts on one node;
a second node joins after epoch `--grow-after`; after `--epochs-on-4` epochs on 4 workers it gets a spot notice
(`ray drain-node` with the preemption reason and a 20 s deadline) and is then removed for real. Two more
runs start elastic on both nodes (4 workers) and lose one `--kill-into-epoch-s` into the epoch after
`--kill-after` (its raylet and workers killed): "killed" without notice, "notice-killed" 2 s after the
notice's checkpoint line, long before its 60 s deadline. To Ray both are failures, so they run with
`--max-failures 1`; the first repeats the work since the last epoch checkpoint, the second at most the
K = 2 steps since the notice's. Recorded per
run: wall time (process start to exit), final validation accuracy, and every epoch line's arrival time and
images/s, so the PNG shows images/s over wall time with the elastic run's worker count beneath. Also recorded:
the spot-notice cadence that the 2 -> 4 -> 2 run chose by itself (--preemption-check-every 0) and what a
check costs against a step.

On a 2-core machine, 4 workers do not train faster than 2 (they share the same cores): the figures here
measure what a resize costs and that the result does not depend on the worker count, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from bench_env import environment

import image_trace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from clusters import ConsoleLines, shutdown_cluster  # noqa: E402  (the tests' cluster helpers)

EPOCH_LINE = re.compile(r"epoch +(\d+)/(\d+)  train loss .* ([\d,.]+) img/s")  # 1,623 img/s: thousands separated
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _train_command(address: str, workers: str, args, folder: str, name: str) -> list[str]:
    command = [sys.executable, "-m", "raydist.train", "--address", address, "--num-workers", workers,
               "--batch-size", "32", "--lr", str(args.lr), "--epochs", str(args.epochs),
               "--storage-path", folder, "--name", name]
    if "-" in workers:
        return command + ["--global-batch", str(args.global_batch), "--resize-check-s", "2"]
    return command + ["--grad-accum", str(args.global_batch // 32 // int(workers))]


RUNS = {  # label: (--num-workers, worker nodes at the start, what happens to the nodes)
    "fixed-2": ("2", 1, "fixed"),
    "fixed-4": ("4", 2, "fixed"),
    "elastic-2-4-2": ("2-4", 1, "grow-reclaim"),
    "elastic-4-2-killed": ("2-4", 2, "killed"),
    "elastic-4-2-notice-killed": ("2-4", 2, "notice-killed"),
}


def _drain(address: str, node_id: str, deadline_s: int) -> None:
    """The cloud's spot notice, as Ray's autoscaler passes it on: drain with the preemption reason."""
    subprocess.run([RAY, "drain-node", "--address", address, "--node-id", node_id, "--reason",
                    "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot", "--deadline-remaining-seconds",
                    str(deadline_s)], check=True, capture_output=True, timeout=60)


def _one_run(label: str, workers: str, nodes: int, args, folder: str, *, scenario: str = "fixed") -> dict:
    """scenario: fixed; grow-reclaim (a node joins, later gets a notice and goes at its deadline); killed (a
    node dies without notice); notice-killed (a notice, then the node dies long before its deadline)."""
    from ray.cluster_utils import Cluster

    trace = os.path.join(folder, f"{label}-trace")  # every micro-batch's (epoch, position, world): steps repeated
    if scenario in ("killed", "notice-killed"):
        saved = {key: os.environ.get(key) for key in image_trace.environment(trace)}
        os.environ.update(image_trace.environment(trace))  # the nodes' raylets, and so the workers, inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    proc, console, events = None, None, []
    try:
        added = [cluster.add_node(num_cpus=2) for _ in range(nodes)]
        cluster.wait_for_nodes()
        if scenario in ("killed", "notice-killed"):
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        started = time.monotonic()

        def event(what: str) -> None:
            events.append({"event": what, "at_s": round(time.monotonic() - started, 2)})

        command = _train_command(cluster.address, workers, args, folder, label)
        if scenario in ("killed", "notice-killed"):  # a node that dies is a failure: it draws on --max-failures
            command += ["--max-failures", "1", "--preemption-check-every", "2"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        console = ConsoleLines(proc)
        if scenario == "grow-reclaim":
            console.wait_for(rf"epoch +{args.grow_after}/", 600)
            event("node joined")
            spot = cluster.add_node(num_cpus=2)
            grown = console.wait_for(r"worker\(s\) joined: continuing on 4 workers at epoch (\d+)", 600)
            event("training on 4 workers")
            console.wait_for(rf"epoch +{int(grown.group(1)) - 1 + args.epochs_on_4}/", 600)
            event("spot notice")
            _drain(cluster.address, spot.node_id, 20)
            console.wait_for(r"reclaimed \(spot notice", 120)
            event("notice checkpoint")
            console.wait_for(r"worker\(s\) gone: continuing on 2 worker", 600)
            cluster.remove_node(spot, allow_graceful=False)
            event("training on 2 workers")
        elif scenario in ("killed", "notice-killed"):
            console.wait_for(rf"epoch +{args.kill_after}/", 600)
            time.sleep(args.kill_into_epoch_s)  # into the next epoch, past its checkpoint
            if scenario == "notice-killed":
                event("spot notice")
                _drain(cluster.address, added[-1].node_id, 60)
                console.wait_for(r"reclaimed \(spot notice", 120)
                event("notice checkpoint")
                time.sleep(2)
            cluster.remove_node(added[-1], allow_graceful=False)
            event("node killed")
            console.wait_for(r"worker\(s\) gone: continuing on 2 worker", 600)
            event("training on 2 workers")
        code = proc.wait(timeout=3600)
        wall_s = time.monotonic() - started
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        text = console.finish() if console else ""
        shutdown_cluster(cluster)
    if code != 0:
        raise SystemExit(f"{label}: raydist.train exited {code}:\n{text[-4000:]}")
    history = [json.loads(line) for line in open(os.path.join(folder, label, "history.jsonl"))]
    epochs = [{"epoch": int(m.group(1)), "at_s": round(t, 2), "images_per_s": float(m.group(3).replace(",", ""))}
              for t, line in console.lines for m in [EPOCH_LINE.search(line)] if m]
    world = {h["epoch"]: h["world_size"] for h in history}
    for e in epochs:
        e["world_size"] = world.get(e["epoch"])
    gone = re.search(r"worker\(s\) gone: continuing on 2 worker\(s\) at epoch (\d+), step (\d+)/", text)
    repeated = None
    if os.path.isdir(trace) and gone:  # steps the 4-worker group trained past the point the 2 resumed from
        resumed = (int(gone.group(1)) - 1, int(gone.group(2)) * args.global_batch)
        repeated = len({(r["epoch"], r["end"]) for r in image_trace.read(trace)
                        if r["world"] == 4 and (r["epoch"], r["end"]) > resumed})
    cadence = re.search(r"spot notices: checked every (\d+) step\(s\) \(a check takes ([\d.]+) ms, a step "
                        r"([\d.]+) ms\)", text)
    final = re.search(r"finished \d+ epoch\(s\) in [\d.]+s: val acc ([\d.]+)%", text)
    return {"label": label, "num_workers": workers, "wall_s": round(wall_s, 1),
            "train_s": round(sum(h["epoch_time_s"] for h in history), 1),
            "final_val_acc": float(final.group(1)) / 100, "global_batch": sorted({h["global_batch"] for h in history}),
            "epochs": epochs, "events": events, "steps_repeated": repeated,
            "resize_lines": [line.strip() for _, line in console.lines if "continuing on" in line or "elastic:" in line],
            "notice_check": None if not cadence else {
                "every_steps": int(cadence.group(1)), "check_ms": float(cadence.group(2)),
                "step_ms": float(cadence.group(3))}}


def _with_gaps(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Break the line where the run stopped training (a restart): a gap over 2.5x the usual epoch interval."""
    if len(xs) < 3:
        return xs, ys
    usual = sorted(b - a for a, b in zip(xs, xs[1:]))[len(xs) // 2 - 1]
    out_x, out_y = [xs[0]], [ys[0]]
    for (a, b), y in zip(zip(xs, xs[1:]), ys[1:]):
        if b - a > 2.5 * usual:
            out_x.append((a + b) / 2)
            out_y.append(float("nan"))
        out_x.append(b)
        out_y.append(y)
    return out_x, out_y


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, workers) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.2]})
    for i, run in enumerate(runs):
        color = f"C{i}"
        xs = [e["at_s"] for e in run["epochs"]]
        ys = [e["images_per_s"] for e in run["epochs"]]
        ax.plot(*_with_gaps(xs, ys), marker="o", markersize=3, color=color,
                label=f"{run['label']} ({run['wall_s']:.0f} s, val acc {run['final_val_acc']:.1%})")
        if "-" in run["num_workers"]:  # an elastic run: its worker count, and when the nodes came and went
            workers.step(xs, [e["world_size"] + 0.06 * i for e in run["epochs"]], where="pre", color=color,
                         label=run["label"])
            for event in run["events"]:
                workers.axvline(event["at_s"], color=color, linestyle=":", linewidth=1)
                workers.annotate(event["event"], (event["at_s"], 4.3), fontsize=6, rotation=90, va="bottom",
                                 ha="right", color=color, annotation_clip=False)
    ax.set_ylabel("training images/s (per epoch line)")
    ax.set_title("Elastic 2 -> 4 -> 2 workers vs fixed 2 and 4, digits, global batch 128\n"
                 "(gaps: the group restarting; dotted lines below: what happened to the nodes)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    workers.set_ylabel("elastic workers")
    workers.set_xlabel("seconds since the run's process started")
    workers.set_yticks([2, 4])
    workers.set_ylim(1.5, 4.3)
    workers.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--grow-after", type=int, default=5, help="the elastic run's node joins after this epoch")
    parser.add_argument("--epochs-on-4", type=int, default=3,
                        help="its spot notice comes after this many epochs on 4 workers")
    parser.add_argument("--kill-after", type=int, default=8,
                        help="the 4th run (4 -> 2 workers, no notice) loses a node this long into the next epoch")
    parser.add_argument("--kill-into-epoch-s", type=float, default=1.5)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", default="docs/elastic_digits.json")
    parser.add_argument("--plot", default="docs/elastic_digits.png")
    parser.add_argument("--replot", action="store_true", help="only draw --plot again from --out's runs")
    args = parser.parse_args()
    if args.replot:
        with open(args.out) as fh:
            plot(json.load(fh)["runs"], args.plot)
        return
    env = environment(sys.argv)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for label in args.runs:
            workers, nodes, scenario = RUNS[label]
            runs.append(_one_run(label, workers, nodes, args, folder, scenario=scenario))
    result = {**env, "epochs": args.epochs, "global_batch": args.global_batch, "runs": runs}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(runs, args.plot)
    for run in runs:
        print(f"{run['label']:>14}: {run['wall_s']:6.1f} s wall, {run['train_s']:6.1f} s training, "
              f"final val acc {run['final_val_acc']:.2%}")


if __name__ == "__main__":
    main()
