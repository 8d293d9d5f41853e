"""Ray Train's overhead: steady-state epoch time of `python -m raydist.train` (1 CPU worker) against the
same model, data and loop in a plain single PyTorch process, measured in one run; and the seconds from
command start to the first training step.

    python benchmarks/overhead.py [--epochs 6]

Order: plain, raydist, plain again (the plain figure is the mean of both, so drift in machine speed shows
up as a gap between them). Steady state = median epoch time over epochs 2..N. Start no other Ray
instance on the machine while this runs: the raydist side starts its own local cluster.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from raydist.config import TrainConfig
from raydist.engine import FINAL_MODEL_FILE, load_checkpoint_file, local_context, run

SETTINGS = dict(num_workers=1, cpus_per_worker=1.0)


def plain_epoch_times(epochs: int, folder: str) -> list[float]:
    cfg = TrainConfig(epochs=epochs, **SETTINGS).validate()
    history = run(cfg, local_context(folder))
    return [m["epoch_time_s"] for m in history]


def raydist_epoch_times(epochs: int, folder: str) -> tuple[list[float], float, float]:
    """(epoch times, seconds from command start to first step, total command seconds)."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "raydist.train", "--epochs", str(epochs), "--num-workers", "1",
                    "--cpus-per-worker", "1", "--storage-path", folder, "--name", "overhead"],
                   check=True, stdout=subprocess.DEVNULL)
    total = time.time() - start
    run_dir = os.path.join(folder, "overhead")
    final = load_checkpoint_file(os.path.join(run_dir, FINAL_MODEL_FILE))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    times = [e.value for e in events.Scalars("epoch_time_s")]
    return times, final["metrics"]["first_step_unix"] - start, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        plain_a = plain_epoch_times(args.epochs, os.path.join(folder, "plain_a"))
        ray_times, to_first_step, total = raydist_epoch_times(args.epochs, os.path.join(folder, "ray"))
        plain_b = plain_epoch_times(args.epochs, os.path.join(folder, "plain_b"))
    steady = lambda times: statistics.median(times[1:])  # noqa: E731
    plain = (steady(plain_a) + steady(plain_b)) / 2
    print(f"model resnet8, data digits, 1 worker x 1 CPU thread, {args.epochs} epochs")
    print(f"plain PyTorch process: steady epoch {steady(plain_a):.3f} s (before), {steady(plain_b):.3f} s (after)")
    print(f"python -m raydist.train: steady epoch {steady(ray_times):.3f} s")
    print(f"ratio raydist / plain: {steady(ray_times) / plain:.3f}")
    print(f"command start to first training step: {to_first_step:.1f} s (whole command {total:.1f} s)")


if __name__ == "__main__":
    main()
