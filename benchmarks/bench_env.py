"""What every benchmark records beside its figures, and the lock its Ray runs take on a shared machine.

    from bench_env import environment, ray_lock, summary
    env = environment(sys.argv)            # machine, versions, command, date, load average at the start
    with ray_lock(args.lock):              # flock on the file (no-op for None) around one command that starts Ray
        ...
    summary([1.1, 0.9, 1.0])               # {"median": 1.0, "min": 0.9, "max": 1.1, "n": 3, "values": [...]}

The benchmarks run as `python benchmarks/<name>.py`, so this file is importable as `bench_env`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import platform
import statistics
import sys
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def versions() -> dict:
    found = {}
    for package in ("torch", "torchvision", "pillow", "numpy", "ray", "hyperopt"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages: on a shared machine, how much else was running."""
    return [round(x, 2) for x in os.getloadavg()]


def environment(argv: list[str]) -> dict:
    return {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(argv),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
                        "python": platform.python_version(), "os": platform.platform()},
            "versions": versions(), "load_average_start": load_average()}


def describe(env: dict) -> str:
    m, v = env["machine"], env["versions"]
    return (f"{m['cores']}-core {m['cpu']}, {m['memory_gib']} GiB; torch {v['torch']}, torchvision "
            f"{v['torchvision']}, Pillow {v['pillow']}, Ray {v['ray']}; {env['date']}; load average at start "
            f"{env['load_average_start']}")


@contextlib.contextmanager
def ray_lock(path: str | None):
    """Hold an exclusive flock on `path` (None: no lock), the convention that keeps two Ray instances
    from starting at once on a machine shared with other test runs."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def steady(per_epoch: list[float]) -> float:
    """The median of a run's per-epoch figures after its first epoch, which pays for first-call allocations
    and warm-up (all of them when there is only one)."""
    return statistics.median(per_epoch[1:] or per_epoch)


def summary(values: list[float], digits: int = 4) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values), "values": [round(v, digits) for v in values]}


def spread(s: dict, fmt: str = "{:.2f}") -> str:
    """'1.02 (0.98-1.07, n=5)' from a summary()."""
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])}, n={s['n']})"


if __name__ == "__main__":
    print(describe(environment(sys.argv)))
