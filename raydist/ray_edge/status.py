"""What runs on a cluster: the studies drivers publish (Ray's key-value store) and `raydist.cluster
status`'s report (with the autoscaler's activity, from raydist.ray_edge.autoscaler); and Ray Train's
autoscaling requests given back when a run or study is interrupted.
"""

from __future__ import annotations

import logging
from typing import Optional

from raydist.ray_edge import autoscaler
from raydist.ray_edge.planning import capacity
from raydist.ray_edge.session import START_HEAD, auth_headers, check_reachable, dashboard_get, token_path

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
    if not cap.limit_known:
        lines.append(f"can grow to: unknown  (from {cap.source})")
    elif cap.autoscaling:
        lines.append(f"can grow to: CPU {cap.max_cpus:g}, GPU {cap.max_gpus:g}  (from {cap.source})")
    else:
        lines.append(f"can grow to: no more (from {cap.source})")
    activity = autoscaler.read_state(gcs).activity
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


def give_back_requests(run_name: str) -> None:
    """What the interrupted run still asks of Ray's autoscaling coordinator (Ray would keep it for 180 s)."""
    import ray

    if ray.is_initialized():
        try:
            release_train_requests({run_name})
        except Exception:  # noqa: BLE001 - Ray drops the request within 180 s anyway
            pass
