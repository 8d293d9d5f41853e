"""Shared fixtures. One real Ray cluster per test session (with its dashboard), started and stopped here."""

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs, dashboard on a free loopback port); yields its address."""
    from raydist.cluster import CLUSTER_ENV

    for key, value in CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=_free_port(), logging_level="WARNING")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()  # stops the processes this ray.init started, and only those


@pytest.fixture
def run_root(tmp_path):
    return str(tmp_path / "runs")
