"""Connect to a Ray cluster, or start a local one with its dashboard; check that a run's resources exist.

    from raydist.cluster import check_resources, connect
    connect(None)                                  # starts a local cluster, dashboard on 127.0.0.1

    python -m raydist.cluster status --address auto        # resources, raydist jobs, Train runs, dashboard
    python -m raydist.cluster validate cluster.yaml        # Ray's own schema check, offline

Resource checks that can be made before Ray starts (a local cluster: this machine's CPUs and GPUs) are
made before it starts; against a running cluster they are made right after connecting, before any work.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from raydist.config import ConfigError

# Set in the driver's environment before Ray starts: a local cluster's processes inherit them, and Ray
# Train passes the health-check interval on to its controller and workers.
CLUSTER_ENV = {
    # The dashboard's Train view lists runs only with state tracking on.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # Ray Train polls its workers every 2 s by default, so a finished run took ~5 s to return; 0.2 s
    # makes that ~1 s at a negligible polling cost.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Ray Train routes worker print() through its logger, which printed each epoch line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(*, cluster_cpus: float, cluster_gpus: float, use_gpu: Optional[bool], num_workers: int,
                    cpus_per_worker: float, gpus_per_worker: float, where: str) -> bool:
    """Decide whether to use GPUs and fail (ConfigError) if the run cannot fit. Returns use_gpu."""
    if use_gpu is None:
        use_gpu = cluster_gpus > 0
    if use_gpu:
        wanted = num_workers * gpus_per_worker
        if wanted > cluster_gpus:
            raise ConfigError(f"--num-workers {num_workers} x --gpus-per-worker {gpus_per_worker} asks for {wanted:g} "
                              f"GPUs but {where} has {cluster_gpus:g}; lower --num-workers or drop --use-gpu")
    wanted_cpus = num_workers * cpus_per_worker
    if wanted_cpus > cluster_cpus:
        raise ConfigError(f"--num-workers {num_workers} x --cpus-per-worker {cpus_per_worker:g} asks for "
                          f"{wanted_cpus:g} CPUs but {where} has {cluster_cpus:g}; lower either")
    return use_gpu


def connect(address: Optional[str]) -> None:
    """Join the cluster at `address`, or start a local one (dashboard on 127.0.0.1) when it is None."""
    for key, value in CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():  # already connected in this process (tests, Tune drivers)
        return
    if address is None:
        # "local", not None: a bare ray.init() joins whatever cluster the address file names, and when that
        # one is dead it retries its GCS for minutes. Without --address raydist always starts its own.
        # Ray 2.60 turns token authentication on for a new local cluster; the token is in token_path().
        # Ray's own actors (Ray Train's placement-group cleaner, the State API behind Tune's trial stops) find
        # "the" cluster through RAY_API_SERVER_ADDRESS, else that same address file, else any Ray process on
        # the machine: name this cluster's dashboard for them, so a stale file or a second Ray instance on the
        # host cannot mislead them. Hence a dashboard port chosen here rather than by Ray.
        port = _free_port()
        api_server = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                           runtime_env={"env_vars": api_server}, logging_level=logging.WARNING)
        os.environ.update(api_server)  # this driver's own State API calls too
        if context.dashboard_url:
            print(f"started a local Ray cluster; dashboard: http://{context.dashboard_url} "
                  f"(token: {token_path()})", flush=True)
    else:
        check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def address_file() -> str:
    """The file in which `ray start` records this machine's latest cluster (what --address auto joins)."""
    try:
        from ray._common.utils import get_ray_address_file  # RAY (internal; honours RAY_TMPDIR)

        return get_ray_address_file(None)
    except ImportError:
        return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, in one line, when nothing answers at the cluster `address` names (ray.init would
    retry an unreachable GCS for minutes). 'auto' means RAY_ADDRESS, else this machine's latest `ray start`."""
    import socket

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
                                  f"start one with `ray start --head`, give its host:port, or drop --address "
                                  f"to start a local one") from None
    if "://" in address:  # ray://host:port (Ray Client) and the like: ray.init reports those itself
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise ConfigError(f"{flag}: no Ray cluster answers at {address}{where}; expected the head node's "
                          f"host:port (e.g. 10.0.0.10:6379) of a running cluster, or drop --address to start "
                          f"a local one") from None


def cluster_totals() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)


# ---- token, dashboard, status: `python -m raydist.cluster status` ----------------------------------------


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


def status(address: Optional[str]) -> str:
    """The connected cluster in a few lines: resources, raydist jobs, Train runs (each trial is one)."""
    import ray
    from ray.job_submission import JobSubmissionClient

    check_reachable(address or "auto")
    context = ray.init(address=address or "auto", logging_level=logging.ERROR)
    url = f"http://{context.dashboard_url}" if context.dashboard_url else None
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    lines = [f"cluster {context.address_info.get('gcs_address', address)}: {len(nodes)} node(s), "
             f"CPU {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}, "
             f"GPU {free.get('GPU', 0):g} free of {total.get('GPU', 0):g}",
             f"dashboard: {url or 'not running'}  (token: {token_path()})"]
    if url:
        jobs = [j for j in JobSubmissionClient(url, headers=auth_headers()).list_jobs() if "raydist" in j.entrypoint]
        lines.append(f"raydist jobs: {len(jobs)}")
        for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
            lines.append(f"  {job.submission_id or job.job_id}  {job.status.value:<9}  {job.entrypoint}")
        try:
            runs = dashboard_get(url, "/api/train/v2/runs/v1").get("train_runs", [])
        except OSError as exc:  # the Train view needs RAY_TRAIN_ENABLE_STATE_TRACKING=1 on the cluster
            runs = []
            lines.append(f"Train runs: not available ({exc})")
        else:
            lines.append(f"Train runs (one per `raydist.train` run or Tune trial): {len(runs)}")
        for run in sorted(runs, key=lambda r: r.get("start_time_ns") or 0, reverse=True)[:20]:
            lines.append(f"  {run.get('name')}  {run.get('status'):<12}  job {run.get('job_id')}")
    return "\n".join(lines)


def validate_cluster_file(path: str) -> dict:
    """Check a cluster-launcher YAML offline with Ray's own schema; returns the config with defaults."""
    import copy

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # it logs each default it fills in at INFO
    try:
        with open(path) as fh:
            config = yaml.safe_load(fh)
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except OSError as exc:
        raise ConfigError(f"cannot read cluster file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - schema errors come as several types; one line each
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    return prepared


def main(argv: Optional[list] = None) -> int:
    import sys

    from raydist.config import _Parser

    parser = _Parser(prog="raydist.cluster", description="Look at a Ray cluster, or check a cluster file.")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("status", help="resources, raydist jobs and Train runs, dashboard URL")
    show.add_argument("--address", default="auto", help="cluster to look at ('auto' or host:port)")
    check = sub.add_parser("validate", help="check cluster-launcher YAML files offline with Ray's schema")
    check.add_argument("files", nargs="+", metavar="CLUSTER.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            for path in args.files:
                config = validate_cluster_file(path)
                print(f"{path}: valid ({config['provider']['type']} provider, node types: "
                      f"{', '.join(config['available_node_types'])})")
        else:
            print(status(args.address))
    except ConfigError as exc:
        print(f"raydist.cluster: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"raydist.cluster: error: no cluster at {args.address}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
