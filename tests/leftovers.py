"""What each test leaves holding resources on the session cluster, and which test left it.

After every test that used the session cluster, conftest asks the cluster what is still held: placement
groups that are not removed (a lone actor holding a CPU shows as CPUs not free in the wait). Each
thing is charged to the first test after which it was seen. A test that needs the cluster whole waits a
bounded time for it (`wait_for_free_cluster`) and, when it is not, fails naming what is held and the test
that left it, so that a leak is reported where it starts and not where it happens to be met.

Ray removes a finished run's group asynchronously, so something seen right after a test may be gone a
second later: only what outlives the wait is a leak, and the charge says where it came from.
"""

from __future__ import annotations

import time

# How long Ray may take to give everything back once a run or study has ended, on every path raydist
# controls or that Ray's own job cleanup covers (docs/reliability.md has the measured times; the slowest,
# a study's Ctrl+C, took 12.8 s). A wait longer than this is a leak, not a slow machine.
CLEANUP_PROMISE_S = 60.0


class Ledger:
    def __init__(self):
        self.first_seen: dict[str, str] = {}  # key -> nodeid of the test after which it was first seen held

    def held(self) -> dict[str, str]:
        """What the connected cluster holds now: key -> one-line description."""
        from ray.util import placement_group_table

        held = {}
        for pg_id, pg in placement_group_table().items():
            if pg["state"] != "REMOVED":
                bundles = list(pg["bundles"].values())
                held[f"pg:{pg_id}"] = f"placement group {pg_id[:12]} {bundles} {pg['strategy']} {pg['state']}"
        return held

    def after_test(self, nodeid: str) -> None:
        for key in self.held():
            self.first_seen.setdefault(key, nodeid)

    def blame(self, held: dict[str, str]) -> str:
        lines = []
        for key, text in held.items():
            origin = self.first_seen.get(key)
            where = f"left by {origin}" if origin else "made while the current test ran, or before any test ended"
            lines.append(f"{text}, {where}{_creator(key)}")
        return "; ".join(lines)


LEDGER = Ledger()


def _creator(key: str) -> str:
    """Who made a placement group (its job, with the job's driver pid and entry point, and the actor that
    asked for it), from the GCS record: which process is responsible, beyond which test."""
    if not key.startswith("pg:"):
        return ""
    try:
        import ray
        from ray._private.state import state  # RAY (internal): the public table drops the creator fields
        from ray.core.generated import gcs_pb2

        info = state._connect_and_get_accessor().get_placement_group_info(
            ray.PlacementGroupID(bytes.fromhex(key[3:])))
        pg = gcs_pb2.PlacementGroupTableData.FromString(info)
        job_id = pg.creator_job_id.hex()
        driver = ""
        from ray.util.state import list_jobs

        for job in list_jobs():
            if job.job_id == job_id and job.driver_info is not None:
                driver = f", driver pid {job.driver_info.pid} ({job.status}) {job.entrypoint or ''}".rstrip()
        actor = pg.creator_actor_id.hex()
        if actor:
            from ray.util.state import get_actor

            found = get_actor(actor)
            actor = f"{actor[:12]} {found.class_name if found else '?'} ({found.state if found else 'gone'})"
        return (f" [creator job {job_id}{driver}; creator actor {actor or '-'}; "
                f"job dead: {pg.creator_job_dead}, actor dead: {pg.creator_actor_dead}, detached: {pg.is_detached}]")
    except Exception as exc:  # noqa: BLE001 - the blame line must not hide the failure it explains
        return f" [creator unknown: {type(exc).__name__}: {exc}]"


def wait_for_free_cluster(timeout: float = CLEANUP_PROMISE_S, cpus: float = 2) -> float:
    """Wait until the session cluster holds no placement group and all its CPUs are free again; fail naming
    what is still held and the test that left it. Returns the seconds waited."""
    import ray

    t0 = time.monotonic()
    while True:
        held = LEDGER.held()
        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
        if not held and free == total == cpus:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the session cluster is not whole after {timeout:g} s ({free:g} of {total:g} "
                                 f"CPUs free): {LEDGER.blame(held) or 'no placement group held'}")
        time.sleep(0.5)
