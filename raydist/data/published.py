"""The published data files (CIFAR-10, CIFAR-100, Fashion-MNIST): checked, read, and downloaded.

    images, labels = read_published("cifar10", "train", "~/data", download=False)   # uint8 N x 32 x 32 x 3

torchvision reads the files. raydist looks at them first, so that a missing file, or one that is truncated
or damaged, is one line naming that file and its split (DatasetNotFound, DataFileCorrupt), and downloads them
itself, so that a failed download says from where, why, and what to do instead (DownloadFailed). All three
are OSErrors: the user's side, which raydist.loop reports per node in one line.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from raydist.data.registry import DATASETS
from raydist.errors import DataFileCorrupt, DatasetNotFound, DownloadFailed

# Where --download fetches the archives: torchvision's addresses. A module constant, so that tests point it
# at a local port (no network in tests) and a site can name its own mirror first.
DOWNLOAD_MIRRORS: dict[str, list[str]] = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "fashion_mnist": "FashionMNIST"}
FIX = "delete it and run once with --download, or copy it again"


@dataclass(frozen=True)
class Layout:
    """Where a data set's files lie under the data folder, and what --download fetches."""
    dataset: str  # cifar10
    cls_name: str  # torchvision's class, CIFAR10 (named in messages: the folder a user finds is named after it)
    folder: str  # the folder holding the files that are read
    files: dict[str, list[tuple[str, Optional[str]]]]  # "train"/"test" -> [(file name in folder, md5 or None)]
    archives: list[tuple[str, str]]  # (file name, md5) of what is downloaded into download_root and extracted
    download_root: str


def layout(dataset: str, root: str) -> Layout:
    import torchvision

    cls_name = TORCHVISION_CLASSES[dataset]
    cls = getattr(torchvision.datasets, cls_name)
    if cls_name.startswith("CIFAR"):
        meta = (cls.meta["filename"], cls.meta["md5"])
        files = {"train": [*map(tuple, cls.train_list), meta], "test": [*map(tuple, cls.test_list), meta]}
        return Layout(dataset, cls_name, os.path.join(root, cls.base_folder), files, [(cls.filename, cls.tgz_md5)],
                      root)
    raw = os.path.join(root, cls_name, "raw")  # torchvision's MNIST family: <root>/<class>/raw/, unpacked idx files
    files = {split: [(f"{prefix}-images-idx3-ubyte", None), (f"{prefix}-labels-idx1-ubyte", None)]
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    return Layout(dataset, cls_name, raw, files, [tuple(r) for r in cls.resources], raw)


# ---- reading ------------------------------------------------------------------------------------------

_read_cache: Optional[dict] = None


@contextlib.contextmanager
def reading_once():
    """Within it, each published file split is read from disk once (train and val both come from the
    training files)."""
    global _read_cache
    outer = _read_cache
    _read_cache = {} if outer is None else outer
    try:
        yield
    finally:
        _read_cache = outer


def read_published(dataset: str, file_split: str, data_dir: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The published training ("train") or test ("test") set: uint8 images as stored, int64 labels."""
    root = os.path.abspath(os.path.expanduser(data_dir))
    key = (dataset, file_split, root, download)
    if _read_cache is not None and key in _read_cache:
        return _read_cache[key]
    found = _read(layout(dataset, root), file_split, root, download)
    if _read_cache is not None:
        _read_cache[key] = found
    return found


def _read(where: Layout, file_split: str, root: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    if download and not all(os.path.exists(os.path.join(where.folder, name))
                            for files in where.files.values() for name, _ in files):
        fetch(where)
    # torchvision reads the training and test files together: each must be there, this split's first.
    for split in (file_split, *(s for s in where.files if s != file_split)):
        check_present(split, where, root)
    if where.files[file_split][0][1] is None:  # idx files carry their size in their header
        check_idx_pair(*(os.path.join(where.folder, name) for name, _ in where.files[file_split]))
    try:
        ds = getattr(torchvision.datasets, where.cls_name)(root=root, train=file_split == "train", download=False)
    except RuntimeError as exc:
        if "not found or corrupted" in str(exc):  # CIFAR: a file's md5 is not the published one
            raise _which_file_fails_its_md5(where) or _unreadable(file_split, where, exc) from None
        raise _unreadable(file_split, where, exc) from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AssertionError, TypeError) as exc:
        raise _unreadable(file_split, where, exc) from None
    return torch.as_tensor(ds.data), torch.as_tensor(ds.targets)


def check_present(split: str, where: Layout, root: str) -> None:
    missing = [name for name, _ in where.files[split] if not os.path.exists(os.path.join(where.folder, name))]
    if not missing:
        return
    what = "" if len(missing) == len(where.files[split]) else \
        f"{os.path.relpath(os.path.join(where.folder, missing[0]), root)} is missing; "
    raise DatasetNotFound(f"{where.cls_name} {split} split not found in {root}: {what}pass --download to fetch it "
                          f"there, or --data-dir to point at the folder that holds it")


def check_idx_pair(images_path: str, labels_path: str) -> None:
    """An idx images file and its labels file are whole (the sizes their headers announce) and agree."""
    images, labels = _idx_count(images_path, dims=3), _idx_count(labels_path, dims=1)
    if images != labels:
        raise DataFileCorrupt(f"{images_path} holds {images} images but {labels_path} {labels} labels; "
                              f"{FIX.replace('it', 'them')}")


def _idx_count(path: str, *, dims: int) -> int:
    header_size = 4 + 4 * dims
    with open(path, "rb") as fh:
        header = fh.read(header_size)
    if len(header) < header_size or header[:3] != b"\0\0\x08" or header[3] != dims:
        raise DataFileCorrupt(f"{path} is not an idx file of {dims}-d uint8 data (its header is wrong); {FIX}")
    shape = struct.unpack(f">{dims}I", header[4:])
    size, expected = os.path.getsize(path), header_size + math.prod(shape)
    if size != expected:
        raise DataFileCorrupt(f"{path} is truncated or corrupt: its header announces {' x '.join(map(str, shape))} "
                              f"bytes ({expected:,} bytes in all), the file has {size:,}; {FIX}")
    return shape[0]


def _which_file_fails_its_md5(where: Layout) -> Optional[DataFileCorrupt]:
    from torchvision.datasets.utils import check_integrity

    for files in where.files.values():
        for name, md5 in files:
            path = os.path.join(where.folder, name)
            if md5 and not check_integrity(path, md5):
                return DataFileCorrupt(f"{path} is truncated or corrupt (its md5 is not the published one); {FIX}")
    return None


def _unreadable(split: str, where: Layout, exc: BaseException) -> DataFileCorrupt:
    names = ", ".join(name for name, _ in where.files[split])
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataFileCorrupt(f"{where.cls_name} {split} files ({names}) in {where.folder} cannot be read ({detail}); "
                           f"{FIX.replace('it', 'them')}")


# ---- downloading --------------------------------------------------------------------------------------


def fetch(where: Layout) -> None:
    """Download and extract the data set's archives, trying each mirror; DownloadFailed names the address,
    the reason and what to do instead."""
    from torchvision.datasets.utils import download_and_extract_archive

    for name, md5 in where.archives:
        tried = []
        for mirror in DOWNLOAD_MIRRORS[where.dataset]:
            url = f"{mirror}{name}"
            try:
                download_and_extract_archive(url, download_root=where.download_root, filename=name, md5=md5)
                break
            except (OSError, RuntimeError) as exc:  # URLError is an OSError; a wrong md5 a RuntimeError
                tried.append((url, _why(exc)))
        else:
            title = DATASETS[where.dataset].title
            if len(tried) == 1:
                failed = f"{title} download from {tried[0][0]} failed: {tried[0][1]}"
            else:
                failed = f"{title} download failed ({'; '.join(f'from {url}: {why}' for url, why in tried)})"
            raise DownloadFailed(f"{failed}; put the extracted files in {where.folder} (or the archive {name} in "
                                 f"{where.download_root}), or run once with network access")


def _why(exc: BaseException) -> str:
    from urllib.error import HTTPError, URLError

    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(exc, RuntimeError) and "corrupted" in str(exc):
        return "the file received is not the published one (its md5 differs)"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
