"""Connect to a Ray cluster, or start a local one with its dashboard; check that a run fits what the
cluster has or can grow to, and that its storage is one every node sees.

    connect(None)                                  # starts a local cluster, dashboard on 127.0.0.1

    python -m raydist.cluster status --address auto        # resources, what it can grow to, nodes starting,
                                                           # raydist jobs, Train runs, dashboard
    python -m raydist.cluster validate cluster.yaml ...    # Ray's own schema check, offline; every file
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

from raydist.errors import ConfigError
from raydist.config.fields import host_port

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


def connect(address: Optional[str], *, quiet: bool = True, bare_run_lines: bool = False) -> None:
    """Join the cluster at `address`, or start a local one (dashboard on 127.0.0.1) when it is None.
    `quiet`: keep Ray's known-harmless internal lines off this driver's console (raydist.console);
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

    from raydist.output.console import PROGRESS_MARK, LiveBar, without_ray_noise

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
                        if LIVE_BAR is not None:
                            LIVE_BAR.clear()
                        (_bare or _print)({**data, "lines": lines})
                    if bar is not None and progress:
                        bar.show(progress[-1])
                except Exception:  # noqa: BLE001 - Ray's forwarding thread must never die here: print as Ray would
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


# ---- run metrics in the dashboard, and the studies a cluster is running ---------------------------------

# What every run exports through Ray's metrics API each epoch: Ray's metrics agent on the node serves them
# (as ray_raydist_<name>) where Prometheus scrapes, beside Ray's own CPU/GPU/memory metrics, and the
# dashboard's Metrics view shows them once Grafana and Prometheus are set up as Ray documents.
EXPORTED_METRICS = {
    "epoch": "epochs finished",
    "train_loss": "mean training loss of the last epoch",
    "train_acc": "training accuracy of the last epoch",
    "val_loss": "validation loss of the last epoch",
    "val_acc": "validation accuracy of the last epoch",
    "images_per_s": "training images per second over all workers, last epoch",
    "lr": "mean learning rate of the last epoch's updates",
}
METRIC_LABELS = ("run", "study", "trial")


class RunMetrics:
    """A run's per-epoch metrics as Ray gauges labelled with its run name (and study and trial for a Tune
    trial). One per process that reports (rank 0, or a one-worker trial's own process)."""

    def __init__(self, labels: dict):
        from ray.util.metrics import Gauge  # RAY

        self.tags = {key: str(labels.get(key) or "") for key in METRIC_LABELS}
        self.gauges = {name: Gauge(f"raydist_{name}", description=text, tag_keys=METRIC_LABELS)  # RAY
                       for name, text in EXPORTED_METRICS.items()}

    def record(self, metrics: dict) -> None:
        for name, gauge in self.gauges.items():
            value = metrics.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)


STUDY_NAMESPACE = "raydist_studies"  # Ray's key-value store: one record per study a driver is running


def publish_study(name: str, record: Optional[dict]) -> None:
    """The study's state where `raydist.cluster status` finds it (None: the study ended, remove it).
    A record names its driver's job, so a study whose driver died is told apart from a running one."""
    import json

    import ray
    from ray.experimental import internal_kv  # RAY (internal): Ray's own key-value store in the GCS

    key = name.encode()
    if record is None:
        internal_kv._internal_kv_del(key, namespace=STUDY_NAMESPACE)  # RAY
        return
    record = {**record, "job_id": ray.get_runtime_context().get_job_id()}  # RAY
    internal_kv._internal_kv_put(key, json.dumps(record, default=str).encode(), overwrite=True,  # RAY
                                 namespace=STUDY_NAMESPACE)


def published_studies() -> list[dict]:
    """Every study record on the connected cluster, each with `alive`: whether its driver's job runs."""
    import json

    from ray.experimental import internal_kv  # RAY (internal)

    records = []
    for key in internal_kv._internal_kv_list(b"", namespace=STUDY_NAMESPACE):  # RAY
        value = internal_kv._internal_kv_get(key, namespace=STUDY_NAMESPACE)  # RAY
        if value:
            try:
                records.append(json.loads(value))
            except ValueError:
                continue
    if records:
        from ray._private import state  # RAY (internal): the GCS's job table

        alive = {job["JobID"] for job in state.jobs() if not job.get("IsDead")}  # RAY
        for record in records:
            record["alive"] = record.get("job_id") in alive
    return records


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


def release_train_requests(run_names: set[str]) -> list[str]:
    """Cancel what the Ray Train runs named `run_names` still ask of Ray's autoscaling coordinator, and return
    the requests cancelled. A Train run asks the coordinator for its workers' resources and cancels the
    request when it ends; a run whose controller was killed (a trial that ASHA stopped, a study stopped by
    Ctrl+C) never does, and Ray lets the request expire only after 180 s. Until then the coordinator keeps that
    share for a run that is gone: an elastic run starts smaller, an autoscaling cluster keeps its nodes.
    Needs the dashboard (Ray Train's run list); without it, or with nothing to cancel, it does nothing."""
    import ray
    from ray._private.worker import get_dashboard_url  # RAY (internal): where this driver's cluster serves it

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")  # RAY (internal)
    except ValueError:  # no Train run has asked for anything on this cluster
        return []
    url = get_dashboard_url()
    if not url or not run_names:
        return []
    try:
        runs = dashboard_get(f"http://{url}", "/api/train/v2/runs/v1").get("train_runs", [])
    except OSError:  # a cluster without Ray Train's run list (RAY_TRAIN_ENABLE_STATE_TRACKING unset)
        return []
    requests = sorted(f"train-{run['id']}" for run in runs if run.get("name") in run_names)  # Ray Train's own ids
    ray.get([coordinator.cancel_request.remote(requester) for requester in requests], timeout=30)
    return requests


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

    address = "auto" if address is None else address
    check_reachable(address, otherwise=START_HEAD)
    context = ray.init(address=address, logging_level=logging.ERROR)
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
        except OSError as exc:  # Train's run list needs RAY_TRAIN_ENABLE_STATE_TRACKING=1 on the cluster
            runs = []
            lines.append(f"Train runs: not available ({exc})")
        else:
            lines.append(f"Train runs (one per `raydist.train` run or Tune trial): {len(runs)}")
        for run in sorted(runs, key=lambda r: r.get("start_time_ns") or 0, reverse=True)[:20]:
            lines.append(f"  {run.get('name')}  {run.get('status'):<12}  job {run.get('job_id')}")
    lines += studies_lines(published_studies())
    return "\n".join(lines)


def studies_lines(records: list[dict]) -> list[str]:
    """The studies part of `status`: each running study, its progress and its best trial so far."""
    running = [r for r in records if r.get("alive")]
    lines = [f"raydist studies running: {len(running)}"]
    for r in sorted(running, key=lambda r: r.get("started_unix") or 0):
        best = r.get("best")
        best_text = (f"best {best['trial_id']} {r['metric']} {best['text']} ({best['values']})" if best
                     else "no result yet")
        lines.append(f"  {r['name']}  {r.get('done', 0)}/{r.get('total', '?')} trials done, "
                     f"{r.get('running', 0)} running  {best_text}  experiment {r.get('experiment')}")
    gone = [r for r in records if not r.get("alive")]
    if gone:  # a driver killed before it could remove its record
        lines.append(f"  (and {len(gone)} whose driver stopped without finishing: "
                     f"{', '.join(sorted(r['name'] for r in gone))}; continue with python -m raydist.tune --resume)")
    return lines


# What a cluster file needs at least (Ray's schema requires these two; provider needs its type).
CLUSTER_FILE_NEEDS = "a Ray cluster file is a YAML mapping with at least cluster_name and provider (with its type)"


def read_cluster_file(path: str) -> dict:
    """A cluster-launcher YAML as it is written (a mapping), or ConfigError in one line naming the file."""
    import yaml

    try:
        with open(path) as fh:
            config = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read cluster file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); {CLUSTER_FILE_NEEDS}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {problem}{at}") from None
    if config is None:
        raise ConfigError(f"{path}: the file is empty; {CLUSTER_FILE_NEEDS}")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the file holds {_yaml_kind(config)}, not a mapping of keys; {CLUSTER_FILE_NEEDS}")
    return config


def validate_cluster_file(path: str) -> dict:
    """Check a cluster-launcher YAML offline with Ray's own schema (what `ray up` checks before it starts
    anything); returns the config with Ray's defaults filled in."""
    return check_cluster_config(read_cluster_file(path), path)


def check_cluster_config(config: dict, path: str) -> dict:
    """Ray's own preparation and schema check of a cluster config read from `path`; each problem is one
    ConfigError line naming the file and the key path."""
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config  # RAY (internal): what `ray up` runs

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # it logs each default it fills in at INFO
    try:
        prepared = prepare_config(copy.deepcopy(config))
    except Exception as exc:  # noqa: BLE001 - it indexes the raw file and fails on a missing or odd key
        # Ray's schema names the key behind the failure; prepare_config's error alone is "'provider'".
        schema_error = _schema_error(config)
        if schema_error is not None:
            raise ConfigError(f"{path}: {_describe(schema_error)}") from None
        problem = f"{exc.args[0]} missing" if isinstance(exc, KeyError) and exc.args else str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {problem}") from None
    try:
        validate_config(prepared)
    except jsonschema.ValidationError as exc:  # named as the file has it where it can (not a key Ray filled in)
        raise ConfigError(f"{path}: {_describe(_schema_error(config) or exc)}") from None
    except Exception as exc:  # noqa: BLE001 - Ray's own checks beyond the schema raise ValueError and others
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    return prepared


def _schema_error(config: dict):
    """The most telling error of Ray's cluster schema for `config` as written, or None."""
    import copy
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import translate_trivial_legacy_config

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as fh:  # RAY: its schema
        schema = json.load(fh)
    config = copy.deepcopy(config)
    translate_trivial_legacy_config(config)  # empty legacy keys Ray drops before its own check
    return jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(config))


def _key_path(parts) -> str:
    """provider.type, available_node_types.head.resources, setup_commands[0]."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


_SCHEMA_KINDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
                 "number": "a number", "boolean": "true or false", "null": "nothing (null)"}


def _yaml_kind(value) -> str:
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value))
    return _SCHEMA_KINDS.get(kind, f"a {type(value).__name__}")


def _describe(error) -> str:
    """One jsonschema error as 'KEY.PATH: problem'."""
    where = _key_path(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [key for key in error.validator_value if key not in error.instance]
        return ", ".join(_key_path([*error.absolute_path, key]) for key in missing) + " missing"
    if error.validator == "type":
        kinds = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        value = repr(error.instance)
        value = value if len(value) <= 60 else value[:57] + "..."
        return (f"{where or 'the file'} must be {' or '.join(_SCHEMA_KINDS.get(k, k) for k in kinds)}, "
                f"not {_yaml_kind(error.instance)} ({value})")
    return f"{where + ': ' if where else ''}{error.message.splitlines()[0]}"


def build_parser():
    from raydist.cli import _Parser

    parser = _Parser(prog="raydist.cluster", description=(
        "Look at a Ray cluster (resources, what it can grow to, nodes starting, raydist jobs, Train runs, the\n"
        "studies running and their best trial so far), check cluster files offline, or tell a cluster what it\n"
        "can grow to.\n\nexample:\n  python -m raydist.cluster status --address auto"))
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("status", help="resources, raydist jobs, Train runs, running studies, dashboard URL")
    show.add_argument("--address", default="auto", help="cluster to look at ('auto' or host:port)")
    check = sub.add_parser("validate", help="check cluster-launcher YAML files offline with Ray's schema")
    check.add_argument("files", nargs="+", metavar="CLUSTER.yaml")
    publish = sub.add_parser("publish", help="tell the cluster what it can grow to: put an autoscaler config's "
                                             "node types into its GCS (run on the head after `ray start --head`)")
    publish.add_argument("file", nargs="?", default=BOOTSTRAP_CONFIG, metavar="CLUSTER.yaml",
                         help=f"the autoscaler's config (default: {BOOTSTRAP_CONFIG}, what `ray up` writes)")
    publish.add_argument("--address", default="auto", help="the cluster's GCS ('auto' or host:port)")
    return parser


def main(argv: Optional[list] = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        if args.command == "publish":
            path = os.path.expanduser(args.file)
            config = read_cluster_file(path)
            # Ray's schema, as the autoscaler checks the file (not prepare_config: on the head the file is
            # already prepared, and for some providers it reads files a pip install of Ray lacks)
            schema_error = _schema_error(config)
            if schema_error is not None:
                raise ConfigError(f"{path}: {_describe(schema_error)}")
            if not config.get("available_node_types"):
                raise ConfigError(f"{path}: available_node_types missing; publish tells the cluster its node types")
            limit = publish_cluster_config(config, check_reachable(args.address, otherwise=START_HEAD))
            print(f"published {len(config['available_node_types'])} node types; the cluster can grow to "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(limit.items()) if k in ("CPU", "GPU")))
        elif args.command == "validate":  # every file checked, one line each
            bad = 0
            for path in args.files:
                try:
                    config = validate_cluster_file(path)
                except ConfigError as exc:
                    print(f"raydist.cluster: error: {exc}", file=sys.stderr)
                    bad += 1
                    continue
                print(f"{path}: valid ({config['provider']['type']} provider, node types: "
                      f"{', '.join(config['available_node_types'])})")
            return 2 if bad else 0
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
