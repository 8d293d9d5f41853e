"""A worker's data and starting weights, loaded once per node: the first rank of each node loads (and
downloads) first, so a data set missing on a node is one line naming it; an image folder held in memory or
streamed, one choice for the whole group.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from raydist.config.fields import TrainConfig
from raydist.data.folder import decoded_bytes, fits_in_memory, stored_size
from raydist.data.registry import DATASETS
from raydist.data.sizes import class_list, input_side
from raydist.data.sources import download_lock, folder_index, load_splits
from raydist.errors import DatasetNotFound, DataUnavailable, FolderError, WeightsError, WorkerInputError
from raydist.models.transfer import pretrained_source, read_weights_file


def load_source(cfg: TrainConfig, *, node_id: str):
    """The pretrained weights a run starts from (None from scratch), read on this worker's node; missing
    weights are the run's one-line cause, naming the node."""
    if not cfg.starts_pretrained():
        return None
    try:
        if cfg.weights:
            return read_weights_file(cfg.weights)
        try:
            lock = download_lock(torch.hub.get_dir())  # the node's ranks download once, into one cache
        except OSError:  # a read-only cache: nothing will be downloaded into it anyway
            lock = contextlib.nullcontext()
        with lock:
            return pretrained_source(cfg.model, where=f" of node {node_id}", model_args=cfg.model_args)
    except WeightsError as exc:
        raise WorkerInputError(f"{exc} (on node {node_id})" if cfg.weights else str(exc)) from None


def load_data_once_per_node(cfg: TrainConfig, *, device, rank: int, world: int, node_id: str,
                            open_stream: Optional[Callable[..., tuple]] = None):
    """Both splits on this rank's device. The first rank of each node loads them first (downloading them
    once per node with --download), so a data set missing on a node is found there, once, and every rank
    raises the same one-line error naming each node that lacks it, instead of N tracebacks."""
    spec = DATASETS[cfg.dataset]
    options = dict(data_dir=cfg.data_dir, download=cfg.download, val_fraction=cfg.val_fraction,
                   fake_image_size=cfg.fake_image_size, fake_num_classes=cfg.fake_num_classes,
                   fake_train_size=cfg.fake_train_size, fake_val_size=cfg.fake_val_size,
                   classes=class_list(cfg), train_fraction=cfg.train_fraction, train_per_class=cfg.train_per_class,
                   channels=cfg.input_channels(), input_size=cfg.input_size, max_bad_images=cfg.max_bad_images)

    def load(log=None):
        if streamed:
            if open_stream is None:
                raise DataUnavailable("streaming an image folder needs Ray Data (a run through Ray Train); "
                                      "use --data-loader memory")
            return open_stream(cfg, device=device, log=log, rank=rank)
        with download_lock(cfg.data_dir) if (cfg.download and spec.needs_files) else contextlib.nullcontext():
            return load_splits(cfg.dataset, ("train", "val"), device=device, log=log, **options)

    streamed = False
    if not spec.needs_files:  # embedded or generated: nothing to find on the node
        return load()
    nodes = [node_id]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node_id)
    if cfg.dataset == "folder":
        # One choice for the whole group: a folder held in memory leaves out the files that do not decode,
        # a streamed one tops up their holes, so the two could count different steps per epoch.
        streamed = streams_folder(cfg, workers_here=nodes.count(node_id), device_bytes=device_memory_bytes(device))
        if world > 1:
            choices = [None] * world
            dist.all_gather_object(choices, streamed)
            streamed = any(choices)
    splits, problem, user_side = None, "", True
    if nodes.index(node_id) == rank:  # this node's first rank
        try:
            splits = load(log=lambda line: print(f"data: {line}", flush=True) if rank == 0 else None)
            print(f"data: {cfg.dataset} ready in {os.path.expanduser(cfg.data_dir)} on node {node_id}", flush=True)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below, whatever failed

            # missing, a download that failed, an image folder this node cannot use
            user_side = isinstance(exc, (DatasetNotFound, OSError, FolderError))
            text = str(exc).splitlines()[0] if str(exc) else ""
            problem = text if user_side else f"{type(exc).__name__} while loading {cfg.dataset}: {text}"
    outcomes = [(node_id, problem, user_side)]
    if world > 1:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, (node_id, problem, user_side))
    failed = sorted({outcome for outcome in outcomes if outcome[1]})
    if failed:
        message = "; ".join(f"on node {node}: {why}" for node, why, _ in failed)
        # Data missing, damaged or not downloadable on a node (raydist.data.published' errors are OSErrors) is the
        # run's one-line cause; anything else (out of memory, a bug) is raised as an error of the program,
        # still named per node, by every rank alike.
        raise (DataUnavailable if all(user for _, _, user in failed) else RuntimeError)(message)
    return splits or load()


def folder_copy_bytes(cfg: TrainConfig) -> int:
    """What one worker holds of cfg's image folder decoded, on the memory path."""
    return decoded_bytes(folder_index(cfg.data_dir, cfg.val_fraction), stored_size(input_side(cfg)))


# The share of a GPU's memory the memory path may hold the decoded folder in: the rest is the model's
# (weights, optimizer state, activations). A 100k-image folder at 256 px (18.3 GiB) on a 24 GB A10G passed
# the host-memory budget and left about 4 GB to train in.
DEVICE_SHARE = 0.25


def device_memory_bytes(device) -> Optional[int]:
    """A GPU's memory (None on a CPU, whose copy is budgeted against the host's)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def streams_folder(cfg: TrainConfig, *, workers_here: int, memory_bytes: Optional[int] = None,
                   device_bytes: Optional[int] = None) -> bool:
    """Whether a machine (of `memory_bytes`, default this one) streams the image folder (raydist.ray_edge.stream)
    rather than hold it decoded: asked for, or auto's choice when the copies of its `workers_here` workers
    would not fit in half its memory, or (on a GPU of `device_bytes`, where each worker holds its copy) one
    copy would take more than DEVICE_SHARE of the GPU. The one rule for the workers, the checks before Ray
    and a study's plan (these two know no GPU: its workers decide for it)."""
    if cfg.data_loader != "auto":
        return cfg.data_loader == "stream"
    copy = folder_copy_bytes(cfg)
    return not fits_in_memory(copy, workers_here, memory_bytes) or (
        device_bytes is not None and copy > DEVICE_SHARE * device_bytes)


def data_batches(source, index_batches, *, train: bool, shuffle_seed: Optional[int] = None):
    """(images, labels) for each batch of indices: indexed on the device, or read from a Ray Data stream."""
    if getattr(source, "streamed", False):
        return source.batches(index_batches, train=train, shuffle_seed=shuffle_seed)
    return (source.batch(indices) for indices in index_batches)
