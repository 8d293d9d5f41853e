"""The cluster's autoscaler, wherever Ray exposes it: which one runs (Ray's v2 autoscaler reports its state
to the GCS; the v1 monitor writes a report into Ray's key-value store every few seconds), what it is doing
(nodes launching, starting, failed; requests it says no node type can hold), the node types of a KubeRay
RayCluster (read from Kubernetes as KubeRay's autoscaler reads them), and a bounded wait for it to add what
a run needs.

    state = read_state(gcs_address)         # state.kind: "v2", "v1" or "" (no autoscaler reports)
    wait_for_bundles([{"CPU": 1}] * 2, timeout_s=900, who="the run needs")   # on the connected cluster
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Optional

from raydist.errors import ConfigError

V1_REPORT_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS: the v1 monitor's report
V1_FRESH_S = 120.0  # the monitor writes every few seconds; an older report is from a monitor that is gone
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # a Kubernetes pod's own credentials


@dataclasses.dataclass(frozen=True)
class AutoscalerState:
    kind: str  # "v2", "v1", or "" when no autoscaler reports to this cluster (a fixed cluster)
    activity: tuple = ()  # lines: nodes launching, starting, launches that failed
    infeasible: tuple = ()  # resource bundles the autoscaler says no node type can hold (v2 reports them)

    def __bool__(self) -> bool:
        return bool(self.kind)


def read_state(gcs_address: str) -> AutoscalerState:
    """The autoscaler of the connected cluster: the v2 autoscaler's state (the GCS holds it when one has
    reported), else the v1 monitor's report when it is fresh; neither when it is Ray's read-only stand-in
    (`_read_only`), which every cluster started without an autoscaling config runs."""
    from ray._raylet import GcsClient  # RAY (internal): the GCS's own status reply, infeasible requests included
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    if is_autoscaler_v2(fetch_from_server=True):
        try:
            reply = GetClusterStatusReply()
            reply.ParseFromString(GcsClient(address=gcs_address).get_cluster_status())
            activity = _v2_activity(gcs_address)
        except Exception:  # noqa: BLE001 - a GCS that does not answer it: no autoscaler known (a fixed cluster)
            return AutoscalerState("")
        state = reply.autoscaling_state
        types = [n.ray_node_type_name for n in reply.cluster_resource_state.node_states]
        if state.autoscaler_state_version > 0 and not _read_only(types):
            # A placement group's bundles are a gang request; single tasks and actors are plain requests.
            requests = [*state.infeasible_resource_requests,
                        *(r for gang in state.infeasible_gang_resource_requests for r in gang.requests)]
            return AutoscalerState("v2", tuple(activity), tuple(
                {k: float(v) for k, v in r.resources_bundle.items()} for r in requests))
    report = _v1_report()
    summary = (report or {}).get("autoscaler_report") or {}
    if summary and time.time() - report.get("time", 0) < V1_FRESH_S and not _read_only(summary.get("active_nodes")):
        return AutoscalerState("v1", tuple(_v1_activity(summary)))
    return AutoscalerState("")


READ_ONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")  # Ray's format_readonly_node_type: "node_" + the node's id


def _read_only(node_types) -> bool:
    """A cluster started without an autoscaling config still runs Ray's monitor, with a read-only stand-in
    for an autoscaler that gives each node a type of its own, named after its id (v1 always, v2 where the
    node has no type name); a real autoscaler's node types have the names of its config."""
    names = [name for name in node_types or [] if name]
    return not names or all(READ_ONLY_TYPE.fullmatch(name) for name in names)


def _v1_report() -> Optional[dict]:
    from ray.experimental.internal_kv import _internal_kv_get  # RAY (internal)

    raw = _internal_kv_get(V1_REPORT_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _v2_activity(gcs_address: str) -> list[str]:
    from ray.autoscaler.v2.sdk import get_cluster_status

    state = get_cluster_status(gcs_address)
    return ([f"launching {r.count} x {r.ray_node_type_name} ({r.instance_type_name}, {r.state})"
             for r in state.pending_launches]
            + [f"starting {n.ray_node_type_name} {n.instance_id} ({n.node_status}"
               f"{': ' + n.details if n.details else ''})" for n in state.pending_nodes]
            + [f"failed to launch {r.count} x {r.ray_node_type_name}: {r.details}" for r in state.failed_launches])


def _v1_activity(report: dict) -> list[str]:
    return ([f"launching {count} x {node_type}" for node_type, count in (report.get("pending_launches") or {}).items()]
            + [f"starting {node_type} {ip} ({state})" for ip, node_type, state in report.get("pending_nodes") or []]
            + [f"failed {node_type} {ip}" for ip, node_type in report.get("failed_nodes") or []])


# ---- KubeRay ----------------------------------------------------------------------------------------------


def kuberay_cluster() -> Optional[tuple[str, str]]:
    """(name, namespace) of the RayCluster this process runs in, or None: KubeRay sets RAY_CLUSTER_NAME in
    every Ray container, and a pod's namespace is its service account's."""
    name = os.environ.get("RAY_CLUSTER_NAME")
    try:
        with open(os.path.join(SERVICE_ACCOUNT, "namespace")) as fh:
            namespace = fh.read().strip()
    except OSError:
        return None
    return (name, namespace) if name and namespace else None


@dataclasses.dataclass(frozen=True)
class KubeRayReading:
    config: Optional[dict]  # the autoscaler config KubeRay's autoscaler derives from the RayCluster
    autoscales: Optional[bool]  # None: not known (not in a KubeRay pod, or the resource could not be read)
    why: str  # where config is None: why, in a few words


def kuberay_autoscaling_config() -> KubeRayReading:
    """This pod's RayCluster as KubeRay's autoscaler sees it, read from the Kubernetes API with the pod's
    service account (KubeRay gives the head pod's account `get` on its RayCluster; the autoscaler, a
    container of that pod, reads it the same way). A RayCluster without in-tree autoscaling is a fixed
    cluster (autoscales False): its head still runs Ray's v2 monitor, whose reports look like an autoscaler's."""
    where = kuberay_cluster()
    if where is None:
        return KubeRayReading(None, None, "not in a KubeRay pod")
    name, namespace = where
    try:
        from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient  # RAY (internal)

        resource = KubernetesHttpApiClient(namespace).get(f"rayclusters/{name}")
    except Exception as exc:  # noqa: BLE001 - no RBAC for rayclusters, no API, no `requests`: limit unknown
        detail = " ".join(str(exc).split())[:120]
        return KubeRayReading(None, None, f"RayCluster {namespace}/{name} could not be read "
                                          f"({type(exc).__name__}: {detail})")
    if not resource.get("spec", {}).get("enableInTreeAutoscaling"):
        return KubeRayReading(None, False, f"RayCluster {namespace}/{name} does not autoscale")
    return KubeRayReading(raycluster_autoscaling_config(resource), True, "")


def raycluster_autoscaling_config(resource: dict) -> dict:
    """A RayCluster (the custom resource, as a dict) as the autoscaler config KubeRay's autoscaler works
    from: its node types, with the resources Ray derives from each group's rayStartParams and container
    limits, and maxReplicas as each type's max_workers."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (  # RAY (internal): KubeRay's own reading
        _derive_autoscaling_config_from_ray_cr,
    )

    metadata = {"namespace": "default", **resource.get("metadata", {})}  # a manifest may leave it to kubectl
    return _derive_autoscaling_config_from_ray_cr({**resource, "metadata": metadata})


# ---- waiting for the autoscaler ----------------------------------------------------------------------------


POLL_S = 1.0


def wait_for_bundles(bundles: list[dict], *, timeout_s: float, who: str) -> float:
    """Ask the autoscaler for `bundles` (a placement group shaped as the run's workers, packed as Ray
    Train packs them) and wait until the cluster holds them, at most `timeout_s`. The group is removed
    before returning, whatever happens: the run's own group takes its place (nodes stay up for the
    autoscaler's idle timeout). On the connected cluster; returns the seconds waited. ConfigError, one line, when the wait ends
    without them or the autoscaler says no node type can hold one (`who`: 'the run needs 2 workers')."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    gcs_address = ray.get_runtime_context().gcs_address
    wanted = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    group = placement_group(wanted, strategy="PACK")
    start, placed = time.monotonic(), group.ready()
    try:
        while True:
            ready, _ = ray.wait([placed], timeout=POLL_S)
            if ready:
                return time.monotonic() - start
            state = read_state(gcs_address)
            impossible = [b for b in state.infeasible if b in wanted]
            if impossible:
                raise ConfigError(f"the autoscaler ({state.kind}) has no node type that can hold "
                                  f"{_shape(impossible[0])}, which {who} per worker; lower the per-worker resources")
            if time.monotonic() - start >= timeout_s:
                raise ConfigError(_gave_up_line(who, wanted, timeout_s, state))
    finally:
        remove_placement_group(group)


def _shape(bundle: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def _gave_up_line(who: str, wanted: list[dict], timeout_s: float, state: AutoscalerState) -> str:
    import ray

    free = ray.available_resources()
    shapes = sorted({_shape(b) for b in wanted})
    # A cloud's launch error can run over several lines: one line, shortened, per activity.
    doing = "; ".join(" ".join(a.split())[:200] for a in state.activity) or "it started no node for it"
    return (f"waited {timeout_s:g} s (--wait-for-workers-s) and the autoscaler did not add what {who} "
            f"({len(wanted)} x {' + '.join(shapes)}): the cluster has {free.get('CPU', 0.0):g} CPUs and "
            f"{free.get('GPU', 0.0):g} GPUs free; the autoscaler: {doing}")
