"""An image folder too large to hold decoded in every worker's memory, streamed through Ray Data.

    source = StreamSource(index, "train", stored=256)       # on a Train worker (or a one-worker trial)
    for images, labels in source.batches(index_batches):    # uint8 B x 3 x S x S on the worker's device
        ...

The batches are the memory path's: the same seeded per-epoch permutation, the same padding so that every
rank runs the same number of steps, the same unpadded exactly-once shards for evaluation
(raydist.data.splits.shard_indices). What changes is where the pixels come from: each call builds a Ray Data
pipeline over this rank's files of the epoch (`ray.data.from_items` of their paths), whose map tasks read
and decode them (raydist.ray_edge.decode.decode_files) on any node of the cluster with a free CPU, and the
rank iterates the decoded uint8 batches with prefetching and a local shuffle buffer. Memory per node is
bounded by Ray Data's streaming window, not by the folder's size; augmentation stays batched on the
device, as for every data set.

Why a pipeline per rank and epoch rather than Ray Train's `datasets=` with `get_dataset_shard`: Ray Train
splits a dataset across workers with `streaming_split(equal=True)`, which drops the remainder rows, so
validation would not count every image exactly once; and its order could not follow the run's seed per
epoch across a resume. Building the rank's own list keeps both exact and costs two pipeline starts (training
and validation) per rank and epoch: about 4 s of an epoch on the 2-core test cluster (docs/benchmarks.md).

A file that cannot be decoded leaves a hole in its batch: the batch is topped up with images of the rank's
previous batch (in training; evaluation just counts one image fewer), so every rank still runs the same
number of steps. Each rank names the files it skipped, and a rank that has met more than --max-bad-images
of them stops the run.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch

from raydist.config.fields import TrainConfig
from raydist.data.folder import DECODE_CPUS, SHOWN_BAD_FILES, FolderIndex, bad_image_limit, stored_size
from raydist.data.sizes import input_side
from raydist.data.sources import folder_index
from raydist.errors import DataUnavailable, TooManyBadImages
from raydist.ray_edge.decode import decode_files

DECODE_BATCH = 64  # files per Ray Data map call: enough to amortise the call, small enough to spread
PREFETCH_BATCHES = 4  # training batches decoded ahead of the step


def quiet_ray_data() -> None:
    """No progress bars or per-dataset log lines in the run's console: a pipeline runs every epoch."""
    import logging

    import ray.data  # RAY

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # first: switching the bars off logs a warning
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False


class StreamSource:
    """One split of an image folder, read and decoded by Ray Data as it is iterated (see the module)."""
    streamed = True

    def __init__(self, index: FolderIndex, split: str, *, stored: int, device="cpu",
                 max_bad: Optional[int] = None, rank: int = 0):
        self.index, self.split, self.stored = index, split, stored
        self.files = index.splits[split]
        self.device = torch.device(device)
        # Each epoch gives a rank other files: over the epochs, the bad files one rank has met approach all
        # of them, so the limit is the run's, applied to what this rank has met.
        self.max_bad = max_bad
        self.rank = rank
        self.bad: set[str] = set()
        self._told_nodes = False
        quiet_ray_data()
        self.decoded_on: dict[str, int] = {}  # node id -> images decoded there for this rank

    def __len__(self) -> int:
        return len(self.files)

    def to(self, device) -> "StreamSource":
        self.device = torch.device(device)
        return self

    def batches(self, index_batches: Iterable[torch.Tensor], *, train: bool,
                shuffle_seed: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) on the device, one pair per batch of indices and of its size; in training
        every batch has its full size (holes topped up), in evaluation each image comes once."""
        import ray.data  # RAY

        sizes = [len(b) for b in index_batches]
        if not sizes:
            return
        order = torch.cat(list(index_batches)).cpu().tolist()
        items = [{"path": self.files[i].path, "label": self.files[i].label} for i in order]
        blocks = max(1, math.ceil(len(items) / DECODE_BATCH))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(  # RAY
            decode_files, fn_kwargs={"root": self.index.root, "stored": self.stored}, batch_size=DECODE_BATCH,
            batch_format="numpy", num_cpus=DECODE_CPUS)
        rows = ds.iter_batches(batch_size=sizes[0], batch_format="numpy", prefetch_batches=PREFETCH_BATCHES,  # RAY
                               drop_last=False, local_shuffle_buffer_size=4 * sizes[0] if train else None,
                               local_shuffle_seed=shuffle_seed if train else None)
        previous: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        pending_images, pending_labels, yielded = [], [], 0
        for batch in rows:
            self._account(batch)
            ok = batch["ok"]
            pending_images.append(torch.from_numpy(batch["image"][ok]))
            pending_labels.append(torch.from_numpy(batch["label"][ok]))
            while yielded < len(sizes) and sum(len(p) for p in pending_labels) >= sizes[yielded]:
                images, labels = torch.cat(pending_images), torch.cat(pending_labels)
                size = sizes[yielded]
                pending_images, pending_labels = [images[size:]], [labels[size:]]
                previous = (images[:size], labels[:size])
                yield previous[0].to(self.device, non_blocking=True), previous[1].to(self.device, non_blocking=True)
                yielded += 1
        self._check_bad()
        if train and not self._told_nodes:  # once, from every rank: where the cluster decoded its images
            self._told_nodes = True
            where = ", ".join(f"{node[:8]} {count}" for node, count in sorted(self.decoded_on.items()))
            print(f"data: rank {self.rank}: the first epoch's {self.split} images were decoded by Ray Data on "
                  f"{len(self.decoded_on)} node(s) (images per node: {where})", flush=True)
        images = torch.cat(pending_images) if pending_images else torch.zeros((0, 3, self.stored, self.stored),
                                                                              dtype=torch.uint8)
        labels = torch.cat(pending_labels) if pending_labels else torch.zeros(0, dtype=torch.long)
        if not train:  # what is left, with the holes of the files that could not be decoded
            if len(labels):
                yield images.to(self.device), labels.to(self.device)
            return
        while yielded < len(sizes):  # holes: top up from the previous batch so every rank runs its steps
            size, short = sizes[yielded], sizes[yielded] - len(labels)
            if previous is None and not len(labels):
                raise TooManyBadImages(f"--data-dir {self.index.root}: none of this worker's {self.split} images "
                                       f"could be decoded (first: {min(self.bad, default='?')})")
            source_images, source_labels = previous if previous is not None else (images, labels)
            take = torch.arange(short) % len(source_labels)
            images = torch.cat([images, source_images[take]])
            labels = torch.cat([labels, source_labels[take]])
            previous = (images[:size], labels[:size])
            yield previous[0].to(self.device), previous[1].to(self.device)
            images, labels = images[size:], labels[size:]
            yielded += 1

    def _account(self, batch: dict) -> None:
        for node, ok, path in zip(batch["node"], batch["ok"], batch["path"]):
            self.decoded_on[node] = self.decoded_on.get(node, 0) + 1
            if not ok and path not in self.bad:
                self.bad.add(path)
                if len(self.bad) <= SHOWN_BAD_FILES:  # every rank names the first few it meets
                    print(f"data: rank {self.rank}: {self.split}: skipped an unreadable image file: {path}",
                          flush=True)

    def _check_bad(self) -> None:
        if self.max_bad is not None and len(self.bad) > self.max_bad:
            first = sorted(self.bad)[0]
            raise TooManyBadImages(f"--data-dir {self.index.root}: {len(self.bad)} of the {self.split} split's "
                                   f"{len(self.files)} image files cannot be decoded (first: {first}), more than "
                                   f"--max-bad-images {self.max_bad} allows; remove or replace them, or raise "
                                   f"--max-bad-images")


def stream_splits(cfg: TrainConfig, *, device, log=None, rank: int = 0):
    """The image folder's train and val splits as Ray Data streams (raydist.ray_edge.stream.StreamSource)."""
    if cfg.classes or cfg.train_fraction != 1.0 or cfg.train_per_class:
        raise DataUnavailable("--classes, --train-fraction and --train-per-class select images of a folder held in "
                              "memory; the streamed path reads the whole folder (use --data-loader memory)")
    index = folder_index(cfg.data_dir, cfg.val_fraction)
    max_bad = bad_image_limit(index, cfg.max_bad_images)
    if log is not None:
        log(f"streaming {len(index.splits['train'])} training and {len(index.splits['val'])} validation images "
            f"through Ray Data")
    return tuple(StreamSource(index, split, stored=stored_size(input_side(cfg)), device=device, max_bad=max_bad,
                              rank=rank) for split in ("train", "val"))
