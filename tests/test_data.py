"""Data sets by name: digits, the torchvision formats on small files written here, fake data, and sharding."""

import hashlib
import http.server
import os
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch
import torchvision

from raydist.data import DATASETS, DatasetNotFound, load_split, shard_indices, steps_per_epoch


def test_digits_is_a_fixed_disjoint_split_of_all_1797_images():
    train, val = load_split("digits", "train"), load_split("digits", "val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert set(train.labels.tolist()) == set(range(10))
    flat_train = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in flat_train for x in val.images[:50])  # no validation image in training
    again = load_split("digits", "val")
    assert torch.equal(again.images, val.images)  # the split is fixed


# ---- CIFAR-10 / CIFAR-100 / Fashion-MNIST in their real on-disk formats ---------------------------

def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _write_cifar(root, cls, n_per_file, label_key, num_classes):
    """Pickled batches as the CIFAR python versions ship them; returns the images written per split."""
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    written = {}
    for split, entries in (("train", cls.train_list), ("val", cls.test_list)):
        images = []
        for filename, _ in entries:
            data = rng.integers(0, 256, (n_per_file, 3 * 32 * 32), dtype=np.uint8)
            labels = rng.integers(0, num_classes, n_per_file).tolist()
            with open(os.path.join(folder, filename), "wb") as fh:
                pickle.dump({"data": data, label_key: labels}, fh)
            images.append((data, labels))
        written[split] = images
    with open(os.path.join(folder, cls.meta["filename"]), "wb") as fh:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(num_classes)]}, fh)
    return folder, written


def _trust_written_files(monkeypatch, cls, folder):
    """torchvision checks each file's published md5; point it at the md5s of the files written here."""
    monkeypatch.setattr(cls, "train_list", [[f, _md5(os.path.join(folder, f))] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(os.path.join(folder, f))] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=_md5(os.path.join(folder, cls.meta["filename"]))))


@pytest.mark.parametrize("name, cls, label_key, classes", [
    ("cifar10", torchvision.datasets.CIFAR10, "labels", 10),
    ("cifar100", torchvision.datasets.CIFAR100, "fine_labels", 100),
])
def test_cifar_loaders_read_the_pickled_batches(tmp_path, monkeypatch, name, cls, label_key, classes):
    folder, written = _write_cifar(str(tmp_path), cls, 6, label_key, classes)
    _trust_written_files(monkeypatch, cls, folder)
    for split in ("train", "val"):
        source = load_split(name, split, data_dir=str(tmp_path))
        data = np.concatenate([d for d, _ in written[split]]).reshape(-1, 3, 32, 32)
        labels = sum((labels for _, labels in written[split]), [])
        assert torch.equal(source.images, torch.from_numpy(data))  # channel order and layout kept
        assert source.labels.tolist() == labels
    assert DATASETS[name].num_classes == classes


def _idx(array, dims):
    return struct.pack(">HBB", 0, 0x08, dims) + struct.pack(">" + "I" * dims, *array.shape) + array.tobytes()


def test_fashion_mnist_reads_idx_files_and_pads_to_3x32x32(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 12), ("t10k", 5))}
    labels = {s: rng.integers(0, 10, len(images[s]), dtype=np.uint8) for s in images}
    for s in images:
        (raw / f"{s}-images-idx3-ubyte").write_bytes(_idx(images[s], 3))
        (raw / f"{s}-labels-idx1-ubyte").write_bytes(_idx(labels[s], 1))
    val = load_split("fashion_mnist", "val", data_dir=str(tmp_path))
    assert val.images.shape == (5, 3, 32, 32)
    assert torch.equal(val.images[:, 1, 2:30, 2:30], torch.from_numpy(images["t10k"]))
    assert val.images[:, :, :2].sum() == 0  # zero border
    assert val.labels.tolist() == labels["t10k"].tolist()
    assert len(load_split("fashion_mnist", "train", data_dir=str(tmp_path))) == 12


def test_missing_dataset_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(DatasetNotFound, match=rf"CIFAR10 val split not found in {tmp_path}: pass --download"):
        load_split("cifar10", "val", data_dir=str(tmp_path))


def test_cifar10_download_fetches_and_extracts_the_archive(tmp_path, monkeypatch):
    """--download runs torchvision's real download (URL, md5, extract) against a server on loopback."""
    cls = torchvision.datasets.CIFAR10
    staging = tmp_path / "staging"
    folder, written = _write_cifar(str(staging), cls, 4, "labels", 10)
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
        monkeypatch.setattr(cls, "url", f"http://127.0.0.1:{server.server_port}/{cls.filename}")
        data_dir = tmp_path / "data"
        source = load_split("cifar10", "val", data_dir=str(data_dir), download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert (data_dir / cls.filename).exists() and len(source) == 4
    assert source.labels.tolist() == written["val"][0][1]


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
    from raydist.data import train_size

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
