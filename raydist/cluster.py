"""Connect to a Ray cluster, or start a local one with its dashboard; check that a run's resources exist.

    from raydist.cluster import plan_resources, connect
    gpus = plan_resources(address=None, use_gpu=None, num_workers=2, gpus_per_worker=1, cpus_per_worker=1)
    connect(None)                                  # starts a local cluster, dashboard on 127.0.0.1

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
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
        if context.dashboard_url:
            print(f"started a local Ray cluster; dashboard: http://{context.dashboard_url}", flush=True)
    else:
        ray.init(address=address, logging_level=logging.WARNING)


def cluster_totals() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)
