"""Data sets by name: digits, the torchvision formats on small files written here (their splits, damaged and
missing files, downloads from a loopback port), fake data, and sharding."""

import hashlib
import http.server
import os
import pickle
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch
import torchvision

from raydist.errors import ConfigError
from raydist.data.registry import DATASETS
from raydist.data.sizes import FILE_TRAIN_SIZES, train_size
from raydist.data.sources import load_split
from raydist.data.splits import shard_indices, steps_per_epoch
from raydist.errors import DataFileCorrupt, DatasetNotFound, DownloadFailed
from raydist.run_config import check_data
from raydist.ray_edge.fit import failure_cause


def test_digits_is_a_fixed_disjoint_split_of_all_1797_images():
    train, val = load_split("digits", "train"), load_split("digits", "val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert set(train.labels.tolist()) == set(range(10))
    flat_train = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in flat_train for x in val.images[:50])  # no validation image in training
    again = load_split("digits", "val")
    assert torch.equal(again.images, val.images)  # the split is fixed



def test_digits_are_scikit_learns_own_read_without_importing_it():
    """raydist reads the file behind load_digits() itself (a worker's start does not pay for importing
    scikit-learn): the same images and labels as scikit-learn's load_digits, and no sklearn module loaded."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from raydist.data.sources import digits_arrays

    images, labels = digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and images.dtype == reference.images.dtype
    assert np.array_equal(labels, reference.target)
    probe = ("import sys; from raydist.data.sources import load_split; load_split('digits', 'train'); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'pandas')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]"

# ---- CIFAR-10 / CIFAR-100 / Fashion-MNIST in their real on-disk formats ---------------------------

def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _write_cifar(root, cls, n_per_file, label_key, num_classes):
    """Pickled batches as the CIFAR python versions ship them, every class equally often in each file;
    returns the folder and (images N x 3072, labels) written per published split ("train", "test")."""
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    written = {}
    for split, entries in (("train", cls.train_list), ("test", cls.test_list)):
        images, labels = [], []
        for filename, _ in entries:
            data = rng.integers(0, 256, (n_per_file, 3 * 32 * 32), dtype=np.uint8)
            file_labels = rng.permutation(np.arange(n_per_file) % num_classes).tolist()
            with open(os.path.join(folder, filename), "wb") as fh:
                pickle.dump({"data": data, label_key: file_labels}, fh)
            images.append(data)
            labels += file_labels
        written[split] = (np.concatenate(images), labels)
    with open(os.path.join(folder, cls.meta["filename"]), "wb") as fh:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(num_classes)]}, fh)
    return folder, written


def _trust_written_files(monkeypatch, cls, folder):
    """torchvision checks each file's published md5; point it at the md5s of the files written here."""
    monkeypatch.setattr(cls, "train_list", [[f, _md5(os.path.join(folder, f))] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(os.path.join(folder, f))] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=_md5(os.path.join(folder, cls.meta["filename"]))))


def _rows(images):
    return [bytes(row) for row in images.reshape(len(images), -1).tolist()]


@pytest.mark.parametrize("name, cls, label_key, classes, per_file", [
    ("cifar10", torchvision.datasets.CIFAR10, "labels", 10, 60),
    ("cifar100", torchvision.datasets.CIFAR100, "fine_labels", 100, 1000),  # one training file
])
def test_cifar_val_is_a_stratified_share_held_out_of_the_training_files_and_test_is_the_test_file(
        tmp_path, monkeypatch, name, cls, label_key, classes, per_file):
    folder, written = _write_cifar(str(tmp_path), cls, per_file, label_key, classes)
    _trust_written_files(monkeypatch, cls, folder)
    train, val, test = (load_split(name, split, data_dir=str(tmp_path)) for split in ("train", "val", "test"))

    # test: the published test file, in order, channel order and layout kept
    test_images, test_labels = written["test"]
    assert torch.equal(test.images, torch.from_numpy(test_images).view(-1, 3, 32, 32))
    assert test.labels.tolist() == test_labels

    # train + val: exactly the published training images, each once, with its own label
    train_images, train_labels = written["train"]
    published = dict(zip(_rows(train_images), train_labels))
    ours = list(zip(_rows(train.images.numpy()), train.labels.tolist())) + \
        list(zip(_rows(val.images.numpy()), val.labels.tolist()))
    assert len(ours) == len(published) and dict(ours) == published
    assert not set(_rows(test.images.numpy())) & set(published)

    # val: the data set's default share (10%) of every class
    per_class = len(train_labels) // classes
    assert DATASETS[name].val_fraction == 0.1
    assert torch.bincount(val.labels, minlength=classes).tolist() == [round(per_class * 0.1)] * classes
    assert len(train) == train_size(name) * len(train_labels) // FILE_TRAIN_SIZES[name]  # as checked before a run
    # fixed: the same images again, whatever else changes
    again = load_split(name, "val", data_dir=str(tmp_path))
    assert torch.equal(again.images, val.images)
    # another fraction holds out that share
    half = load_split(name, "val", data_dir=str(tmp_path), val_fraction=0.5)
    assert torch.bincount(half.labels, minlength=classes).tolist() == [round(per_class * 0.5)] * classes


def test_class_subsets_and_smaller_training_sets_apply_to_the_held_out_split(tmp_path, monkeypatch):
    cls = torchvision.datasets.CIFAR10
    folder, _ = _write_cifar(str(tmp_path), cls, 60, "labels", 10)
    _trust_written_files(monkeypatch, cls, folder)
    full_train = load_split("cifar10", "train", data_dir=str(tmp_path))
    full_val = load_split("cifar10", "val", data_dir=str(tmp_path))
    train = load_split("cifar10", "train", data_dir=str(tmp_path), classes=[7, 2], train_per_class=10)
    val = load_split("cifar10", "val", data_dir=str(tmp_path), classes=[7, 2], train_per_class=10)
    test = load_split("cifar10", "test", data_dir=str(tmp_path), classes=[7, 2], train_per_class=10)
    assert torch.bincount(train.labels).tolist() == [10, 10]  # renumbered 7 -> 0, 2 -> 1
    for new, old in enumerate([7, 2]):
        assert set(_rows(train.images[train.labels == new].numpy())) <= set(
            _rows(full_train.images[full_train.labels == old].numpy()))
        assert torch.equal(val.images[val.labels == new], full_val.images[full_val.labels == old])  # all kept
    assert len(test) == 2 * 60 // 10


def test_held_out_share_per_class_matches_the_size_known_before_a_run():
    from raydist.data.splits import held_out

    labels = torch.arange(50_000) % 10  # CIFAR-10's 5000 images of each class
    mask = held_out(labels, 0.1)
    assert torch.bincount(labels[mask]).tolist() == [500] * 10
    assert train_size("cifar10") == int((~mask).sum()) == 45_000
    assert train_size("cifar10", classes=[1, 2], train_fraction=0.5) == 2 * 2250
    assert train_size("fashion_mnist") == 54_000 and train_size("cifar100", val_fraction=0.2) == 40_000


def test_data_sets_without_a_test_split_say_so():
    assert [n for n, d in DATASETS.items() if d.has_test] == ["cifar10", "cifar100", "fashion_mnist"]
    for name in ("digits", "fake"):
        with pytest.raises(ValueError, match=f"{name} has no test split"):
            load_split(name, "test")


def _idx(array, dims):
    return struct.pack(">HBB", 0, 0x08, dims) + struct.pack(">" + "I" * dims, *array.shape) + array.tobytes()


def _write_fashion(root, images, labels):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in images:
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images[prefix], 3))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels[prefix], 1))
    return raw


def _small_fashion(root, n_train=100, n_test=20):
    rng = np.random.default_rng(0)
    images = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", n_train), ("t10k", n_test))}
    labels = {p: (np.arange(len(images[p])) % 10).astype(np.uint8) for p in images}
    return _write_fashion(root, images, labels), images, labels


def test_fashion_mnist_reads_idx_files_and_pads_to_3x32x32(tmp_path):
    _, images, labels = _small_fashion(tmp_path)
    test = load_split("fashion_mnist", "test", data_dir=str(tmp_path))
    assert test.images.shape == (20, 3, 32, 32)
    assert torch.equal(test.images[:, 1, 2:30, 2:30], torch.from_numpy(images["t10k"]))
    assert test.images[:, :, :2].sum() == 0  # zero border
    assert test.labels.tolist() == labels["t10k"].tolist()
    train, val = (load_split("fashion_mnist", s, data_dir=str(tmp_path)) for s in ("train", "val"))
    assert len(train) == 90 and len(val) == 10 and torch.bincount(val.labels).tolist() == [1] * 10
    inner = torch.cat([train.images, val.images])[:, 0, 2:30, 2:30]
    assert sorted(_rows(inner.numpy())) == sorted(_rows(images["train"]))


def test_fashion_mnist_normalised_inputs_have_mean_0_and_std_1():
    """Images with Fashion-MNIST's statistics (28 x 28: mean 0.2860, std 0.3530), padded to the 32 x 32 the
    model sees, come out of the normalisation with mean 0 and std 1 (the 28 x 28 statistics gave -0.19, 0.94)."""
    from raydist.data.augment import Augmenter
    from raydist.data.registry import padded_stats

    # 57% black pixels, the rest uniform in [85, 255]: mean 0.2860, mean square 0.2064, as Fashion-MNIST's
    rng = np.random.default_rng(0)
    ink = rng.random((2000, 28, 28)) < 0.4296
    inner = np.where(ink, rng.integers(85, 256, (2000, 28, 28)), 0).astype(np.uint8)
    assert abs(inner.mean() / 255 - 0.2860) < 0.002 and abs(inner.std() / 255 - 0.3530) < 0.002
    padded = torch.nn.functional.pad(torch.from_numpy(inner), (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1)
    spec = DATASETS["fashion_mnist"]
    x = Augmenter("none", mean=spec.mean, std=spec.std)(padded, train=False)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    # the formula is exact: the padded statistics of these very images from their 28 x 28 ones
    mean, std = padded_stats(inner.mean() / 255, inner.std() / 255, inner=28, outer=32)
    as_float = padded.float() / 255
    assert mean == pytest.approx(as_float.mean().item(), rel=1e-5)
    assert std == pytest.approx(as_float.std(unbiased=False).item(), rel=1e-4)


# ---- missing, truncated and damaged files: one line naming the file ---------------------------------

def test_missing_dataset_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(DatasetNotFound, match=rf"CIFAR10 train split not found in {tmp_path}: pass --download"):
        load_split("cifar10", "val", data_dir=str(tmp_path))  # val comes from the training files


def test_a_missing_fashion_training_file_is_named_with_its_split(tmp_path):
    raw, _, _ = _small_fashion(tmp_path)
    (raw / "train-labels-idx1-ubyte").unlink()
    message = (f"FashionMNIST train split not found in {tmp_path}: FashionMNIST/raw/train-labels-idx1-ubyte is "
               f"missing; pass --download")
    with pytest.raises(ConfigError, match=message):
        check_data("fashion_mnist", str(tmp_path), download=False)
    with pytest.raises(DatasetNotFound, match=message):  # the test split needs it too: torchvision reads both
        load_split("fashion_mnist", "test", data_dir=str(tmp_path))


@pytest.mark.parametrize("damage, problem", [
    ("truncate", "is truncated or corrupt: its header announces 100 x 28 x 28 bytes"),
    ("garble", "is not an idx file of 3-d uint8 data"),
])
def test_a_damaged_fashion_training_file_fails_the_check_in_one_line_naming_it(tmp_path, damage, problem):
    raw, _, _ = _small_fashion(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"<html>" + data[6:])
    with pytest.raises(ConfigError) as caught:
        check_data("fashion_mnist", str(tmp_path), download=False)
    assert str(caught.value).startswith(f"{path} {problem}") and "\n" not in str(caught.value)
    assert str(caught.value).endswith("delete it and run once with --download, or copy it again")


def test_a_truncated_cifar_batch_is_named(tmp_path, monkeypatch):
    cls = torchvision.datasets.CIFAR10
    folder, _ = _write_cifar(str(tmp_path), cls, 10, "labels", 10)
    _trust_written_files(monkeypatch, cls, folder)  # the published md5s, as it were
    path = os.path.join(folder, "data_batch_3")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 100])
    with pytest.raises(ConfigError, match=rf"^{path} is truncated or corrupt \(its md5 is not the published one\)"):
        check_data("cifar10", str(tmp_path), download=False)


def test_an_unreadable_cifar_batch_is_named(tmp_path, monkeypatch):
    cls = torchvision.datasets.CIFAR100
    folder, _ = _write_cifar(str(tmp_path), cls, 100, "fine_labels", 100)
    with open(os.path.join(folder, "test"), "wb") as fh:
        fh.write(b"not a pickle")
    _trust_written_files(monkeypatch, cls, folder)  # md5s that match: the damage shows only when read
    with pytest.raises(DataFileCorrupt, match=rf"CIFAR100 test files \(test, meta\) in {folder} cannot be read"):
        load_split("cifar100", "test", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="CIFAR100 test files"):  # the check reads the test files too
        check_data("cifar100", str(tmp_path), download=False)


def test_a_damaged_file_on_a_workers_node_is_the_runs_one_line_cause(tmp_path):
    """What each node's first worker runs: the error is the user's (DataUnavailable), named per node."""
    from raydist.config.fields import TrainConfig
    from raydist.errors import DataUnavailable
    from raydist.loop.worker_data import load_data_once_per_node

    raw, _, _ = _small_fashion(tmp_path)
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    cfg = TrainConfig(dataset="fashion_mnist", data_dir=str(tmp_path), batch_size=8)
    with pytest.raises(DataUnavailable, match=rf"^on node n1: {path} is truncated or corrupt"):
        load_data_once_per_node(cfg, device="cpu", rank=0, world=1, node_id="n1")


# ---- --download -----------------------------------------------------------------------------------

def test_cifar10_download_fetches_and_extracts_the_archive(tmp_path, monkeypatch):
    """--download runs torchvision's real download (URL, md5, extract) against a server on loopback."""
    from raydist.data import published as data_files

    cls = torchvision.datasets.CIFAR10
    staging = tmp_path / "staging"
    folder, written = _write_cifar(str(staging), cls, 10, "labels", 10)
    archive = tmp_path / "serve" / cls.filename
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=cls.base_folder)
    _trust_written_files(monkeypatch, cls, folder)
    monkeypatch.setattr(cls, "tgz_md5", _md5(archive))

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(archive.parent), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setitem(data_files.DOWNLOAD_MIRRORS, "cifar10", [f"http://127.0.0.1:{server.server_port}/"])
        data_dir = tmp_path / "data"
        source = load_split("cifar10", "test", data_dir=str(data_dir), download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert (data_dir / cls.filename).exists() and len(source) == 10
    assert source.labels.tolist() == written["test"][1]


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once closed


def test_a_failed_download_names_the_address_the_reason_and_what_to_do(tmp_path, monkeypatch):
    from raydist.data import published as data_files
    from raydist.config.fields import TrainConfig
    from raydist.errors import DataUnavailable
    from raydist.loop.worker_data import load_data_once_per_node

    url = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setitem(data_files.DOWNLOAD_MIRRORS, "cifar10", [url])
    data_dir = tmp_path / "data"
    expected = (f"CIFAR-10 download from {url}cifar-10-python.tar.gz failed: Connection refused; put the extracted "
                f"files in {data_dir}/cifar-10-batches-py (or the archive cifar-10-python.tar.gz in {data_dir}), "
                f"or run once with network access")
    with pytest.raises(DownloadFailed) as caught:
        load_split("cifar10", "train", data_dir=str(data_dir), download=True)
    assert str(caught.value) == expected

    # in a run: what the first worker of each node does, and the line the CLI ends with
    cfg = TrainConfig(dataset="cifar10", data_dir=str(data_dir), download=True, batch_size=8)
    with pytest.raises(DataUnavailable) as caught:
        load_data_once_per_node(cfg, device="cpu", rank=0, world=1, node_id="10.0.0.7")
    assert str(caught.value) == f"on node 10.0.0.7: {expected}"

    class WorkerGroupError(Exception):  # how Ray Train hands the workers' errors to the driver
        worker_failures = {0: caught.value, 1: caught.value}

    assert failure_cause(WorkerGroupError("Training failed due to worker errors")) == f"on node 10.0.0.7: {expected}"


def test_fashion_mnist_download_tries_every_mirror(tmp_path, monkeypatch):
    from raydist.data import published as data_files

    mirrors = [f"http://127.0.0.1:{_closed_port()}/a/", f"http://127.0.0.1:{_closed_port()}/b/"]
    monkeypatch.setitem(data_files.DOWNLOAD_MIRRORS, "fashion_mnist", mirrors)
    with pytest.raises(DownloadFailed, match=(
            rf"^Fashion-MNIST download failed \(from {mirrors[0]}train-images-idx3-ubyte.gz: Connection refused; "
            rf"from {mirrors[1]}train-images-idx3-ubyte.gz: Connection refused\); put the extracted files in "
            rf"{tmp_path}/FashionMNIST/raw")):
        load_split("fashion_mnist", "val", data_dir=str(tmp_path), download=True)


# ---- fake data ----------------------------------------------------------------------------------

def test_fake_is_lazy_deterministic_per_index_and_labelled_in_range():
    source = load_split("fake", "train", fake_image_size=64, fake_num_classes=10, fake_train_size=10**9)
    assert len(source) == 10**9  # a billion images, none of them stored
    a_images, a_labels = source.batch(torch.tensor([5, 999_999_999, 7]))
    b_images, b_labels = source.batch(torch.tensor([7, 5]))
    assert a_images.shape == (3, 3, 64, 64) and a_images.dtype == torch.uint8
    assert torch.equal(a_images[0], b_images[1]) and torch.equal(a_images[2], b_images[0])
    assert torch.equal(a_labels[[0, 2]], b_labels[[1, 0]])
    assert not torch.equal(a_images[0], a_images[2])
    assert 100 < a_images.float().mean() < 155  # roughly uniform bytes
    labels = source.batch(torch.arange(5000))[1]
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10


def test_fake_validation_images_are_not_training_images():
    # Sizes as the defaults relate (val is a tenth of train): the old keys made val image i train image i + 40.
    train = load_split("fake", "train", fake_image_size=8, fake_train_size=400, fake_val_size=40)
    val = load_split("fake", "val", fake_image_size=8, fake_train_size=400, fake_val_size=40)
    train_images = {bytes(image.flatten().tolist()) for image in train.batch(torch.arange(400))[0]}
    val_images = [bytes(image.flatten().tolist()) for image in val.batch(torch.arange(40))[0]]
    assert len(train_images) == 400 and len(set(val_images)) == 40
    assert not train_images & set(val_images)
    # nor is any image a shifted copy of another (pixel streams of different images share no run of 16 bytes)
    streams = [image.flatten() for image in train.batch(torch.arange(50))[0]]
    runs = {bytes(s[i:i + 16].tolist()) for s in streams for i in range(0, len(s) - 16)}
    assert len(runs) == sum(len(s) - 16 for s in streams)


# ---- sharding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world, batch", [(1437, 2, 64), (100, 3, 8), (10, 4, 2), (1, 4, 1), (5, 8, 2)])
def test_training_shards_are_disjoint_equal_and_cover_the_data(n, world, batch):
    shards = [torch.cat(list(shard_indices(n, batch_size=batch, rank=r, world_size=world, epoch=0, seed=0,
                                           drop_last=False))) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(range(n))
    padding = len(shards[0]) * world - n
    assert padding < world
    steps = [len(list(shard_indices(n, batch_size=batch, rank=r, world_size=world))) for r in range(world)]
    assert steps == [steps_per_epoch(n, batch_size=batch, world_size=world)] * world


def test_each_epoch_reshuffles_and_validation_sees_each_item_once():
    e0 = torch.cat(list(shard_indices(500, batch_size=10, rank=0, world_size=2, epoch=0)))
    e1 = torch.cat(list(shard_indices(500, batch_size=10, rank=0, world_size=2, epoch=1)))
    assert not torch.equal(e0, e1)
    val = [torch.cat(list(shard_indices(101, batch_size=10, rank=r, world_size=2, shuffle=False,
                                        drop_last=False, pad=False))) for r in range(2)]
    assert sorted(torch.cat(val).tolist()) == list(range(101))


def test_batches_are_slices_of_one_copy_on_the_device_and_the_same_as_on_the_cpu():
    """Indices go to the device once per epoch, each batch a slice there (on a GPU: no host-to-device copy
    per step); the batches are the CPU's, so a run draws the same images on any device."""
    on_cpu = list(shard_indices(500, batch_size=10, rank=1, world_size=2, epoch=3, seed=7))
    on_meta = list(shard_indices(500, batch_size=10, rank=1, world_size=2, epoch=3, seed=7, device="meta"))
    assert {b.device.type for b in on_meta} == {"meta"} and [b.shape for b in on_meta] == [b.shape for b in on_cpu]
    assert len({b.untyped_storage().data_ptr() for b in on_cpu}) == 1  # slices of one tensor, as on the device


def test_fake_images_are_murmur3_of_each_pixel_bit_for_bit():
    """The int32 pixel hash gives exactly the 32-bit murmur3 finalizer of the int64 reference."""
    from raydist.data.sources import FAKE_SPLITS, FakeSource, _hash32

    source = FakeSource(1000, 20, 7, salt=1)
    indices = torch.tensor([0, 5, 999])
    images, labels = source.batch(indices)
    image_id = indices * len(FAKE_SPLITS) + 1
    key_a, key_b = _hash32(image_id * 2 + 0x9E37), _hash32(image_id * 2 + 0x79B9 + 1)
    offsets = torch.arange(3 * 20 * 20, dtype=torch.int64)
    expected = (_hash32(_hash32(offsets[None, :] + key_a[:, None]) ^ key_b[:, None]) & 255).to(torch.uint8)
    assert torch.equal(images, expected.view(3, 3, 20, 20))
    assert labels.tolist() == (_hash32(_hash32(image_id) + 0x85EB) % 7).tolist()


# ---- class subsets and smaller training sets (transfer tasks) -------------------------------------


def test_a_class_subset_keeps_those_classes_in_both_splits_renumbered_in_the_order_given():
    full = load_split("digits", "val")
    subset = load_split("digits", "val", classes=[7, 5, 9])
    for new, old in enumerate([7, 5, 9]):
        assert torch.equal(subset.images[subset.labels == new], full.images[full.labels == old])
    assert set(subset.labels.tolist()) == {0, 1, 2}
    assert len(load_split("digits", "train", classes=[7, 5, 9])) + len(subset) == sum(
        len(load_split("digits", s, classes=[c])) for s in ("train", "val") for c in (7, 5, 9))


@pytest.mark.parametrize("options", [dict(train_per_class=20), dict(train_fraction=0.25)])
def test_a_smaller_training_set_is_stratified_fixed_and_leaves_validation_whole(options):
    from raydist.data.sizes import train_size

    full = load_split("digits", "train", classes=[5, 6, 7, 8, 9])
    small = load_split("digits", "train", classes=[5, 6, 7, 8, 9], **options)
    per_class = torch.bincount(small.labels).tolist()
    full_per_class = torch.bincount(full.labels).tolist()
    if "train_per_class" in options:
        assert per_class == [20] * 5
    else:
        assert per_class == [round(n * 0.25) for n in full_per_class]
    # every image kept is one of the class's own training images
    for c in range(5):
        pool = {bytes(x.numpy()) for x in full.images[full.labels == c]}
        assert all(bytes(x.numpy()) in pool for x in small.images[small.labels == c])
    assert torch.equal(load_split("digits", "train", classes=[5, 6, 7, 8, 9], **options).images, small.images)
    assert len(load_split("digits", "val", classes=[5, 6, 7, 8, 9], **options)) == len(
        load_split("digits", "val", classes=[5, 6, 7, 8, 9]))
    # the size known before loading (checks before a cluster starts) is the size loaded
    assert train_size("digits", classes=[5, 6, 7, 8, 9], **options) == len(small)


def test_grey_data_sets_can_be_fed_as_one_channel_and_colour_ones_cannot(tmp_path):
    rgb, grey = load_split("digits", "train"), load_split("digits", "train", channels=1)
    assert grey.images.shape[1] == 1 and torch.equal(grey.images[:, 0], rgb.images[:, 1])
    assert [n for n, d in DATASETS.items() if d.grey] == ["digits", "fashion_mnist"]
    with pytest.raises(ValueError, match="cifar10 is in colour"):
        load_split("cifar10", "train", data_dir=str(tmp_path), channels=1)
