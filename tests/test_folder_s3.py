"""An image folder in object storage (s3://): a real S3-compatible server (moto's server mode, started
here on a free port) holding the digits folder the tests write; raydist lists and reads it through pyarrow,
on the driver and on every worker, with the endpoint given in the URI as pyarrow's S3 filesystem takes it.
The session's nodes get (fake) credentials from conftest, as a real cluster's nodes have theirs; moto accepts
any. Without credentials the server answers ACCESS_DENIED, which reaches the user as the one-line "cannot
read it (... ACCESS_DENIED ...)" of an unreachable bucket."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from cli import without_ray_lines
from image_folders import write_digits_folder

from raydist import train as train_cli
from raydist.data.folder import load_folder_split, scan_folder



@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """(s3:// URI of the folder, the same folder on disk), served by moto_server until the module ends."""
    import boto3

    from raydist.ray_edge.session import free_port

    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        local = tmp_path_factory.mktemp("photos")
        write_digits_folder(local)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})
        s3.create_bucket(Bucket="photos")
        for folder, _, files in os.walk(local):
            for name in files:
                path = os.path.join(folder, name)
                s3.upload_file(path, "photos", "digits/" + os.path.relpath(path, local))
        yield f"s3://photos/digits?endpoint_override=127.0.0.1:{port}&scheme=http", local, port
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYDIST_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
def test_a_bucket_folder_lists_and_decodes_as_the_same_folder_on_disk(bucket):
    uri, local, _ = bucket
    remote, on_disk = scan_folder(uri, val_fraction=0.1), scan_folder(str(local), val_fraction=0.1)
    assert remote.classes == on_disk.classes
    for split in ("train", "val"):
        assert [(f.path, f.size, f.label) for f in remote.splits[split]] == \
               [(f.path, f.size, f.label) for f in on_disk.splits[split]]
    images, labels, _ = load_folder_split(remote, "val", stored=32, use_cache=False)
    same, same_labels, _ = load_folder_split(on_disk, "val", stored=32, use_cache=False)
    assert (images == same).all() and (labels == same_labels).all()


def test_an_unreachable_bucket_is_one_line_exit_2(bucket, capsys):
    from raydist.ray_edge.session import free_port

    closed = f"s3://photos/digits?endpoint_override=127.0.0.1:{free_port()}&scheme=http"  # nobody listens
    assert train_cli.main(["--dataset", "folder", "--data-dir", closed]) == 2
    err = without_ray_lines(capsys.readouterr().err).strip()
    assert err.startswith(f"raydist.train: error: --data-dir {closed}: cannot ") and "\n" not in err, err


STREAM_FROM_BUCKET = """
import json, sys, ray, torch
from raydist.data.splits import shard_indices
from raydist.ray_edge.stream import StreamSource
from raydist.data.folder import scan_folder
ray.init(address=sys.argv[1], log_to_driver=False)
index = scan_folder(sys.argv[2], val_fraction=0.1)
source = StreamSource(index, "val", stored=32)
batches = list(shard_indices(len(source), batch_size=64, rank=0, world_size=1, shuffle=False, drop_last=False,
                             pad=False))
labels = torch.cat([l for _, l in source.batches(batches, train=False)])
print(json.dumps({"count": len(labels), "labels": sorted(labels.tolist()), "bad": sorted(source.bad)}))
"""


def test_ray_data_tasks_stream_the_bucket(ray_cluster, bucket):
    uri, local, _ = bucket
    result = subprocess.run([sys.executable, "-c", STREAM_FROM_BUCKET, ray_cluster, uri], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    val = scan_folder(str(local), val_fraction=0.1).splits["val"]
    assert out["bad"] == [] and out["count"] == len(val)  # every file read from the bucket by Ray's workers
    assert out["labels"] == sorted(f.label for f in val)


def test_a_two_worker_run_on_the_bucket_learns(ray_cluster, bucket, tmp_path):
    uri, _, _ = bucket
    result = subprocess.run([sys.executable, "-m", "raydist.train", "--address", ray_cluster, "--dataset", "folder",
                             "--data-dir", uri, "--input-size", "32", "--augment", "crop_flip", "--num-workers", "2",
                             "--epochs", "10", "--storage-path", str(tmp_path), "--name", "from-s3"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    accuracy = float(result.stdout.split("val acc ")[-1].split("%")[0]) / 100
    # It learned (chance: 0.1). Not the disk folder's 0.90: the bucket is streamed in its own order, and 10
    # epochs land at 0.899 on some machines (seen in CI on 2026-12-02), so the bar keeps a margin.
    assert accuracy >= 0.85
    assert f"data: folder ready in {uri} on node" in result.stdout + result.stderr
