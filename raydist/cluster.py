"""Connect to a Ray cluster, or start a local one with its dashboard; check that a run fits what the
cluster has or can grow to, and that its storage is one every node sees.

    from raydist.cluster import check_resources, connect, plan_run
    connect(None)                                  # starts a local cluster, dashboard on 127.0.0.1

    python -m raydist.cluster status --address auto        # resources, what it can grow to, nodes starting,
                                                           # raydist jobs, Train runs, dashboard
    python -m raydist.cluster validate cluster.yaml        # Ray's own schema check, offline
    python -m raydist.cluster publish ~/ray_bootstrap_config.yaml   # on the head, after `ray start --head`

Resource checks that can be made before Ray starts (a local cluster: this machine's CPUs and GPUs) are
made before it starts; against a running cluster they are made right after connecting, before any work.

What an autoscaling cluster can grow to: Ray 2.60's autoscalers keep their node types to themselves (the
GCS has a slot for them, `ClusterConfig`, that nothing in Ray fills), so a cluster that starts from zero
worker nodes looks like a CPU-less head. `publish` puts the node types into that slot, where Ray Train's
own pre-flight check reads them too; without it raydist falls back to ~/ray_bootstrap_config.yaml on the
driver's node (what `ray up` leaves on the head), else treats the cluster as fixed (what it has now).
"""

from __future__ import annotations

import logging
import os
import dataclasses
import math
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


def check_reachable(address: str, timeout: float = 3.0) -> str:
    """Fail in seconds, in one line, when nothing answers at the cluster `address` names (ray.init would
    retry an unreachable GCS for minutes). 'auto' means RAY_ADDRESS, else this machine's latest `ray start`.
    Returns the host:port it resolved to."""
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
        return address
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise ConfigError(f"{flag}: no Ray cluster answers at {address}{where}; expected the head node's "
                          f"host:port (e.g. 10.0.0.10:6379) of a running cluster, or drop --address to start "
                          f"a local one") from None
    return address


def cluster_totals() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)


# ---- what the cluster can grow to -------------------------------------------------------------------------

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # `ray up` writes the filled-in cluster file here, on the head
# Ray Train gives up on a worker group whose placement group is not ready after 60 s and retries at once,
# forever, with a traceback each time; cloud GPU nodes take minutes to boot. Used when the user set none.
AUTOSCALING_START_TIMEOUT_S = "900"


@dataclasses.dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict  # per node; empty when the cluster file leaves them to the provider and nothing filled them
    min_count: int  # nodes of this type, the head included when it is the head's type
    max_count: int
    head: bool


def node_types(config: dict) -> list[NodeType]:
    """The node types of an autoscaler config (a cluster-launcher YAML, as a dict). The head's type may
    serve workers too (Ray's local provider: one type for every machine)."""
    head = config.get("head_node_type")
    default_max = config.get("max_workers", 2)
    return [NodeType(name=name, resources={k: float(v) for k, v in (t.get("resources") or {}).items()},
                     min_count=int(t.get("min_workers", 0)) + (name == head),
                     max_count=int(t.get("max_workers", 0 if name == head else default_max)) + (name == head),
                     head=name == head)
            for name, t in config.get("available_node_types", {}).items()]


def max_worker_nodes(types: list[NodeType], max_workers: Optional[int] = None) -> int:
    return min(sum(t.max_count - t.head for t in types), max_workers if max_workers is not None else math.inf)


def grow_to(types: list[NodeType], max_workers: Optional[int] = None) -> dict:
    """Most of each resource the cluster can hold: the head plus the largest worker nodes, up to each
    type's max_count and `max_workers` worker nodes in all (counted per resource, so an upper bound)."""
    result = {}
    for key in {k for t in types for k in t.resources}:
        head = sum(t.resources.get(key, 0.0) for t in types if t.head)
        workers = sorted((t.resources.get(key, 0.0) for t in types for _ in range(t.max_count - t.head)),
                         reverse=True)
        result[key] = head + sum(workers[:max_worker_nodes(types, max_workers)])
    return result


def publish_cluster_config(config: dict, gcs_address: str) -> dict:
    """Put an autoscaler config's node types into the cluster's GCS (autoscaler ClusterConfig), where
    capacity() and Ray Train's pre-flight check read them. Returns what the cluster can grow to."""
    from ray._raylet import GcsClient  # RAY (internal): the only writer of that GCS slot
    from ray.core.generated import autoscaler_pb2

    types = node_types(config)
    unknown = [t.name for t in types if t.max_count > t.head and not t.resources]
    if unknown:  # Ray Train would read the missing resources as 0 and refuse every run
        raise ConfigError(f"node type {unknown[0]} lists no resources (Ray fills them in only for cloud "
                          f"providers): give it resources: {{CPU: ..., GPU: ...}}; nothing published")
    limit = grow_to(types, config.get("max_workers"))
    message = autoscaler_pb2.ClusterConfig()
    for t in types:
        group = message.node_group_configs.add(name=t.name, min_count=t.min_count, max_count=t.max_count)
        for key, value in t.resources.items():
            group.resources[key] = int(value)  # the proto holds whole units
    for key, value in limit.items():
        message.max_resources[key] = int(value)
    GcsClient(address=gcs_address).report_cluster_config(message.SerializeToString())
    return limit


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The connected cluster now, and at its largest."""
    cpus: float  # in alive nodes now
    gpus: float
    free_cpus: float
    free_gpus: float
    nodes: int  # alive now, head included
    max_cpus: float  # at its largest (= cpus on a fixed cluster)
    max_gpus: float
    max_nodes: float  # head included; math.inf: no limit
    source: str  # where max_* come from

    @property
    def autoscaling(self) -> bool:
        return self.max_nodes > self.nodes or self.max_cpus > self.cpus or self.max_gpus > self.gpus

    @property
    def where(self) -> str:
        """How error messages name it: 'the cluster has 8' / 'the cluster at its largest has 8'."""
        return "the cluster at its largest" if self.autoscaling else "the cluster"


def capacity() -> Capacity:
    """What the connected cluster has and what it can grow to: the node types published in its GCS (see
    `publish`), else ~/ray_bootstrap_config.yaml on this node, else what it has now (a fixed cluster)."""
    import ray
    import ray._private.state  # RAY (internal): the reader Ray Train's own pre-flight check uses

    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    now = dict(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0), free_cpus=free.get("CPU", 0.0),
               free_gpus=free.get("GPU", 0.0), nodes=nodes)
    bootstrap = os.path.expanduser(BOOTSTRAP_CONFIG)
    local = os.environ.get(LOCAL_CLUSTER_ENV) == "1"  # a cluster raydist started on this machine is fixed
    config = None if local else ray._private.state.state.get_cluster_config()
    if local:
        limit, max_nodes, source = {}, nodes, "current resources (a local cluster)"
    elif config is not None and config.node_group_configs:
        limit = ray._private.state.state.get_max_resources_from_cluster_config() or {}
        counts = [g.max_count for g in config.node_group_configs]
        max_nodes = math.inf if -1 in counts else sum(counts)
        source = "the autoscaler's node types (published)"
    elif os.path.isfile(bootstrap):
        import yaml

        with open(bootstrap) as fh:
            raw = yaml.safe_load(fh) or {}
        types = node_types(raw)
        limit = grow_to(types, raw.get("max_workers"))
        max_nodes = 1 + max_worker_nodes(types, raw.get("max_workers"))
        source = f"the autoscaler's node types in {BOOTSTRAP_CONFIG}"
    else:
        limit, max_nodes, source = {}, nodes, "current resources (no autoscaler config published)"
    # Node types whose resources nobody listed add nothing known: never report less than there is now.
    return Capacity(**now, max_cpus=max(now["cpus"], float(limit.get("CPU", 0))),
                    max_gpus=max(now["gpus"], float(limit.get("GPU", 0))), max_nodes=max(nodes, max_nodes),
                    source=source)


def _count(n: float, noun: str) -> str:
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def waiting_line(cap: Capacity, *, who: str, cpus: float, gpus: float, workers: Optional[int] = None) -> Optional[str]:
    """The one line said when a run fits the cluster at its largest but not what is free now, e.g.
    'waiting for the autoscaler: the run needs 2 GPU workers (2 GPUs), the cluster has 0 GPUs free now and
    can grow to 8'. `who` says who needs it ('the run needs'); `workers`, when given, how many."""
    if not cap.autoscaling:
        return None
    for amount, free, most, noun in ((gpus, cap.free_gpus, cap.max_gpus, "GPU"),
                                     (cpus, cap.free_cpus, cap.max_cpus, "CPU")):
        if amount > free + 1e-9:
            wanted = _count(amount, noun)
            if workers:
                wanted = f"{_count(workers, 'GPU worker' if noun == 'GPU' else 'worker')} ({wanted})"
            return (f"waiting for the autoscaler: {who} {wanted}, the cluster has {_count(free, noun)} free now "
                    f"and can grow to {most:g}")
    return None


def plan_run(*, use_gpu: Optional[bool], num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
             storage_path: Optional[str]) -> bool:
    """Checks on the connected cluster before a run starts; returns use_gpu. ConfigError if the run cannot
    fit the cluster at its largest, or its storage is a local path not every node can see (storage_path
    None: checked already, e.g. by the study a trial belongs to). Says when it must wait for new nodes."""
    cap = capacity()
    use_gpu = check_resources(cluster_cpus=cap.max_cpus, cluster_gpus=cap.max_gpus, use_gpu=use_gpu,
                              num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                              gpus_per_worker=gpus_per_worker, where=cap.where)
    if storage_path is not None:
        check_storage(storage_path, cap)
    if cap.autoscaling:
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", AUTOSCALING_START_TIMEOUT_S)
    line = waiting_line(cap, who="the run needs", cpus=num_workers * cpus_per_worker,
                        gpus=num_workers * gpus_per_worker if use_gpu else 0.0, workers=num_workers)
    if line:
        print(line, flush=True)
    return use_gpu


# ---- storage every node sees --------------------------------------------------------------------------------

SHARED_STORAGE_ENV = "RAYDIST_SHARED_STORAGE"  # "1": a local --storage-path is a mount every node shares
PROBE_TIMEOUT_S = 60.0


def is_local_path(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def check_storage(storage_path: str, cap: Capacity) -> None:
    """A local --storage-path on a cluster of several nodes (or one that can add some) must be one every
    node sees: Ray Train's checkpoints would fail on the first report from another node, and raydist's final
    model and TensorBoard files would land on rank 0's own disk. Decided by looking: a marker written here,
    read back by a task on every alive node."""
    if not is_local_path(storage_path) or (cap.nodes <= 1 and not cap.autoscaling):
        return
    seen = probe_shared_path(storage_path.removeprefix("file://"))
    error, warning = storage_verdict(storage_path, seen=seen, can_grow=cap.max_nodes > 1,
                                     assume_shared=os.environ.get(SHARED_STORAGE_ENV) == "1")
    if error:
        raise ConfigError(error)
    if warning:
        print(f"warning: {warning}", flush=True)


def storage_verdict(path: str, *, seen: dict, can_grow: bool,
                    assume_shared: bool) -> tuple[Optional[str], Optional[str]]:
    """(error, warning) for a local storage path, given which alive nodes saw the marker written on the
    driver's node ({node id: True / False / None (did not answer)})."""
    blind = sorted(node for node, ok in seen.items() if ok is False)
    if blind:
        return (f"--storage-path {path} is not shared: node {blind[0]} cannot see it ({len(blind)} of {len(seen)} "
                f"node(s) cannot); checkpoints and results must go where every node writes: use s3://BUCKET/..., "
                f"gs://BUCKET/... or a folder every node mounts at the same path"), None
    confirmed = sum(1 for ok in seen.values() if ok)
    unanswered = sorted(node for node, ok in seen.items() if ok is None)
    if not unanswered and (confirmed >= 2 or not can_grow):
        return None, None
    if assume_shared:
        return None, (f"--storage-path {path}: seen by {confirmed} node(s) only; assumed shared by every other "
                      f"node ({SHARED_STORAGE_ENV}=1)")
    fix = (f"use s3://BUCKET/..., gs://BUCKET/... or a folder every node mounts at the same path (if {path} is "
           f"one, set {SHARED_STORAGE_ENV}=1)")
    if unanswered:
        return (f"--storage-path {path} is a local path and node {unanswered[0]} did not answer the check that it "
                f"sees it (in {PROBE_TIMEOUT_S:g} s): {fix}"), None
    return (f"--storage-path {path} is a local path and the cluster adds worker nodes that cannot be checked yet "
            f"(none is up): {fix}"), None


def _read_marker(path: str, token: str) -> tuple[str, bool]:
    import ray

    try:
        with open(path) as fh:
            ok = fh.read() == token
    except OSError:
        ok = False
    return ray.get_runtime_context().get_node_id(), ok


def probe_shared_path(path: str) -> dict:
    """Write a marker under `path` here and read it from a zero-CPU task pinned to each alive node.
    Returns {node id: True (saw it) / False (did not) / None (did not answer in time)}."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    os.makedirs(path, exist_ok=True)
    token = uuid.uuid4().hex
    marker = os.path.join(path, f".raydist-shared-check-{token}")
    with open(marker, "w") as fh:
        fh.write(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        pending = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                   .remote(marker, token): node["NodeID"] for node in ray.nodes() if node.get("Alive")}
        seen = dict.fromkeys(pending.values())
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        for ref in done:
            try:
                node, ok = ray.get(ref)
                seen[node] = ok
            except Exception:  # noqa: BLE001 - a node that died meanwhile: not answered
                pass
        return seen
    finally:
        os.remove(marker)


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


def autoscaler_activity(gcs_address: str) -> list[str]:
    """Nodes the autoscaler is launching or booting, and launches that failed, one line each: from the v2
    autoscaler's status (the default under `ray up`), else the v1 autoscaler's report in the GCS."""
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2

    lines = []
    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        state = get_cluster_status(gcs_address)
        lines += [f"launching {r.count} x {r.ray_node_type_name} ({r.instance_type_name}, {r.state})"
                  for r in state.pending_launches]
        lines += [f"starting {n.ray_node_type_name} {n.instance_id} ({n.node_status}"
                  f"{': ' + n.details if n.details else ''})" for n in state.pending_nodes]
        lines += [f"failed to launch {r.count} x {r.ray_node_type_name}: {r.details}" for r in state.failed_launches]
        return lines
    from ray.experimental.internal_kv import _internal_kv_get  # RAY (internal): the v1 monitor's report

    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return []
    report = json.loads(raw).get("autoscaler_report", {})
    lines += [f"launching {count} x {node_type}" for node_type, count in (report.get("pending_launches") or {}).items()]
    lines += [f"starting {node_type} {ip} ({state})" for ip, node_type, state in report.get("pending_nodes") or []]
    lines += [f"failed {node_type} {ip}" for ip, node_type in report.get("failed_nodes") or []]
    return lines


def status(address: Optional[str]) -> str:
    """The connected cluster in a few lines: resources, what it can grow to and the nodes starting, raydist
    jobs, Train runs (each trial is one)."""
    import ray
    from ray.job_submission import JobSubmissionClient

    check_reachable(address or "auto")
    context = ray.init(address=address or "auto", logging_level=logging.ERROR)
    url = f"http://{context.dashboard_url}" if context.dashboard_url else None
    gcs = context.address_info.get("gcs_address", address)
    cap = capacity()
    lines = [f"cluster {gcs}: {cap.nodes} node(s), CPU {cap.free_cpus:g} free of {cap.cpus:g}, "
             f"GPU {cap.free_gpus:g} free of {cap.gpus:g}"]
    if cap.autoscaling:
        lines.append(f"can grow to: CPU {cap.max_cpus:g}, GPU {cap.max_gpus:g}  (from {cap.source})")
    else:
        lines.append(f"can grow to: no more (from {cap.source})")
    activity = autoscaler_activity(gcs)
    lines.append("nodes starting:" + ("" if activity else " none"))  # launching, booting, failed to launch
    lines += [f"  {a}" for a in activity]
    lines.append(f"dashboard: {url or 'not running'}  (token: {token_path()})")
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
    publish = sub.add_parser("publish", help="tell the cluster what it can grow to: put an autoscaler config's "
                                             "node types into its GCS (run on the head after `ray start --head`)")
    publish.add_argument("file", nargs="?", default=BOOTSTRAP_CONFIG, metavar="CLUSTER.yaml",
                         help=f"the autoscaler's config (default: {BOOTSTRAP_CONFIG}, what `ray up` writes)")
    publish.add_argument("--address", default="auto", help="the cluster's GCS ('auto' or host:port)")
    args = parser.parse_args(argv)
    try:
        if args.command == "publish":
            import yaml

            path = os.path.expanduser(args.file)
            try:
                with open(path) as fh:
                    config = yaml.safe_load(fh)
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
            limit = publish_cluster_config(config, check_reachable(args.address))
            print(f"published {len(config['available_node_types'])} node types; the cluster can grow to "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(limit.items()) if k in ("CPU", "GPU")))
        elif args.command == "validate":
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
