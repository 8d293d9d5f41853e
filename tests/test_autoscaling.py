"""Autoscaling from zero, on a real autoscaling Ray cluster on this machine (tests/clusters.py): a head
with no CPUs, a 2-CPU node type and a node type with (logical) GPUs, both at min_workers 0, started and
stopped by the autoscaler as the work asks, idle nodes removed after 6 s.

First as KubeRay-like platforms start theirs: nothing published, no bootstrap file; the autoscaler is found
from its own report, its limit is unknown, and a run and a study wait for their nodes, get them and finish;
a wait for nodes that never come ends in one line. Then with the node types that `python -m raydist.cluster
publish` puts into the cluster: what it can grow to is known, a worker no node type holds is refused at
once, and a training run and a study are accepted while the cluster has no worker node, say that they
wait, start nodes, finish, and the nodes go away again; on the GPU node type the planning is checked up to
the GPU node starting (no CUDA here to train on it). A local --storage-path that not every node is known to
see is refused.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
from cli import without_ray_lines
import yaml
from clusters import FakeAutoscalingCluster, wait_for

from raydist.errors import ConfigError
from raydist.ray_edge import autoscaler, planning

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


def _small_study(fake, tmp_path, env):
    """SMALL_STUDY started from zero worker nodes, into tmp_path/runs/grow."""
    _no_worker_nodes()
    (tmp_path / "small.yaml").write_text(SMALL_STUDY)
    return _cli("raydist.tune", fake, "--search-space", str(tmp_path / "small.yaml"), "--storage-path",
                str(tmp_path / "runs"), "--name", "grow", env=env)


# ---- tests on that cluster --------------------------------------------------------------------------------


@pytest.fixture
def kuberay_like(fake, tmp_path):
    """The cluster as KubeRay-like platforms start theirs: an autoscaler runs, nothing published its node
    types, and the driver's node has no ~/ray_bootstrap_config.yaml (HOME below is an empty folder)."""
    _unpublish()
    assert not os.path.exists(os.path.expanduser(planning.BOOTSTRAP_CONFIG))
    # The monitor's first report comes once the raylets have sent it their load (seconds after the start).
    wait_for(lambda: autoscaler.read_state(fake.address).kind == "v1", 60, "the autoscaler's first report")
    return fake


def _joined_during(proc, fake) -> tuple[set, dict]:
    """Poll while `proc` runs: the autoscaler's activity lines seen, and the worker nodes that joined
    ({node id: CPUs}), read while they are alive (an idle node goes 6 s after the work ends)."""
    before = {n["NodeID"] for n in _workers_ever()}
    seen, joined = set(), {}
    while proc.poll() is None:
        seen.update(autoscaler.read_state(fake.address).activity)
        joined.update((n["NodeID"], n["Resources"].get("CPU")) for n in _workers_alive() if n["NodeID"] not in before)
        time.sleep(0.3)
    return seen, joined


@pytest.mark.own_cluster
def test_with_nothing_published_the_autoscaler_is_found_and_its_limit_is_unknown(kuberay_like, tmp_path,
                                                                                  monkeypatch):
    _no_worker_nodes()
    cap = planning.capacity()
    assert (cap.autoscaler, cap.cpus, cap.nodes, cap.limit_known, cap.autoscaling) == ("v1", 0, 1, False, True)
    assert cap.node_shapes == ()  # nothing known: no worker is certain not to fit
    monkeypatch.setenv(planning.FIXED_CLUSTER_ENV, "1")  # the user's word that it is fixed
    fixed = planning.capacity()
    assert (fixed.autoscaling, fixed.max_cpus, fixed.source) == (False, 0, "current resources (RAYDIST_FIXED_CLUSTER=1)")
    monkeypatch.delenv(planning.FIXED_CLUSTER_ENV)
    result = subprocess.run([sys.executable, "-m", "raydist.cluster", "status", "--address", kuberay_like.address],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("can grow to: unknown  (from an autoscaler (v1) that publishes no node types: limit unknown)"
            in result.stdout), result.stdout


@pytest.mark.own_cluster
def test_with_nothing_published_a_training_run_waits_for_the_autoscaler_and_finishes(kuberay_like, tmp_path):
    _no_worker_nodes()
    proc = _cli("raydist.train", kuberay_like, "--num-workers", "2", "--no-use-gpu", "--batch-size", "32",
                "--lr", "3.0", "--epochs", "6", "--warmup-epochs", "0.5", "--storage-path", str(tmp_path / "runs"),
                "--name", "unknown", env={**NOT_SHARED_OK, "HOME": str(tmp_path)})
    _, joined = _joined_during(proc, kuberay_like)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-5000:]
    assert ("waiting for the autoscaler: the run needs 2 workers (2 CPUs), the cluster has 0 CPUs free now and its "
            "autoscaler's limit is unknown\n") in out
    assert re.search(r"^the autoscaler added what the run needs in \d+ s$", out, re.M), out[-3000:]
    accuracy = float(re.search(r"finished 6 epoch\(s\) in [\d.]+s: val acc ([\d.]+)%", out).group(1))
    assert accuracy >= 85.0
    assert set(joined.values()) == {2.0}, joined  # the CPU node type, not the GPU one
    _no_worker_nodes()


@pytest.mark.own_cluster
def test_with_nothing_published_a_study_waits_for_its_first_trial_and_grows(kuberay_like, tmp_path):
    proc = _small_study(kuberay_like, tmp_path, env={**NOT_SHARED_OK, "HOME": str(tmp_path)})
    _, joined = _joined_during(proc, kuberay_like)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-5000:]
    assert "up to 2 at once as the autoscaler adds nodes" in out
    assert ("waiting for the autoscaler: the study's first trial needs 1 CPU, the cluster has 0 CPUs free now and "
            "its autoscaler's limit is unknown\n") in out
    with open(tmp_path / "runs" / "grow" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["finished", "finished"], rows
    assert max(float(r["best_val_acc"]) for r in rows) >= 0.5  # 2 epochs of resnet8 on digits
    assert set(joined.values()) == {2.0}, joined
    _no_worker_nodes()


@pytest.mark.own_cluster
def test_the_wait_for_nodes_that_never_come_ends_in_one_line_and_writes_nothing(kuberay_like, tmp_path):
    _no_worker_nodes()
    # 3 CPUs per worker: no node type holds one, which the autoscaler does not publish; the wait is the bound.
    proc = _cli("raydist.train", kuberay_like, "--num-workers", "1", "--no-use-gpu", "--cpus-per-worker", "3",
                "--wait-for-workers-s", "15", "--storage-path", str(tmp_path / "runs"),
                env={**NOT_SHARED_OK, "HOME": str(tmp_path)})
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1] == (
        "raydist.train: error: waited 15 s (--wait-for-workers-s) and the autoscaler did not add what the run needs "
        "(1 x {CPU: 3}): the cluster has 0 CPUs and 0 GPUs free; the autoscaler: it started no node for it")
    assert not list((tmp_path / "runs").iterdir())  # no run folder: refused before Ray Train started (the shared
    # storage check made the folder itself)


@pytest.mark.own_cluster
def test_a_studys_wait_for_nodes_that_never_come_ends_in_one_line_and_leaves_no_experiment(kuberay_like, tmp_path):
    _no_worker_nodes()
    (tmp_path / "small.yaml").write_text(SMALL_STUDY)
    proc = _cli("raydist.tune", kuberay_like, "--search-space", str(tmp_path / "small.yaml"), "--set",
                "cpus_per_worker=3", "--wait-for-workers-s", "5", "--storage-path", str(tmp_path / "runs"),
                "--name", "never", env={**NOT_SHARED_OK, "HOME": str(tmp_path)})
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1] == (
        "raydist.tune: error: waited 5 s (--wait-for-workers-s) and the autoscaler did not add what the study's "
        "first trial needs (1 x {CPU: 3}): the cluster has 0 CPUs and 0 GPUs free; the autoscaler: it started no "
        "node for it")
    assert not (tmp_path / "runs" / "never").exists()


@pytest.mark.own_cluster
def test_the_wait_removes_its_placement_group_whatever_happens(kuberay_like):
    import ray

    before = set(ray.util.placement_group_table())  # the groups of earlier tests' jobs, removed with them
    with pytest.raises(ConfigError, match=r"^waited 2 s \(--wait-for-workers-s\) and the autoscaler did not add "
                                          r"what the test needs \(2 x \{CPU: 3\}\)"):
        autoscaler.wait_for_bundles([{"CPU": 3, "GPU": 0}] * 2, timeout_s=2, who="the test needs")
    # This process's job lives on (a driver's groups go with its job): the wait itself removed the group.
    assert [g["state"] for key, g in ray.util.placement_group_table().items() if key not in before] == ["REMOVED"]


@pytest.mark.own_cluster
def test_published_node_types_refuse_a_worker_no_node_type_holds_at_once(published, tmp_path):
    proc = _cli("raydist.train", published, "--num-workers", "1", "--no-use-gpu", "--cpus-per-worker", "3",
                "--storage-path", str(tmp_path / "runs"), env=NOT_SHARED_OK)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1] == (
        "raydist.train: error: one worker asks for 3 CPUs and 0 GPUs (--cpus-per-worker, --gpus-per-worker), more "
        "than any node the cluster has or its autoscaler can add holds (nodes: 2 CPUs, 0 GPUs; 1 CPU, 1 GPU; "
        "0 CPUs, 0 GPUs); lower them")


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
    proc = _cli("raydist.train", published, "--num-workers", "2", "--no-use-gpu", "--batch-size", "32",
                "--lr", "3.0", "--epochs", "6", "--warmup-epochs", "0.5", "--storage-path", str(tmp_path / "runs"),
                "--name", "scaled", env=NOT_SHARED_OK)
    seen_starting, joined = _joined_during(proc, published)  # what `raydist.cluster status` lists as starting
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
    # --input-size 32: digits' 16 px default trains an epoch in a second here, which can end the run before
    # the autoscaler's later nodes join (CI, 2026-12-07: finished on 2); at 32 px the 10 epochs outlast them.
    proc = _cli("raydist.train", published, "--num-workers", "1-4", "--no-use-gpu", "--batch-size", "32",
                "--global-batch", "128", "--lr", "0.4", "--epochs", "10", "--resize-check-s", "2", "--input-size", "32",
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
    proc = _small_study(published, tmp_path, env=NOT_SHARED_OK)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    assert "2 at once" in out  # from what it can grow to (6 CPUs), not the 0 free at its start
    assert ("waiting for the autoscaler: the study's first trial needs 1 CPU, the cluster has 0 CPUs free now "
            "and can grow to 6\n") in out
    assert re.search(r"^the autoscaler added what the study's first trial needs in \d+ s$", out, re.M), out[-3000:]
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
    assert without_ray_lines(capsys.readouterr().out) == (
        "waiting for the autoscaler: the run needs 8 GPU workers (8 GPUs), the cluster has 0 GPUs free now and can "
        "grow to 20\n")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    planning.plan_run(use_gpu=True, **plan)
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "60"  # the user's own value stands
    with pytest.raises(ConfigError, match=r"asks for 24 GPUs but the cluster at its largest has 20; "):
        planning.plan_run(use_gpu=True, **{**plan, "num_workers": 24})


UNKNOWN = planning.Capacity(cpus=0, gpus=0, free_cpus=0, free_gpus=0, nodes=1, max_cpus=math.inf, max_gpus=math.inf,
                            max_nodes=math.inf, source="test", autoscaler="v1")


def test_an_unknown_limit_refuses_nothing_it_cannot_know_and_asks_whether_to_use_gpus(monkeypatch, capsys):
    monkeypatch.setattr(planning, "capacity", lambda: UNKNOWN)
    plan = dict(num_workers=64, cpus_per_worker=8, gpus_per_worker=1, storage_path=None)
    with pytest.raises(ConfigError, match=r"^the cluster's autoscaler \(v1\) does not say whether it can add GPU "
                                          r"nodes: pass --use-gpu or --no-use-gpu$"):
        planning.plan_run(use_gpu=None, **plan)
    assert planning.plan_run(use_gpu=True, **plan) is True  # 64 GPUs: nothing says the cluster cannot grow to them
    assert without_ray_lines(capsys.readouterr().out) == (
        "waiting for the autoscaler: the run needs 64 GPU workers (64 GPUs), the cluster has 0 GPUs free now and its "
        "autoscaler's limit is unknown\n")
    assert UNKNOWN.autoscaling and not UNKNOWN.limit_known


def test_a_worker_larger_than_every_node_is_refused_where_the_nodes_are_known():
    fixed = planning.Capacity(cpus=4, gpus=0, free_cpus=4, free_gpus=0, nodes=2, max_cpus=4, max_gpus=0, max_nodes=2,
                              source="test", node_shapes=({"CPU": 2.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 0.0}))
    planning.check_worker_fits_a_node(fixed, cpus_per_worker=2, gpus_per_worker=0)
    # 4 CPUs in all, but no node holds a 3-CPU worker: Ray Train would wait for it forever.
    with pytest.raises(ConfigError, match=r"^one worker asks for 3 CPUs and 0 GPUs \(--cpus-per-worker, "
                                          r"--gpus-per-worker\), more than any node of the cluster holds "
                                          r"\(nodes: 2 CPUs, 0 GPUs\); lower them$"):
        planning.check_worker_fits_a_node(fixed, cpus_per_worker=3, gpus_per_worker=0)
    planning.check_worker_fits_a_node(UNKNOWN, cpus_per_worker=300, gpus_per_worker=8)  # unknown: not refused


def test_a_growing_cluster_raises_the_searchers_concurrency(monkeypatch, tmp_path):
    import ray
    from ray.tune.search import Searcher

    from raydist.ray_edge import search
    from raydist.ray_edge.study import trials_that_fit_now
    from raydist.study.study_file import load_study

    (tmp_path / "small.yaml").write_text(SMALL_STUDY.replace("num_samples: 2", "num_samples: 8"))
    study = load_study(str(tmp_path / "small.yaml"))
    cluster = {"CPU": 0.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    now = trials_that_fit_now(study, cluster_has_gpus=False, every_s=0)
    assert now() == 1  # no node: one trial, whose request makes the autoscaler add one
    cluster["CPU"] = 2.0
    assert now() == 3  # a 2-CPU node: two 1-CPU trials run there, one more waits for the next node

    class Proposer(Searcher):
        def suggest(self, trial_id):
            return {"lr": 1.0}

    random = search.RandomSearch(max_concurrent=4)
    gate = search.TPEGate(Proposer(metric="val_acc", mode="max"), initial_points=0, max_concurrent=4)
    try:
        search.set_concurrency_now(lambda: 2)
        assert random.max_concurrent == 2
        assert gate.suggest("a") and gate.suggest("b") and gate.suggest("c") is None  # 2 live: the limit
        search.set_concurrency_now(lambda: 9)
        assert random.max_concurrent == 4 and gate.suggest("c")  # never above the study's own
    finally:
        search.set_concurrency_now(None)
    restored = search.RandomSearch(max_concurrent=1)
    saved = {k: v for k, v in restored.get_state().items() if k != "_max_concurrent"}
    restored.set_state({**saved, "max_concurrent": 3})  # the state of a study saved before the property
    assert restored.max_concurrent == 3 and "max_concurrent" not in restored.__dict__
    old = search.RandomSearch.__new__(search.RandomSearch)  # unpickled from before: no _max_concurrent of its own
    old.__dict__.update(saved)
    assert old.max_concurrent == 0  # Tune's "no limit", as the old instance had it

def test_rays_read_only_stand_in_for_an_autoscaler_is_not_taken_for_one():
    node = "ab" * 28  # a node id: 28 bytes
    assert autoscaler._read_only({f"node_{node}": 1})  # v1's summary of a cluster started without a config
    assert autoscaler._read_only(["", ""])  # v2's: nodes without a type name
    assert not autoscaler._read_only({"ray.head.default": 1, f"node_{node}": 1})  # a real config's type names
    assert not autoscaler._read_only(["headgroup"])
