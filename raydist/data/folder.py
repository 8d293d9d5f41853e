"""The user's own images: a folder laid out as torchvision's ImageFolder, timm and fastai read it.

    index = scan_folder("~/photos", val_fraction=0.1)   # classes, and each split's files (path, bytes, label)
    images, labels, report = load_folder_split(index, "train", stored_size=256)

Layout: one subfolder per class (its name is the class name), images inside, at any depth below it. With
`train/` and `val/` (or `validation/`) subfolders, those are the splits and each holds the class folders;
without them a seeded share of each class (`val_fraction`) is held out for validation: the same files on
every run and every node, whatever --seed says (raydist.data.splits.held_out, on the files sorted by path).

The folder is a local path, a shared mount or a URI (s3://, gs://): it is listed and read through pyarrow's
filesystems, so every node reads its files itself. Images are decoded with Pillow (JPEG, PNG, WebP, BMP;
grey, 16-bit, RGBA, CMYK and palette images brought to 8-bit RGB as torchvision's loader does), their
shorter side resized to the stored size and centre-cropped to a square: the uint8 N x 3 x S x S tensor
that the training loop already holds for CIFAR, augmented on the device. Decoding runs on every core of
the node (Pillow releases the GIL while it decodes and resizes) and its result is cached on the node's
disk, keyed by the folder's file list and sizes, so the next run with the same folder starts in seconds.

Files that are not images by their name (.DS_Store, Thumbs.db, notes) are skipped and counted; files
named as images that cannot be decoded are skipped, counted and named in the run log, and more of them
than the run allows (--max-bad-images) stop it with one line.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from raydist.errors import FolderError, TooManyBadImages, first_line
from raydist.storage import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation")}
# ImageNet's per-channel statistics: what photos look like on average, and what pretrained models expect.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224  # ImageNet evaluation: resize to 256, centre-crop 224
CACHE_VERSION = 1  # bump when decode_image's output changes: older cache files are then not used
CACHE_ENV = "RAYDIST_CACHE_DIR"  # where decoded folders are cached (default ~/.cache/raydist/folders)
SHOWN_BAD_FILES = 5  # names of skipped files given in the run log


@dataclass(frozen=True)
class ImageFile:
    path: str  # relative to the folder's root, '/'-separated
    size: int  # bytes (part of the cache key: a file rewritten in place changes it)
    label: int


@dataclass
class FolderIndex:
    root: str  # as given (a local path expanded, or a URI)
    classes: list[str]  # index -> class name, sorted as ImageFolder sorts them
    splits: dict[str, list[ImageFile]]  # "train", "val"
    split_folders: bool  # True: train/ and val/ on disk; False: val held out of the class folders
    ignored: list[str] = field(default_factory=list)  # files not named as images (.DS_Store, ...)

    def total(self) -> int:
        """Image files of both splits."""
        return sum(len(files) for files in self.splits.values())

    def counts(self, split: str) -> list[int]:
        counts = [0] * len(self.classes)
        for f in self.splits[split]:
            counts[f.label] += 1
        return counts


def folder_filesystem(root: str):
    """(pyarrow filesystem, path inside it) of --data-dir, a local path or a URI; FolderError if it cannot
    be opened."""
    try:
        return filesystem(root)
    except Exception as exc:  # noqa: BLE001 - unknown scheme, bad bucket name, no credentials
        raise FolderError(f"--data-dir {root}: cannot open it ({first_line(exc)})") from None


def _list(fs, path: str, root: str):
    """Every entry under `path`, recursively (pyarrow FileInfo)."""
    import pyarrow.fs

    try:
        return fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except Exception as exc:  # noqa: BLE001 - permissions, an unreachable bucket, missing credentials
        raise FolderError(f"--data-dir {root}: cannot list it ({first_line(exc)})") from None


def is_image_file(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(fs, root_base: str, folder: str, root: str) -> tuple[list[str], dict[str, list], list[str]]:
    """(class names, class -> [(path relative to the root, bytes)], ignored files) of one folder of class
    folders: the root itself (`folder` "") or its train/ or val/ subfolder."""
    import pyarrow.fs

    base = f"{root_base}/{folder}" if folder else root_base
    where = f"{folder}/" if folder else "the folder"
    entries = _list(fs, base, root)
    classes = sorted(posixpath.basename(e.path) for e in entries
                     if e.type == pyarrow.fs.FileType.Directory and posixpath.dirname(e.path) == base
                     and not posixpath.basename(e.path).startswith("."))
    if not classes:
        raise FolderError(f"--data-dir {root}: {where} has no class subfolders; put each class's images in a "
                          f"folder named after the class ({folder or '.'}/<class>/<image>.jpg)")
    files: dict[str, list] = {name: [] for name in classes}
    ignored = []
    for e in entries:
        if e.type != pyarrow.fs.FileType.File:
            continue
        rel = posixpath.relpath(e.path, root_base)
        top = posixpath.relpath(e.path, base).split("/", 1)
        if len(top) == 2 and top[0] in files and is_image_file(e.path):
            files[top[0]].append((rel, e.size))
        else:  # not named as an image (.DS_Store, Thumbs.db, notes), or beside the class folders
            ignored.append(rel)
    return classes, files, ignored


def scan_folder(root: str, *, val_fraction: float) -> FolderIndex:
    """List the folder and split it (see the module docstring); FolderError for a folder that cannot be a
    data set. Listing only: no image is opened."""
    return _scan(str(root), float(val_fraction))


@functools.lru_cache(maxsize=8)
def _scan(root: str, val_fraction: float) -> FolderIndex:
    import pyarrow.fs
    import torch

    from raydist.data.splits import held_out

    fs, base = folder_filesystem(root)
    try:
        info = fs.get_file_info(base)
    except Exception as exc:  # noqa: BLE001
        raise FolderError(f"--data-dir {root}: cannot read it ({first_line(exc)})") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FolderError(f"--data-dir {root}: no such folder; give the folder that holds one subfolder per class")
    if info.type == pyarrow.fs.FileType.File:
        raise FolderError(f"--data-dir {root}: is a file, not a folder; give the folder that holds one subfolder "
                          f"per class")
    top = {posixpath.basename(e.path): e for e in fs.get_file_info(pyarrow.fs.FileSelector(base))}
    if not top:
        raise FolderError(f"--data-dir {root}: the folder is empty; put each class's images in a subfolder named "
                          f"after the class")
    split_names = {split: next((n for n in names if n in top and top[n].type == pyarrow.fs.FileType.Directory),
                               None) for split, names in SPLIT_FOLDERS.items()}
    ignored: list[str] = []
    if split_names["train"] and split_names["val"]:
        per_split = {}
        for split, folder in split_names.items():
            classes, files, skipped = _class_folders(fs, base, folder, root)
            per_split[split] = (classes, files)
            ignored += skipped
        train_classes, val_classes = per_split["train"][0], per_split["val"][0]
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise FolderError(f"--data-dir {root}: {split_names['train']}/ and {split_names['val']}/ hold different "
                              f"classes (only in {split_names['train']}/: {', '.join(only_train) or 'none'}; only "
                              f"in {split_names['val']}/: {', '.join(only_val) or 'none'}); give both the same "
                              f"class folders")
        classes = train_classes
        splits = {split: _files(files, classes) for split, (_, files) in per_split.items()}
        _check_classes(root, classes, per_split["train"][1], where=f"{split_names['train']}/")
        _check_classes(root, classes, per_split["val"][1], where=f"{split_names['val']}/")
    else:
        classes, files, ignored = _class_folders(fs, base, "", root)
        _check_classes(root, classes, files, where="")
        every = _files(files, classes)
        mask = held_out(torch.tensor([f.label for f in every]), val_fraction).tolist()
        splits = {"train": [f for f, held in zip(every, mask) if not held],
                  "val": [f for f, held in zip(every, mask) if held]}
        if not splits["val"]:
            raise FolderError(f"--data-dir {root}: --val-fraction {val_fraction} holds out no image; give a larger "
                              f"share or train/ and val/ subfolders")
    return FolderIndex(root=root, classes=classes, splits=splits,
                       split_folders=bool(split_names["train"] and split_names["val"]), ignored=sorted(ignored))


def _files(files: dict[str, list], classes: list[str]) -> list[ImageFile]:
    """Every image as an ImageFile, sorted by path: the same order on every node and every run."""
    out = [ImageFile(path, size, label) for label, name in enumerate(classes) for path, size in files[name]]
    return sorted(out, key=lambda f: f.path)


def _check_classes(root: str, classes: list[str], files: dict[str, list], *, where: str) -> None:
    if len(classes) < 2:
        raise FolderError(f"--data-dir {root}: {where or 'the folder'} has a single class ({classes[0]}); a "
                          f"classifier needs at least 2 class subfolders")
    empty = [name for name in classes if not files[name]]
    if empty:
        raise FolderError(f"--data-dir {root}: class folder {where}{empty[0]} holds no image file "
                          f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")


# ---- decoding -------------------------------------------------------------------------------------


def stored_size(input_size: int) -> int:
    """Side of the square an image is stored at for an input of `input_size` pixels: evaluation's centre
    crop is then ImageNet's resize-256 / crop-224 at any size."""
    return int(round(input_size * EVAL_RESIZE_RATIO))


def decode_image(data: bytes, size: int) -> np.ndarray:
    """One image file's bytes -> uint8 3 x size x size (shorter side resized to `size`, centre square).
    Raises an exception (OSError, ValueError, ...) for a file Pillow cannot decode."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":  # decode JPEGs at a reduced scale when they are far larger than needed
            img.draft("RGB", (size, size))
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit (and 32-bit integer) grey: keep the top 8 bits; Pillow's convert would clip to 255.
            array = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
            shift = 24 if img.mode == "I" and array.max() > 65535 else 8
            img = Image.fromarray((array >> shift).astype(np.uint8), mode="L")
        if img.mode != "RGB":  # grey, palette, RGBA (alpha dropped), CMYK, ...: as torchvision's loader does
            img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None if scale >= 1 else 3.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


@dataclass
class DecodeReport:
    decoded: int
    bad: list[str]  # image files that could not be read or decoded (relative paths)
    from_cache: bool = False
    seconds: float = 0.0

    def line(self, split: str) -> str:
        """For the run log: what was decoded, and what was skipped (the first few names)."""
        text = f"{split}: {self.decoded} images" + (" (from the cache)" if self.from_cache else
                                                    f" decoded in {self.seconds:.1f} s")
        if self.bad:
            text += f"; skipped {len(self.bad)} unreadable image file(s): {first_names(self.bad)}"
        return text


def _cache_file(index: FolderIndex, split: str, size: int) -> str:
    key = hashlib.sha256(repr((CACHE_VERSION, index.root, split, size,
                               [(f.path, f.size, f.label) for f in index.splits[split]])).encode()).hexdigest()[:24]
    folder = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/raydist/folders")
    return os.path.join(folder, f"{key}.pt")


def load_folder_split(index: FolderIndex, split: str, *, stored: int, max_bad: Optional[int] = None,
                      threads: Optional[int] = None, use_cache: bool = True
                      ) -> tuple["torch.Tensor", "torch.Tensor", DecodeReport]:
    """(uint8 N x 3 x S x S, int64 labels, report) of one split, decoded on `threads` threads (default: every
    core) or read from the node's cache. Files that cannot be decoded are left out; more than `max_bad` of
    them (None: any number) raise TooManyBadImages naming the first."""
    import time

    import torch

    files = index.splits[split]
    cache = _cache_file(index, split, stored) if use_cache else None
    if cache and os.path.exists(cache):
        try:
            saved = torch.load(cache, weights_only=True)
            report = DecodeReport(decoded=len(saved["labels"]), bad=list(saved["bad"]), from_cache=True)
            _check_bad(index, split, report, max_bad)
            return saved["images"], saved["labels"], report
        except TooManyBadImages:
            raise
        except Exception:  # noqa: BLE001 - a cache file cut short or from another version: decode again
            pass
    t0 = time.perf_counter()
    fs, base = folder_filesystem(index.root)

    def decode(f: ImageFile) -> Optional[np.ndarray]:
        try:
            with fs.open_input_stream(f"{base}/{f.path}") as stream:
                return decode_image(stream.read(), stored)
        except Exception:  # noqa: BLE001 - unreadable or corrupt: skipped, counted and named
            return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        arrays = list(pool.map(decode, files))
    good = [i for i, a in enumerate(arrays) if a is not None]
    report = DecodeReport(decoded=len(good), bad=[files[i].path for i, a in enumerate(arrays) if a is None],
                          seconds=time.perf_counter() - t0)
    _check_bad(index, split, report, max_bad)
    images = torch.from_numpy(np.stack([arrays[i] for i in good])) if good else \
        torch.zeros((0, 3, stored, stored), dtype=torch.uint8)
    labels = torch.tensor([files[i].label for i in good], dtype=torch.long)
    if cache:
        _write_cache(cache, {"images": images, "labels": labels, "bad": report.bad})
    return images, labels, report


def _check_bad(index: FolderIndex, split: str, report: DecodeReport, max_bad: Optional[int]) -> None:
    if max_bad is not None and len(report.bad) > max_bad:
        raise TooManyBadImages(f"--data-dir {index.root}: {len(report.bad)} of the {split} split's "
                               f"{len(index.splits[split])} image files cannot be decoded (first: {report.bad[0]}), "
                               f"more than --max-bad-images {max_bad} allows; remove or replace them, or raise "
                               f"--max-bad-images")


def _write_cache(path: str, content: dict) -> None:
    """Written beside and renamed over: two workers of a node never read a half-written cache file."""
    import torch

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(content, tmp)
        os.replace(tmp, path)
    except OSError:  # a full or read-only disk costs the next run its start-up time, not this run
        pass


def decoded_bytes(index: FolderIndex, stored: int) -> int:
    """What one worker holds of the folder decoded (both splits, uint8 3 x S x S)."""
    return index.total() * 3 * stored * stored


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_in_memory(per_worker: int, workers: int, memory_bytes: Optional[int] = None) -> bool:
    """The memory path's budget: every worker of a machine holds its own copy, and together they may take
    half of the machine's memory (the rest is the model, activations, Ray's object store and the system)."""
    return per_worker * workers <= (host_memory_bytes() if memory_bytes is None else memory_bytes) / 2


def bad_image_limit(index: FolderIndex, max_bad_images: Optional[int]) -> int:
    """--max-bad-images, or unset: 0.1% of the folder's image files, rounded down."""
    return index.total() // 1000 if max_bad_images is None else max_bad_images


def first_names(names: list[str]) -> str:
    """The first SHOWN_BAD_FILES names for the run log, with "..." when there are more."""
    return ", ".join(names[:SHOWN_BAD_FILES]) + (", ..." if len(names) > SHOWN_BAD_FILES else "")


DECODE_CPUS = 0.5  # per map task: the streamed path needs CPUs the workers leave free (checked before Ray)
