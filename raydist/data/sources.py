"""Data sets by name, held as uint8 tensors on the worker's device, and each worker's shard of them.

    from raydist.data.splits import shard_indices
    train = load_split("digits", "train", device="cpu")
    for idx in shard_indices(len(train), batch_size=64, rank=0, world_size=2, epoch=0, seed=0):
        images, labels = train.batch(idx)        # uint8 N x 3 x H x W, int64 N

Splits: "train" trains, "val" is what every epoch reports and what a study selects on, "test" is measured
once at the end (raydist.final_eval). For the data sets read from files, "val" is a fixed, per-class share
(`val_fraction`, seeded) held out of the published training set and "train" is the rest; the published test
set is "test" and is never used to choose anything. digits keeps its own fixed split and fake has no test split.

Every data set is brought to 3 channels so every model runs on every data set. Images stay uint8
until raydist.data.augment turns a batch into normalized floats on the device, so a whole CIFAR-10 training
set costs 150 MB of device memory and no loader processes. `fake` is generated per index from a hash,
lazily and deterministically, and never held in memory as a whole.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from raydist.data.folder import bad_image_limit, first_names, load_folder_split, scan_folder, stored_size
from raydist.data.published import read_published, reading_once
from raydist.data.registry import DATASETS, FOLDER_INPUT_SIZE, SPLITS
from raydist.data.splits import DIGITS_SPLIT_SEED, SUBSET_SEED, held_out, subset_size

DIGITS_SIZE = 1797  # images in scikit-learn's digits


# ---- sources --------------------------------------------------------------------------------------


class TensorSource:
    """A data set held whole as a uint8 N x C x H x W tensor (on the worker's device); C is 3, or 1 for
    grey images fed as one channel."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] in (1, 3), images.shape
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "TensorSource":
        return TensorSource(self.images.to(device), self.labels.to(device))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.images.device)
        return self.images[indices], self.labels[indices]


class FakeSource:
    """Random images and labels computed from their index by an integer hash: lazy, deterministic, on device.

    The DDP workload test needs ImageNet-sized inputs without ImageNet; hashing each pixel's global
    position costs a few integer ops per byte on the device, so no loader process can bottleneck it.
    """

    def __init__(self, size: int, image_size: int, num_classes: int, salt: int, device="cpu"):
        self.size, self.image_size, self.num_classes, self.salt = size, image_size, num_classes, salt
        self.device = torch.device(device)
        self._offsets: Optional[torch.Tensor] = None  # every pixel's position in an image, made once

    def __len__(self) -> int:
        return self.size

    def to(self, device) -> "FakeSource":
        return FakeSource(self.size, self.image_size, self.num_classes, self.salt, device)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.device, torch.int64)
        pixels = 3 * self.image_size * self.image_size
        if self._offsets is None:
            self._offsets = torch.arange(pixels, device=self.device, dtype=torch.int32)
        # An image's identity is (split, index): two splits never share an image. Its pixels hash the offset
        # with two independent 32-bit keys of that identity, so no image is a shifted copy of another.
        # Per image (a few numbers) in int64; per pixel in int32, whose wrap-around gives the same 32 bits
        # at half the memory traffic of int64 (the pixels are most of a 224 x 224 batch's cost).
        image_id = indices * len(FAKE_SPLITS) + self.salt
        key_a, key_b = _hash32(image_id * 2 + 0x9E37), _hash32(image_id * 2 + 0x79B9 + 1)
        pixel_hash = _hash32_int32(_hash32_int32(self._offsets[None, :] + _as_int32(key_a)[:, None])
                                   ^ _as_int32(key_b)[:, None])
        images = (pixel_hash & 255).to(torch.uint8).view(len(indices), 3, self.image_size, self.image_size)
        labels = _hash32(_hash32(image_id) + 0x85EB) % self.num_classes
        return images, labels


FAKE_SPLITS = ("train", "val")  # a fake image's identity is (split, index); fake has no test split


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors (masks keep every product inside int64)."""
    m = 0xFFFFFFFF
    x = x & m
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & m
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def _signed32(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 2^32) as int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _hash32_int32(x: torch.Tensor) -> torch.Tensor:
    """_hash32 on int32 tensors, bit for bit: products wrap around modulo 2^32 as the masked int64 ones do,
    and each right shift is made logical by masking off the sign bits an arithmetic shift brings in."""
    x = (x ^ ((x >> 16) & 0xFFFF)) * _signed32(0x85EBCA6B)
    x = (x ^ ((x >> 13) & 0x7FFFF)) * _signed32(0xC2B2AE35)
    return x ^ ((x >> 16) & 0xFFFF)




def digits_arrays():
    """scikit-learn's bundled digits as `load_digits()` gives them: 1797 8 x 8 images (float64, 0-16) and
    their labels, read from the file it reads (sklearn/datasets/data/digits.csv.gz) without importing
    scikit-learn: that import (scipy and pandas with it) took 1.2 s of every worker's start here, more than
    the data set's own training epoch. Falls back to `load_digits()` where the file is not there."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # where the package is, without importing it
    folder = os.path.dirname(spec.origin) if spec and spec.origin else ""
    path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
    if folder and os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")  # gzip read by numpy; one row per image: 64 pixels, then its label
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images, raw.target


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 3 x 32 x 32 and their labels, made once per process (config checks need the
    class counts too). Callers index them, which copies: the cached tensors are never changed."""
    raw_images, raw_labels = digits_arrays()
    images = torch.tensor(raw_images, dtype=torch.float32)[:, None] / 16.0  # 1797 x 1 x 8 x 8 in [0, 1]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.tensor(raw_labels)


def load_digits_split(split: str, *, val_fraction: float = 0.2, **_) -> TensorSource:
    images, labels = _all_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_val = int(round(len(labels) * val_fraction))
    chosen = order[n_val:] if split == "train" else order[:n_val]
    return TensorSource(images[chosen], labels[chosen])


def _file_split(name: str, split: str, *, data_dir: str, download: bool,
                val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`split` of a data set published as a training and a test set: test is the published test set, val
    the held-out share of the published training set and train the rest of it."""

    if split == "test":
        return read_published(name, "test", data_dir, download)
    images, labels = read_published(name, "train", data_dir, download)
    chosen = held_out(labels, val_fraction)
    if split == "train":
        chosen = ~chosen
    return images[chosen], labels[chosen]


def _load_cifar10(split: str, *, data_dir: str, download: bool = False, val_fraction: float, **_) -> TensorSource:
    images, labels = _file_split("cifar10", split, data_dir=data_dir, download=download, val_fraction=val_fraction)
    return TensorSource(images.permute(0, 3, 1, 2).contiguous(), labels)  # stored N x H x W x C


def _load_cifar100(split: str, *, data_dir: str, download: bool = False, val_fraction: float, **_) -> TensorSource:
    images, labels = _file_split("cifar100", split, data_dir=data_dir, download=download, val_fraction=val_fraction)
    return TensorSource(images.permute(0, 3, 1, 2).contiguous(), labels)




def _load_fashion_mnist(split: str, *, data_dir: str, download: bool = False, val_fraction: float,
                        **_) -> TensorSource:
    images, labels = _file_split("fashion_mnist", split, data_dir=data_dir, download=download,
                                 val_fraction=val_fraction)
    # 28 x 28 grey -> 32 x 32 (zero border, as the background is black) x 3 channels.
    images = F.pad(images, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1).contiguous()
    return TensorSource(images, labels)


def _load_fake(split: str, *, fake_image_size: int = 224, fake_num_classes: int = 1000,
               fake_train_size: int = 12800, fake_val_size: int = 1280, **_) -> FakeSource:
    size = fake_train_size if split == "train" else fake_val_size
    return FakeSource(size, fake_image_size, fake_num_classes, salt=FAKE_SPLITS.index(split))




def _load_folder(split: str, *, data_dir: str, val_fraction: float, input_size: Optional[int] = None,
                 max_bad_images: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
                 **_) -> TensorSource:
    """The user's own images (raydist.data.folder), decoded once per node at the stored size of the
    input size (ImageNet's 256 for 224) and cached; ImageNet's statistics normalise them."""

    index = scan_folder(data_dir, val_fraction=val_fraction)
    images, labels, report = load_folder_split(index, split, stored=stored_size(input_size or FOLDER_INPUT_SIZE),
                                               max_bad=bad_image_limit(index, max_bad_images))
    if log is not None:
        if split == "train" and index.ignored:
            log(f"ignored {len(index.ignored)} file(s) not named as images: {first_names(index.ignored)}")
        log(report.line(split))
    return TensorSource(images, labels)


def folder_index(data_dir: str, val_fraction: Optional[float]):
    """The scanned image folder of --data-dir (raydist.data.folder.FolderIndex)."""
    return scan_folder(data_dir, val_fraction=DATASETS["folder"].val_fraction if val_fraction is None
                       else val_fraction)


def select(source: TensorSource, *, classes: Optional[list[int]] = None, fraction: float = 1.0,
           per_class: Optional[int] = None) -> TensorSource:
    """The images of `classes` (labels renumbered 0..k-1 in that order), at most `per_class` or a `fraction`
    of each class: a fixed random choice (SUBSET_SEED), stratified so every class keeps its share."""
    labels = source.labels.cpu()
    wanted = classes if classes else list(range(int(labels.max()) + 1))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SUBSET_SEED))
    keep, new_labels = [], []
    for new, old in enumerate(wanted):
        members = order[labels[order] == old]  # this class's images in the fixed random order
        members = members[:subset_size(len(members), fraction, per_class)]
        keep.append(members.sort().values)
        new_labels.append(torch.full((len(members),), new, dtype=torch.long))
    index = torch.cat(keep)
    return TensorSource(source.images[index.to(source.images.device)], torch.cat(new_labels).to(source.labels.device))


def load_split(name: str, split: str, *, device="cpu", classes: Optional[list[int]] = None,
               train_fraction: float = 1.0, train_per_class: Optional[int] = None, channels: int = 3,
               **options) -> TensorSource | FakeSource:
    """Load one split (train, val, test) of a registered data set onto `device`. Options: data_dir, download,
    val_fraction (None: the data set's default), fake_*; `classes` keeps those classes (every split),
    `train_fraction`/`train_per_class` shrink the training split, `channels=1` keeps one channel of a grey
    data set."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "test" and not spec.has_test:
        raise ValueError(f"{name} has no test split (its splits: train, val)")
    if channels == 1 and not spec.grey:
        raise ValueError(f"{name} is in colour: it has no single grey channel")
    if options.get("val_fraction") is None:
        options["val_fraction"] = spec.val_fraction
    source = LOADERS[name](split, **options)
    training = split == "train"
    if classes or (training and (train_fraction < 1.0 or train_per_class)):
        source = select(source, classes=classes, fraction=train_fraction if training else 1.0,
                        per_class=train_per_class if training else None)
    if channels == 1:
        source = TensorSource(source.images[:, :1].contiguous(), source.labels)
    return source.to(device)


def load_splits(name: str, splits: tuple[str, ...], **options) -> tuple:
    """Several splits of a data set (as load_split), reading each data file once: train and val both come
    from the published training files."""

    with reading_once():
        return tuple(load_split(name, split, **options) for split in splits)


def check_files(name: str, data_dir: str) -> None:
    """Read every file a data set's splits come from, as the workers will: a missing, truncated or damaged
    file raises DatasetNotFound or DataFileCorrupt naming it (no-op for data sets not read from files)."""
    spec = DATASETS[name]
    if name == "folder":  # listed, not decoded: the workers decode (and skip what cannot be decoded)
        folder_index(data_dir, None)
    elif spec.needs_files:
        load_splits(name, ("val", "test") if spec.has_test else ("val",), data_dir=data_dir)


def download_lock(data_dir: str):
    """A file lock so that workers sharing a node (and a data folder) download once."""
    from filelock import FileLock

    root = os.path.expanduser(data_dir)
    os.makedirs(root, exist_ok=True)
    return FileLock(os.path.join(root, ".raydist-download.lock"))


# Each registered data set's loader: split (and options) -> a TensorSource or FakeSource.
LOADERS = {"digits": load_digits_split, "cifar10": _load_cifar10, "cifar100": _load_cifar100,
           "fashion_mnist": _load_fashion_mnist, "fake": _load_fake, "folder": _load_folder}
