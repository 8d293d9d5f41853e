"""What a run or study may ask of a cluster: its capacity now and what its autoscaler can grow it to (the
node types published by `raydist.cluster publish`, else `~/ray_bootstrap_config.yaml`, else a KubeRay
pod's RayCluster, else an unknown limit where an autoscaler reports, else what it has), the resource checks
with their one-line refusals, the waiting lines and the bounded wait, and whether a local storage path is
shared by every node.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from raydist.errors import ConfigError
from raydist.ray_edge.session import LOCAL_CLUSTER_ENV


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


def cluster_totals() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)


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
    max_cpus: float  # at its largest (= cpus on a fixed cluster); math.inf: an autoscaler whose limit is unknown
    max_gpus: float
    max_nodes: float  # head included; math.inf: no limit, or unknown
    source: str  # where max_* come from
    node_shapes: tuple = ()  # {resource: amount} of each node it has or can add; () when unknown
    autoscaler: str = ""  # with an unknown limit, the autoscaler that reports to the cluster: "v2" or "v1"

    @property
    def autoscaling(self) -> bool:
        return self.max_nodes > self.nodes or self.max_cpus > self.cpus or self.max_gpus > self.gpus

    @property
    def limit_known(self) -> bool:
        return math.isfinite(self.max_cpus)

    @property
    def where(self) -> str:
        """How error messages name it: 'the cluster has 8' / 'the cluster at its largest has 8'."""
        return "the cluster at its largest" if self.autoscaling else "the cluster"

    def grows_to(self, amount: float) -> str:
        return f"can grow to {amount:g}" if self.limit_known else "its autoscaler's limit is unknown"


FIXED_CLUSTER_ENV = "RAYDIST_FIXED_CLUSTER"  # "1": plan against what the cluster has now, whatever reports


def capacity() -> Capacity:
    """What the connected cluster has and what it can grow to, from the first of: the node types
    published in its GCS (see `publish`), ~/ray_bootstrap_config.yaml on this node, the RayCluster of a
    KubeRay pod; else, with an autoscaler reporting to the cluster, an unknown limit (math.inf); else what
    it has now (a fixed cluster). docs/reliability.md, "Any autoscaling cluster"."""
    import ray
    import ray._private.state  # RAY (internal): the reader Ray Train's own pre-flight check uses

    total, free = ray.cluster_resources(), ray.available_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    now = dict(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0), free_cpus=free.get("CPU", 0.0),
               free_gpus=free.get("GPU", 0.0), nodes=len(alive))
    shapes_now = [_cpu_gpu(n.get("Resources", {})) for n in alive]

    def fixed(source: str) -> Capacity:
        return Capacity(**now, max_cpus=now["cpus"], max_gpus=now["gpus"], max_nodes=len(alive), source=source,
                        node_shapes=tuple(shapes_now))

    if os.environ.get(LOCAL_CLUSTER_ENV) == "1":  # a cluster raydist started on this machine is fixed
        return fixed("current resources (a local cluster)")
    if os.environ.get(FIXED_CLUSTER_ENV) == "1":
        return fixed(f"current resources ({FIXED_CLUSTER_ENV}=1)")
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        limit = ray._private.state.state.get_max_resources_from_cluster_config() or {}
        counts = [g.max_count for g in config.node_group_configs]
        return _grown(now, shapes_now, limit, max_nodes=math.inf if -1 in counts else sum(counts),
                      shapes=[_cpu_gpu(dict(g.resources)) for g in config.node_group_configs if g.max_count != 0],
                      source="the autoscaler's node types (published)")
    bootstrap = os.path.expanduser(BOOTSTRAP_CONFIG)
    if os.path.isfile(bootstrap):
        import yaml

        with open(bootstrap) as fh:
            return _from_node_types(now, shapes_now, yaml.safe_load(fh) or {},
                                    f"the autoscaler's node types in {BOOTSTRAP_CONFIG}")
    from raydist.ray_edge import autoscaler

    kuberay = autoscaler.kuberay_autoscaling_config()
    if kuberay.config:
        return _from_node_types(now, shapes_now, kuberay.config, "the node types of this pod's RayCluster (KubeRay)")
    if kuberay.autoscales is False:
        return fixed(f"current resources ({kuberay.why})")
    state = autoscaler.read_state(ray.get_runtime_context().gcs_address)
    if state:  # an autoscaler that publishes none of its node types: what it can add is unknown, not none
        why = "" if kuberay.why == "not in a KubeRay pod" else f"; {kuberay.why}"
        return Capacity(**now, max_cpus=math.inf, max_gpus=math.inf, max_nodes=math.inf,
                        source=f"an autoscaler ({state.kind}) that publishes no node types: limit unknown{why}",
                        autoscaler=state.kind)
    return fixed("current resources (no autoscaler reports to the cluster)")


def _from_node_types(now: dict, shapes_now: list, config: dict, source: str) -> Capacity:
    types, most = node_types(config), config.get("max_workers")
    workers = [t for t in types if t.max_count > t.head]
    # A type whose resources the file leaves to the provider: its nodes' size is not known here.
    shapes = None if any(not t.resources for t in workers) else [_cpu_gpu(t.resources) for t in workers]
    return _grown(now, shapes_now, grow_to(types, most), max_nodes=1 + max_worker_nodes(types, most), shapes=shapes,
                  source=source)


def _grown(now: dict, shapes_now: list, limit: dict, *, max_nodes: float, shapes: Optional[list],
           source: str) -> Capacity:
    # Node types whose resources nobody listed add nothing known: never report less than there is now.
    return Capacity(**now, max_cpus=max(now["cpus"], float(limit.get("CPU", 0))),
                    max_gpus=max(now["gpus"], float(limit.get("GPU", 0))), max_nodes=max(now["nodes"], max_nodes),
                    source=source, node_shapes=() if shapes is None else tuple(shapes_now + shapes))


def _cpu_gpu(resources: dict) -> dict:
    return {"CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0))}


def check_worker_fits_a_node(cap: Capacity, *, cpus_per_worker: float, gpus_per_worker: float,
                             names: str = "--cpus-per-worker, --gpus-per-worker") -> None:
    """One worker must fit one node: a worker larger than every node the cluster has or can add would wait
    forever for a placement that cannot happen (the totals may still be large enough)."""
    if not cap.node_shapes:  # an autoscaler whose node types are unknown: nothing is certain
        return
    if any(s["CPU"] + 1e-9 >= cpus_per_worker and s["GPU"] + 1e-9 >= gpus_per_worker for s in cap.node_shapes):
        return
    shapes = sorted({(s["CPU"], s["GPU"]) for s in cap.node_shapes}, reverse=True)
    kind = "any node the cluster has or its autoscaler can add" if cap.autoscaling else "any node of the cluster"
    nodes = "; ".join(f"{_count(c, 'CPU')}, {_count(g, 'GPU')}" for c, g in shapes)
    raise ConfigError(f"one worker asks for {_count(cpus_per_worker, 'CPU')} and {_count(gpus_per_worker, 'GPU')} "
                      f"({names}), more than {kind} holds (nodes: {nodes}); lower them")


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
                    f"and {cap.grows_to(most)}")
    return None


def plan_run(*, use_gpu: Optional[bool], num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
             storage_path: Optional[str], wait_for_workers_s: Optional[float] = None) -> bool:
    """Checks on the connected cluster before a run starts; returns use_gpu. ConfigError if the run cannot
    fit the cluster at its largest, or its storage is a local path not every node can see (storage_path
    None: checked already, e.g. by the study a trial belongs to). Says when it must wait for new nodes and,
    given `wait_for_workers_s`, waits for them that long at most (ConfigError naming what never came)."""
    cap = capacity()
    if use_gpu is None and not cap.limit_known:
        raise ConfigError(f"the cluster's autoscaler ({cap.autoscaler}) does not say whether it can add GPU nodes: "
                          f"pass --use-gpu or --no-use-gpu")
    use_gpu = check_resources(cluster_cpus=cap.max_cpus, cluster_gpus=cap.max_gpus, use_gpu=use_gpu,
                              num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                              gpus_per_worker=gpus_per_worker, where=cap.where)
    gpus = gpus_per_worker if use_gpu else 0.0
    check_worker_fits_a_node(cap, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus)
    if storage_path is not None:
        check_storage(storage_path, cap)
    if cap.autoscaling:
        # Ray Train's own wait for its workers' placement: past our wait, the nodes are up (or the run ended).
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", AUTOSCALING_START_TIMEOUT_S)
    line = waiting_line(cap, who="the run needs", cpus=num_workers * cpus_per_worker, gpus=num_workers * gpus,
                        workers=num_workers)
    if line:
        print(line, flush=True)
        if wait_for_workers_s is not None:
            from raydist.ray_edge.autoscaler import wait_for_bundles

            waited = wait_for_bundles([{"CPU": cpus_per_worker, "GPU": gpus}] * num_workers,
                                      timeout_s=wait_for_workers_s, who="the run needs")
            print(f"the autoscaler added what the run needs in {waited:.0f} s", flush=True)
    return use_gpu


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
