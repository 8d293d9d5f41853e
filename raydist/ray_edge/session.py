"""This driver's session with a cluster: connect to one (or start a local one, its dashboard on a free
port, token authentication on), forward the workers' output without Ray's noise, find Ray's logs, check
an address answers before Ray tries it, and disconnect.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from raydist.config.values import host_port
from raydist.errors import ConfigError

# Set in the driver's environment before Ray starts: a local cluster's processes inherit them, and Ray
# Train passes the health-check interval on to its controller and workers.
CLUSTER_ENV = {
    # Ray Train's state API (its run list, which `status` prints) keeps runs only with state tracking on.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # Ray Train polls its workers every 2 s by default, so a finished run took ~5 s to return; 0.2 s
    # makes that ~1 s at a negligible polling cost.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Ray Train routes worker print() through its logger, which printed each epoch line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def connect(address: Optional[str], *, quiet: bool = True, bare_run_lines: bool = False) -> None:
    """Join the cluster at `address`, or start a local one (dashboard on 127.0.0.1) when it is None.
    `quiet`: keep Ray's known-harmless internal lines off this driver's console (raydist.output.console);
    `bare_run_lines` (with quiet): print what the training workers print without Ray's prefix."""
    for key, value in CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():  # already connected in this process (tests, Tune drivers)
        return
    if quiet:
        _quiet_driver_logger()
    if address is None:
        # "local", not None: a bare ray.init() joins whatever cluster the address file names, and when that
        # one is dead it retries its GCS for minutes. Without --address raydist always starts its own.
        # Ray 2.60 turns token authentication on for a new local cluster; the token is in token_path().
        # Ray's own actors (Ray Train's placement-group cleaner, the State API behind Tune's trial stops) find
        # "the" cluster through RAY_API_SERVER_ADDRESS, else that same address file, else any Ray process on
        # the machine: name this cluster's dashboard for them, so a stale file or a second Ray instance on the
        # host cannot mislead them. Hence a dashboard port chosen here rather than by Ray.
        port = free_port()
        # RAYDIST_LOCAL_CLUSTER: this cluster is this machine and never grows, whatever autoscaler files
        # the machine holds (a `ray up` head has ~/ray_bootstrap_config.yaml); Tune trials inherit it.
        api_server = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", LOCAL_CLUSTER_ENV: "1"}
        context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                           runtime_env={"env_vars": api_server}, logging_level=logging.WARNING)
        os.environ.update(api_server)  # this driver's own State API calls too
        if context.dashboard_url:
            print(f"started a local Ray cluster; dashboard: http://{context.dashboard_url} "
                  f"(token: {token_path()})", flush=True)
    else:
        check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING)
    if quiet:
        filter_worker_output(bare_run_lines=bare_run_lines)
    logs = ray_logs_folder()
    if logs:
        print(f"Ray's logs: {logs}" + ("" if address is None else " (this machine's; each node keeps its own)"),
              flush=True)


def ray_logs_folder() -> Optional[str]:
    """Where Ray writes this cluster's logs on this machine (every process's output, in full)."""
    try:
        import ray._private.worker  # RAY (internal): the session's folders are not in Ray's public API

        return ray._private.worker.global_worker.node.get_logs_dir_path()  # RAY
    except Exception:  # noqa: BLE001 - only a hint
        return None


def _quiet_driver_logger() -> None:
    """The token notice Ray's driver logs on every start: raydist says where the token is instead."""
    from raydist.output.console import RAY_DRIVER_NOISE

    class DropNotice(logging.Filter):
        raydist = True

        def filter(self, record: logging.LogRecord) -> bool:
            return not RAY_DRIVER_NOISE.search(record.getMessage())

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")  # RAY: its module logger
    if not any(getattr(f, "raydist", False) for f in logger.filters):
        logger.addFilter(DropNotice())


LIVE_BAR = None  # the terminal's progress bar while a driver on a terminal forwards progress lines


def filter_worker_output(*, bare_run_lines: bool = False) -> None:
    """Ray forwards every line its workers and actors print to this driver: drop Ray's known-harmless
    internal ones (raydist.output.console.RAY_NOISE) and, on a terminal, draw rank 0's progress lines as one live
    bar. With `bare_run_lines`, what the training workers print to stdout (the run's own lines: epochs,
    data, resizes) comes without Ray's coloured `(RayTrainWorker pid=...)` prefix, as a plain script's
    output would; their stderr and every other process's lines keep it. Everything else reaches the
    console as Ray prints it; the log files keep every line. Calling it again sets it anew."""
    import sys

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # RAY (internal)

    from raydist.output.console import PRINT_LOCK, PROGRESS_MARK, LiveBar, without_ray_noise

    global LIVE_BAR
    LIVE_BAR = LiveBar(sys.stdout) if sys.stdout.isatty() else None
    with dispatcher._lock:  # RAY: Ray's own handler, "ray_print_logs", wrapped in place
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs":
                continue
            handler = getattr(handler, "raydist_original", handler)  # set anew, never wrapped twice
            bare = _run_lines_printer(handler) if bare_run_lines else None

            def filtered(data, _print=handler, _bare=bare):
                try:
                    lines = without_ray_noise(data.get("lines", []))
                    bar = LIVE_BAR if not data.get("is_err") else None
                    if bar is not None:
                        progress = [line for line in lines if PROGRESS_MARK in line]
                        lines = [line for line in lines if PROGRESS_MARK not in line]
                    if lines:
                        with PRINT_LOCK:  # whole lines: never inside one the driver is printing
                            if LIVE_BAR is not None:
                                LIVE_BAR.clear()
                            (_bare or _print)({**data, "lines": lines})
                    if bar is not None and progress:
                        bar.show(progress[-1])
                except Exception:  # noqa: BLE001 - Ray's forwarding thread must never die here: print as Ray would
                    with PRINT_LOCK:
                        _print(data)

            filtered.raydist_original = handler
            dispatcher.handlers[i] = (name, filtered)


def _is_run_output(batch: dict) -> bool:
    """A forwarded batch of the run's own lines: what a training worker wrote to stdout."""
    return batch.get("actor_name") == "RayTrainWorker" and not batch.get("is_err")


def _run_lines_printer(handler):
    """Ray's handler, step by step (its log deduplication, then print_worker_logs), with Ray's prefix left
    off each printed batch of the run's own lines. Per printed batch, because the deduplication may print
    lines it held back from other processes in the same call. None where this Ray's handler is not the one
    raydist knows: then every line keeps the prefix."""
    import functools
    import sys

    try:
        from ray._private import worker as ray_worker  # RAY (internal): Ray's own forwarding pieces
        from ray._private.ray_logging import stderr_deduplicator, stdout_deduplicator  # RAY (internal)
    except ImportError:
        return None
    if not (isinstance(handler, functools.partial) and handler.func is getattr(ray_worker, "print_to_stdstream", None)
            and hasattr(ray_worker, "print_worker_logs")):
        return None
    ray_ignores_prefix = handler.keywords.get("ignore_prefix", False)

    def print_lines(data: dict) -> None:
        sink, dedup = (sys.stderr, stderr_deduplicator) if data["is_err"] else (sys.stdout, stdout_deduplicator)
        for batch in dedup.deduplicate(data) if data.get("pid") != "autoscaler" else [data]:
            ray_worker.print_worker_logs(batch, sink, ignore_prefix=ray_ignores_prefix or _is_run_output(batch))

    return print_lines


def progress_every_s() -> float:
    """How often rank 0 says how far an epoch is: each second when this driver draws a live bar on a
    terminal, every 30 s when its output goes to a file or `ray job logs` (or nothing draws a bar)."""
    return 1.0 if LIVE_BAR is not None else 30.0


# Ports a Ray node takes by default whatever else it is told: one of them handed to Ray for something else
# makes `ray start` / ray.init fail ("... is trying to use a port number 52365 that is used by other
# components"). 52365, the dashboard agent's, lies inside Linux's range of free ports the kernel hands out.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


def free_port() -> int:
    """A port free now on 127.0.0.1 that is none of Ray's default ports."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


LOCAL_CLUSTER_ENV = "RAYDIST_LOCAL_CLUSTER"


def address_file() -> str:
    """The file in which `ray start` records this machine's latest cluster (what --address auto joins)."""
    try:
        from ray._common.utils import get_ray_address_file  # RAY (internal; honours RAY_TMPDIR)

        return get_ray_address_file(None)
    except ImportError:
        return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")


# What an address error says to do instead: train and tune start a local cluster without --address;
# `status` and `publish` only look at a running one.
START_LOCAL = "drop --address to start a local one"


START_HEAD = "start one with `ray start --head`"


def check_reachable(address: str, timeout: float = 3.0, *, otherwise: str = START_LOCAL) -> str:
    """Fail in seconds, in one line, when no Ray cluster answers at the cluster `address` names (ray.init
    would retry an unreachable GCS for minutes, and for ever one whose port now holds something else).
    'auto' means RAY_ADDRESS, else this machine's latest `ray start`. `otherwise` ends the error: what the
    user can do instead. Returns the host:port it resolved to."""
    flag, where = f"--address {address}", ""
    if address == "auto":
        if os.environ.get("RAY_ADDRESS"):
            address, where = os.environ["RAY_ADDRESS"], " (from RAY_ADDRESS)"
        else:
            try:
                with open(address_file()) as fh:
                    address, where = fh.read().strip(), f" (the last `ray start` here, from {address_file()})"
            except OSError:
                raise ConfigError(f"{flag}: no Ray cluster was started on this machine (no {address_file()}); "
                                  f"give the head node's host:port, or {otherwise}") from None
    if "://" in address:  # ray://host:port (Ray Client) and the like: ray.init reports those itself
        return address
    if host_port(address) is None:
        raise ConfigError(f"{flag}: {address!r}{where} is not a cluster address; expected 'auto', the head node's "
                          f"host:port (e.g. 10.0.0.10:6379) or ray://host:port")
    expected = f"expected the head node's host:port (e.g. 10.0.0.10:6379) of a running cluster, or {otherwise}"
    try:
        host, port = host_port(address)
        grpc = speaks_grpc(host.strip("[]"), port, timeout)
    except OSError:
        raise ConfigError(f"{flag}: no Ray cluster answers at {address}{where}; {expected}") from None
    if not grpc:
        raise ConfigError(f"{flag}: something answers at {address}{where} but it is not a Ray cluster (no gRPC "
                          f"server, which a head node's GCS port is); {expected}")
    return address


def speaks_grpc(host: str, port: int, timeout: float) -> bool:
    """Whether an HTTP/2 (gRPC) server, as Ray's GCS is, answers at host:port: it replies to the client
    preface with a SETTINGS frame. Raises OSError when nothing accepts the connection. Under Ray's TLS
    (RAY_USE_TLS) only the connection is checked: the preface would have to go through TLS."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return True
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # empty SETTINGS
        header = b""
        try:
            while len(header) < 9:  # a frame header: 3 bytes length, 1 byte type (4: SETTINGS), ...
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:  # silent past the timeout, or reset: not a gRPC server
            return False
    return len(header) == 9 and header[3] == 4


def token_path() -> str:
    """Where this process reads the cluster token from, in Ray's order (after RAY_AUTH_TOKEN itself)."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")


def auth_headers() -> dict:
    """The Authorization header Ray's dashboard and job API expect, or {} when there is no token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        try:
            with open(token_path()) as fh:
                token = fh.read().strip()
        except OSError:
            return {}
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_get(url: str, path: str, timeout: float = 10.0):
    """GET a dashboard REST path with the token; returns the decoded JSON."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}{path}", headers=auth_headers())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def disconnect() -> None:
    """Ray forwards the workers' output (their tracebacks too) asynchronously; disconnecting first keeps
    the one line that names the cause the last the user sees. The full tracebacks are above it and in
    the cluster's logs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


