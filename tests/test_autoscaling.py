"""Autoscaling from zero, on a real autoscaling Ray cluster on this machine (tests/clusters.py): a head
with no CPUs, a 2-CPU node type and a node type with (logical) GPUs, both at min_workers 0, started and
stopped by the autoscaler as the work asks, idle nodes removed after 6 s.

What the cluster can grow to comes from the node types `python -m raydist.cluster publish` puts into the
cluster; without them the cluster is fixed and today's one-line refusal stands. A training run and a
study are accepted while the cluster has no worker node, say that they wait, start nodes, finish, and the
nodes go away again; on the GPU node type the planning is checked up to the GPU node starting (no CUDA
here to train on it). A local --storage-path that not every node is known to see is refused.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from clusters import FakeAutoscalingCluster, wait_for

from raydist.errors import ConfigError
from raydist.ray_edge import planning, status

WORKER_TYPES = {
    "cpu2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    "gpu1": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
}
GROWS_TO = "CPU 6, GPU 2"  # 2 x cpu2 + 2 x gpu1
NOT_SHARED_OK = {planning.SHARED_STORAGE_ENV: "1"}  # a local folder, declared shared (on one machine it is)

SMALL_STUDY = """
num_samples: 2
search: {algorithm: random, seed: 0}
scheduler: {type: fifo}
fixed: {dataset: digits, model: resnet8, num_workers: 1, use_gpu: false, epochs: 2, warmup_epochs: 0, batch_size: 32}
searched:
  lr: {loguniform: [1.0, 3.0]}
"""


# ---- the cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """The autoscaling cluster, joined by this test process; nothing published yet."""
    import ray

    handle = FakeAutoscalingCluster(WORKER_TYPES, folder=tmp_path_factory.mktemp("fake-cluster"))
    handle.start()
    try:
        ray.init(address=handle.address, logging_level="WARNING")
        yield handle
    finally:
        ray.shutdown()  # later tests join the session's cluster
        handle.stop()
        assert not handle.own_pids(), "a process of the fake cluster outlived it"


def _workers_alive():
    import ray

    return [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]


def _workers_ever():
    import ray

    return [n for n in ray.nodes() if n["Resources"].get("CPU") or n["Resources"].get("GPU")]


def _no_worker_nodes(timeout=90):
    wait_for(lambda: not _workers_alive(), timeout, "the idle worker nodes to be removed")


def _unpublish():
    from ray.experimental.internal_kv import _internal_kv_del

    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE

    _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)


@pytest.fixture
def published(fake):
    """The node types published, as the head's start command in cluster.yaml does."""
    config_file = fake.folder / "published.yaml"
    config_file.write_text(yaml.safe_dump(fake.config))
    result = subprocess.run([sys.executable, "-m", "raydist.cluster", "publish", str(config_file),
                             "--address", fake.address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"published 3 node types; the cluster can grow to {GROWS_TO}"
    return fake


def _cli(module, fake, *args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", module, "--address", fake.address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


# ---- tests on that cluster --------------------------------------------------------------------------------


@pytest.mark.own_cluster
def test_without_published_node_types_the_cluster_is_fixed_and_the_run_refused_in_one_line(fake, tmp_path):
    _unpublish()
    # HOME: no ~/ray_bootstrap_config.yaml (what `ray up` leaves on a head node) to fall back on either.
    proc = _cli("raydist.train", fake, "--num-workers", "2", "--no-use-gpu", "--storage-path", str(tmp_path),
                env={"HOME": str(tmp_path)})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1] == ("raydist.train: error: --num-workers 2 x --cpus-per-worker 1 asks for "
                                            "2 CPUs but the cluster has 0; lower either")


@pytest.mark.own_cluster
def test_published_node_types_give_what_the_cluster_can_grow_to(published):
    cap = planning.capacity()
    assert (cap.cpus, cap.gpus, cap.nodes) == (0, 0, 1)
    assert (cap.max_cpus, cap.max_gpus, cap.max_nodes) == (6, 2, 5) and cap.autoscaling
    assert cap.where == "the cluster at its largest"
    result = subprocess.run([sys.executable, "-m", "raydist.cluster", "status", "--address", published.address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 node(s), CPU 0 free of 0, GPU 0 free of 0" in result.stdout
    assert f"can grow to: {GROWS_TO}  (from the autoscaler's node types (published))" in result.stdout
    assert "nodes starting: none" in result.stdout


@pytest.mark.own_cluster
def test_a_local_storage_path_no_worker_node_can_check_yet_is_refused_in_one_line(published, tmp_path):
    _no_worker_nodes()
    proc = _cli("raydist.train", published, "--num-workers", "2", "--no-use-gpu", "--storage-path", str(tmp_path))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1] == (
        f"raydist.train: error: --storage-path {tmp_path} is a local path and the cluster adds worker nodes that "
        f"cannot be checked yet (none is up): use s3://BUCKET/..., gs://BUCKET/... or a folder every node mounts "
        f"at the same path (if {tmp_path} is one, set RAYDIST_SHARED_STORAGE=1)")
    assert not _workers_alive()  # refused before any request reached the autoscaler


@pytest.mark.own_cluster
def test_a_training_run_waits_for_nodes_scales_up_from_zero_finishes_and_the_nodes_go(published, tmp_path):
    _no_worker_nodes()
    before = {n["NodeID"] for n in _workers_ever()}
    proc = _cli("raydist.train", published, "--num-workers", "2", "--no-use-gpu", "--batch-size", "32",
                "--lr", "3.0", "--epochs", "6", "--warmup-epochs", "0.5", "--storage-path", str(tmp_path / "runs"),
                "--name", "scaled", env=NOT_SHARED_OK)
    seen_starting, joined = set(), {}
    while proc.poll() is None:  # what `raydist.cluster status` lists under "nodes starting"
        seen_starting.update(status.autoscaler_activity(published.address))
        # Read while they are alive: a removed node keeps no resources in ray.nodes(), and the idle ones go 6 s
        # after the run ends, which on a slow machine is before the run's process has exited.
        joined.update((n["NodeID"], n["Resources"].get("CPU")) for n in _workers_alive() if n["NodeID"] not in before)
        time.sleep(0.3)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-5000:]
    assert ("waiting for the autoscaler: the run needs 2 workers (2 CPUs), the cluster has 0 CPUs free now and "
            "can grow to 6") in out
    assert "RAYDIST_SHARED_STORAGE=1" in out  # the warning that storage was assumed shared
    accuracy = float(re.search(r"finished 6 epoch\(s\) in [\d.]+s: val acc ([\d.]+)%", out).group(1))
    assert accuracy >= 85.0
    assert (tmp_path / "runs" / "scaled" / "model_final.pt").is_file()
    assert set(joined.values()) == {2.0}, joined  # cpu2 nodes, not the GPU type
    assert any("cpu2" in line for line in seen_starting), seen_starting
    _no_worker_nodes()  # idle for 6 s: removed


@pytest.mark.own_cluster
def test_an_elastic_run_starts_when_the_first_node_is_up_and_grows_as_the_autoscaler_adds_nodes(published, tmp_path):
    _no_worker_nodes()
    proc = _cli("raydist.train", published, "--num-workers", "1-4", "--no-use-gpu", "--batch-size", "32",
                "--global-batch", "128", "--lr", "0.4", "--epochs", "10", "--resize-check-s", "2",
                "--storage-path", str(tmp_path / "runs"), "--name", "elastic", env=NOT_SHARED_OK)
    out, _ = proc.communicate(timeout=800)
    assert proc.returncode == 0, out[-5000:]
    assert ("waiting for the autoscaler: the run needs 1 worker (1 CPU), the cluster has 0 CPUs free now and "
            "can grow to 6") in out  # it waits for its minimum, not for all 4
    starts = [int(n) for n in re.findall(r"elastic: starting on (\d+) worker\(s\) \(between 1 and 4\)", out)]
    history = [json.loads(line) for line in open(tmp_path / "runs" / "elastic" / "history.jsonl")]
    assert history[-1]["world_size"] == 4 and [r["epoch"] for r in history] == list(range(1, 11))
    if starts[0] < 4:  # the autoscaler's second node came after the group had started on the first
        # A grow after the first checkpoint continues from it; one before (CI, 2026-12-03: started on 2) has
        # nothing to continue from and starts the run again on 4.
        grown = re.search(r"worker\(s\) joined: continuing on 4 workers at epoch \d+, step 0/\d+", out)
        assert grown or starts[-1] == 4, out[-3000:]
    assert {r["global_batch"] for r in history} == {128}  # the same optimisation on every worker count
    accuracy = float(re.search(r"finished 10 epoch\(s\) in [\d.]+s: val acc ([\d.]+)%", out).group(1))
    assert accuracy >= 85.0
    _no_worker_nodes()


@pytest.mark.own_cluster
def test_the_shared_storage_check_reads_the_marker_on_every_node(published, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    _no_worker_nodes()  # none left by an earlier test: the group below adds exactly one
    # A placement group, not request_resources(): Ray Train's elastic runs start Ray's detached
    # AutoscalingCoordinator, which rewrites the cluster's request_resources() every 20 s with its own
    # (empty) requests, so a request made here can vanish before the autoscaler reads it (seen: a 60 s
    # wait for a node that was never asked for). A pending group is demand the autoscaler always sees,
    # and its reserved CPUs keep the node from idling away while the zero-CPU probe tasks run.
    group = placement_group([{"CPU": 2}])
    try:
        ray.get(group.ready(), timeout=120)
        cap = planning.capacity()
        assert cap.nodes == 2
        seen = planning.probe_shared_path(str(tmp_path / "shared"))
        assert seen == {n["NodeID"]: True for n in ray.nodes() if n["Alive"]}  # head + worker
        planning.check_storage(str(tmp_path / "shared"), cap)  # no error: seen by two nodes, no override needed
        assert not [p for p in (tmp_path / "shared").iterdir()]  # the marker is removed
    finally:
        remove_placement_group(group)
    _no_worker_nodes()


@pytest.mark.own_cluster
def test_a_study_is_planned_at_the_clusters_largest_and_finishes(published, tmp_path):
    _no_worker_nodes()
    (tmp_path / "small.yaml").write_text(SMALL_STUDY)
    proc = _cli("raydist.tune", published, "--search-space", str(tmp_path / "small.yaml"), "--storage-path",
                str(tmp_path / "runs"), "--name", "grow", env=NOT_SHARED_OK)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    assert "2 at once" in out  # from what it can grow to (6 CPUs), not the 0 free at its start
    assert ("waiting for the autoscaler: 2 trials at once need 2 CPUs, the cluster has 0 CPUs free now and can "
            "grow to 6") in out
    with open(tmp_path / "runs" / "grow" / "results.csv") as fh:
        rows = fh.read().splitlines()[1:]
    assert len(rows) == 2


@pytest.mark.own_cluster
def test_gpu_use_comes_from_what_the_cluster_can_grow_to_and_a_gpu_node_starts(published, tmp_path):
    _no_worker_nodes()
    proc = _cli("raydist.train", published, "--num-workers", "1", "--storage-path", str(tmp_path / "runs"),
                env=NOT_SHARED_OK)
    try:
        lines = []
        for line in proc.stdout:  # use_gpu unset: resolved from the GPUs the cluster can grow to
            lines.append(line)
            if line.startswith("waiting for the autoscaler"):
                break
        assert lines and lines[-1].strip() == ("waiting for the autoscaler: the run needs 1 GPU worker (1 GPU), the "
                                               "cluster has 0 GPUs free now and can grow to 2"), "".join(lines)[-3000:]
        # Ray Train's placement group for {CPU: 1, GPU: 1} reaches the autoscaler, which starts a gpu1 node.
        node = wait_for(lambda: [n for n in _workers_alive() if n["Resources"].get("GPU")], 120, "a GPU node")
        assert node[0]["Resources"]["GPU"] == 1.0
    finally:
        proc.kill()  # no CUDA here to train on it
        proc.wait(30)
    # (The GPU node stays up to 3 minutes after this: Ray Train also registers its workers' resources with
    # Ray's detached autoscaling coordinator, a request that a killed driver leaves to expire after 180 s.)


# ---- the decisions, without a cluster ---------------------------------------------------------------------


def test_storage_verdict():
    path = "/data/runs"
    error, _ = planning.storage_verdict(path, seen={"aa": True, "bb": False}, can_grow=False, assume_shared=True)
    assert error.startswith(f"--storage-path {path} is not shared: node bb cannot see it (1 of 2 node(s) cannot)")
    verdict = planning.storage_verdict(path, seen={"aa": True, "bb": True}, can_grow=True, assume_shared=False)
    assert verdict == (None, None)
    error, _ = planning.storage_verdict(path, seen={"aa": True}, can_grow=True, assume_shared=False)
    assert "none is up" in error and f"set {planning.SHARED_STORAGE_ENV}=1" in error and "\n" not in error
    error, warning = planning.storage_verdict(path, seen={"aa": True, "bb": None}, can_grow=True, assume_shared=True)
    assert error is None and "seen by 1 node(s) only" in warning
    error, _ = planning.storage_verdict(path, seen={"aa": True, "bb": True, "cc": None}, can_grow=False,
                                  assume_shared=False)
    assert "node cc did not answer the check that it sees it (in 60 s)" in error
    assert planning.storage_verdict("/x", seen={"aa": True}, can_grow=False, assume_shared=False) == (None, None)
    assert planning.is_local_path("file:///mnt/x") and planning.is_local_path("./runs")
    assert not planning.is_local_path("s3://b/x")


def test_grow_to_counts_the_largest_nodes_within_max_workers():
    config = {"max_workers": 4, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}},
        "a10g": {"resources": {"CPU": 48, "GPU": 4}, "min_workers": 0, "max_workers": 4},
        "h100": {"resources": {"CPU": 192, "GPU": 8}, "min_workers": 0, "max_workers": 1}}}
    types = planning.node_types(config)
    assert planning.grow_to(types, config["max_workers"]) == {"CPU": 336, "GPU": 20}  # 1 x h100 + 3 x a10g
    assert planning.grow_to(types) == {"CPU": 384, "GPU": 24}
    # Ray's local provider: one node type for the head and the workers.
    local = planning.node_types({"head_node_type": "n", "available_node_types": {
        "n": {"resources": {"CPU": 8}, "min_workers": 2, "max_workers": 2}}})
    assert planning.grow_to(local) == {"CPU": 24} and planning.max_worker_nodes(local) == 2


def test_waiting_line_only_when_the_run_must_wait():
    cap = planning.Capacity(cpus=4, gpus=0, free_cpus=4, free_gpus=0, nodes=2, max_cpus=100, max_gpus=8, max_nodes=5,
                      source="test")
    assert planning.waiting_line(cap, who="the run needs", cpus=2, gpus=0, workers=2) is None
    assert planning.waiting_line(cap, who="the run needs", cpus=2, gpus=2, workers=2) == (
        "waiting for the autoscaler: the run needs 2 GPU workers (2 GPUs), the cluster has 0 GPUs free now and "
        "can grow to 8")
    fixed = planning.Capacity(cpus=4, gpus=0, free_cpus=0, free_gpus=0, nodes=1, max_cpus=4, max_gpus=0, max_nodes=1,
                        source="test")
    assert not fixed.autoscaling and planning.waiting_line(fixed, who="x", cpus=4, gpus=0) is None


def test_a_run_that_must_wait_says_so_and_gives_ray_train_time_for_nodes_to_boot(monkeypatch, capsys):
    cap = planning.Capacity(cpus=0, gpus=0, free_cpus=0, free_gpus=0, nodes=1, max_cpus=336, max_gpus=20,
                            max_nodes=5, source="test")
    monkeypatch.setattr(planning, "capacity", lambda: cap)
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    plan = dict(num_workers=8, cpus_per_worker=4, gpus_per_worker=1, storage_path=None)
    assert planning.plan_run(use_gpu=None, **plan) is True  # GPUs the cluster can grow to
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "900"  # Ray's 60 s: a retry a minute
    assert capsys.readouterr().out == ("waiting for the autoscaler: the run needs 8 GPU workers (8 GPUs), the "
                                       "cluster has 0 GPUs free now and can grow to 20\n")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    planning.plan_run(use_gpu=True, **plan)
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "60"  # the user's own value stands
    with pytest.raises(ConfigError, match=r"asks for 24 GPUs but the cluster at its largest has 20; "):
        planning.plan_run(use_gpu=True, **{**plan, "num_workers": 24})
