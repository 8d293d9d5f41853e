"""Data on a real multi-node cluster: each node that runs workers checks its own copy, once, and a node
without it is named. `ray.cluster_utils.Cluster` runs a CPU-less head and two 1-CPU worker nodes (separate
raylets) on this machine; each node has its own HOME, so `--data-dir ~/data` is a different folder on each,
as on machines with local disks. The data is Fashion-MNIST's real idx format, written here."""

import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from clusters import shutdown_cluster


def _idx(array, dims):
    return struct.pack(">HBB", 0, 0x08, dims) + struct.pack(">" + "I" * dims, *array.shape) + array.tobytes()


def _write_fashion_mnist(root, seed):
    """A learnable stand-in in the real files: class k is a grey level (flip- and crop-proof) plus noise."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(seed)
    for split, n in (("train", 600), ("t10k", 200)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = (20 + 24 * labels[:, None, None] + rng.integers(-8, 9, (n, 28, 28))).astype(np.uint8)
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as fh:
            fh.write(_idx(images, 3))
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as fh:
            fh.write(_idx(labels, 1))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    from ray.cluster_utils import Cluster

    homes = [str(tmp_path_factory.mktemp(f"home-{name}")) for name in ("a", "b")]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    try:
        nodes = [cluster.add_node(num_cpus=1, env_vars={"HOME": home}) for home in homes]
        cluster.wait_for_nodes()
        yield cluster.address, homes, [node.node_id for node in nodes]
    finally:
        shutdown_cluster(cluster)


def _train(address, tmp_path, name, *args):
    return subprocess.run([sys.executable, "-m", "raydist.train", "--address", address, "--dataset", "fashion_mnist",
                           "--data-dir", "~/data", "--num-workers", "2", "--batch-size", "32",
                           "--storage-path", str(tmp_path / "runs"), "--name", name, *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.own_cluster
def test_data_is_checked_on_every_workers_node_and_a_node_without_it_is_named(two_nodes, tmp_path):
    address, (home_a, home_b), (node_a, node_b) = two_nodes
    _write_fashion_mnist(os.path.join(home_a, "data"), seed=0)  # node b has none

    missing = _train(address, tmp_path, "missing", "--epochs", "1")
    assert missing.returncode == 1, missing.stdout[-2000:] + missing.stderr[-3000:]
    assert missing.stderr.strip().splitlines()[-1] == (
        f"raydist.train: training failed: on node {node_b}: FashionMNIST train split not found in "
        f"{home_b}/data: pass --download to fetch it there, or --data-dir to point at the folder that holds it")

    _write_fashion_mnist(os.path.join(home_b, "data"), seed=1)
    ran = _train(address, tmp_path, "both", "--epochs", "10")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    out = ran.stdout + ran.stderr  # worker lines reach the driver's console
    for home, node in ((home_a, node_a), (home_b, node_b)):  # once per node, by that node, in its own folder
        assert out.count(f"data: fashion_mnist ready in {home}/data on node {node}") == 1, out[-3000:]
    assert out.count("data: fashion_mnist ready in") == 2
    final_acc = float(ran.stdout.split("val acc ")[-1].split("%")[0]) / 100
    assert final_acc >= 0.9  # it learned from both nodes' shards (chance: 0.1)


@pytest.mark.own_cluster
def test_a_streamed_folder_is_decoded_on_both_nodes_and_the_run_learns(two_nodes, tmp_path):
    """The streamed path's Ray Data tasks run on the nodes' free CPUs, both nodes' among them: each node has
    1 CPU, and the two workers of 0.25 CPU (packed on one node by Ray Train) leave 0.5 of it and all of the
    other. The folder is on storage both nodes read (here: this machine's disk)."""
    from image_folders import write_digits_folder

    address, _, node_ids = two_nodes
    write_digits_folder(tmp_path / "photos")
    ran = subprocess.run([sys.executable, "-m", "raydist.train", "--address", address, "--dataset", "folder",
                          "--data-dir", str(tmp_path / "photos"), "--data-loader", "stream", "--input-size", "32",
                          "--augment", "crop_flip", "--num-workers", "2", "--cpus-per-worker", "0.25",
                          "--epochs", "10", "--storage-path", str(tmp_path / "runs"), "--name", "streamed"],
                         capture_output=True, text=True, timeout=900)
    out = ran.stdout + ran.stderr
    assert ran.returncode == 0, out[-4000:]
    assert re.search(r"data: streaming \d+ training and \d+ validation images through Ray Data", out)
    # Every rank says where its first epoch was decoded: between them, on both worker nodes.
    lines = re.findall(r"data: rank (\d): the first epoch's train images were decoded by Ray Data on \d node\(s\) "
                       r"\(images per node: ([^)]*)\)", out)
    assert sorted(rank for rank, _ in lines) == ["0", "1"], out[-4000:]
    decoded_on = {part.split()[0] for _, where in lines for part in where.split(", ")}
    assert decoded_on == {node[:8] for node in node_ids}, lines
    final_acc = float(ran.stdout.split("val acc ")[-1].split("%")[0]) / 100
    assert final_acc >= 0.9  # the bar of the same folder held in memory (tests/test_image_folder.py)
