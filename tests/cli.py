"""A command's `main()` run in the test's own process, as `python -m raydist.X ...` runs it, for the tables
of bad input: the same parse and checks in milliseconds instead of a new interpreter importing torch and
Ray for each row. Each command keeps one real subprocess test that proves the process's exit code 2, its
one line and that no cluster started; these tables prove every other row's message through the same path.

    code, out, err = run_main("raydist.tune", ["--num-samples", "0"], capsys, monkeypatch)
    assert code == 2 and err == "raydist.tune: error: --num-samples must be a positive integer, got 0\n"

Starting or joining a cluster (raydist.ray_edge.session.connect, ray.init) raises ReachedTheCluster here: bad input
that got that far is a failure of the test, not a cluster started inside pytest.
"""

from __future__ import annotations

import importlib
import re


class ReachedTheCluster(AssertionError):
    pass


def run_main(module: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    import ray

    from raydist.ray_edge import session

    def refuse(*a, **k):
        raise ReachedTheCluster(f"python -m {module} {' '.join(args)} went on to start or join a cluster")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(session, "connect", refuse)
    capsys.readouterr()  # what came before is not this command's
    try:
        code = importlib.import_module(module).main(list(args))
    except SystemExit as exc:  # argparse's own exits (usage errors, --help)
        code = exc.code
    captured = capsys.readouterr()
    return code, without_ray_lines(captured.out), without_ray_lines(captured.err)


def without_ray_lines(text: str) -> str:
    """A command's output less what the session cluster's own processes sent this process meanwhile: once the
    test process has joined that cluster, Ray forwards the raylet's and the GCS's stderr and the autoscaler's
    events to it (a disk over 95% full says so every 10 s), and they would land in whatever in-process
    command's output a test reads."""
    return "".join(line for line in text.splitlines(keepends=True) if not RAY_PROCESS_LINE.match(line))


# Ray's prefix for them (ray/_private/worker.py, print_logs): "(raylet)", "(raylet, ip=...)" from another node,
# "(pid=gcs_server)", "(autoscaler +1m2s)"; coloured on a terminal.
RAY_PROCESS_LINE = re.compile(r"^(\x1b\[\d+m)?\((raylet|pid=gcs_server|autoscaler \+)[^)]*\)")
