"""THE checkpoint and final-model format, its one owner: write and read checkpoint.pt and model_final.pt
(best_model.pt), name checkpoint folders (checkpoint_epoch_NNNN, and _at_NNNNNNN inside an epoch, in every
context), find the latest readable one, and rank kept checkpoints by the run's metric.
"""

from __future__ import annotations

import io
import math
import os
import sys
from typing import Optional

import torch

from raydist.config.fields import TrainConfig
from raydist.config.values import metric_mode
from raydist.data.sizes import classes_predicted, predicted_class_names
from raydist.errors import CorruptCheckpoint
from raydist.storage import filesystem, is_uri, read_bytes

CHECKPOINT_PREFIX = "checkpoint_epoch_"


def checkpoint_epoch(folder: str) -> int:
    if not is_uri(folder):  # mapped, not read: only the small "epoch" entry is touched
        return int(torch.load(f"{folder}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=True, mmap=True)["epoch"])
    fs, root = filesystem(folder)
    with fs.open_input_stream(f"{root}/{CHECKPOINT_FILE}") as fh:
        return int(torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)["epoch"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The run folder's highest-epoch `checkpoint_epoch_NNNN` folder whose checkpoint can be read, or None.
    A newer one that cannot (cut short by a crash while it was written) is skipped with a one-line warning
    naming it."""
    found = latest_readable_checkpoint(run_dir)
    return found[0] if found else None


def latest_readable_checkpoint(run_dir: str) -> Optional[tuple[str, dict]]:
    """(folder, content) of the run folder's latest readable checkpoint (as latest_checkpoint), or None."""
    for folder in reversed(checkpoint_folders(run_dir)):
        try:
            return folder, read_checkpoint(folder)
        except CorruptCheckpoint as exc:
            print(f"warning: {exc}; skipping it", file=sys.stderr, flush=True)
    return None


def epochs_done(folder_name: str) -> int:
    """The whole epochs trained at a checkpoint, from its folder's name: checkpoint_epoch_0004, or
    checkpoint_epoch_0004_at_0000640 (written inside the fifth epoch, 640 images in)."""
    return int(folder_name[len(CHECKPOINT_PREFIX):].split("_", 1)[0])


def checkpoint_folders(run_dir: str) -> list[str]:
    """The run folder's `checkpoint_epoch_NNNN` folders that hold a checkpoint file, oldest first."""
    import pyarrow.fs

    fs, root = filesystem(run_dir)  # an absolute local path or a URI
    found = sorted(os.path.basename(info.path)
                   for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
                   if os.path.basename(info.path).startswith(CHECKPOINT_PREFIX)
                   and fs.get_file_info(f"{info.path}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File)
    return [f"{run_dir}/{name}" for name in found]


def read_checkpoint(folder: str) -> dict:
    """A checkpoint folder's content (local or URI); CorruptCheckpoint when it cannot be read."""
    return read_model_file(f"{folder}/{CHECKPOINT_FILE}")



    fs, inner = filesystem(folder)
    with fs.open_input_stream(f"{inner}/{CHECKPOINT_FILE}") as fh:
        return load_checkpoint_file(io.BytesIO(fh.read()), name=f"{folder}/{CHECKPOINT_FILE}")


CHECKPOINT_FILE = "checkpoint.pt"


FINAL_MODEL_FILE = "model_final.pt"


def checkpoint_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_checkpoint_file(path: str, *, name: Optional[str] = None) -> dict:
    """A checkpoint's content; CorruptCheckpoint naming the file (`name`: how to call it, when `path` is a
    local copy of a remote one) if it is truncated or not a checkpoint."""
    try:
        # Tensors, numbers and strings only: a checkpoint that would run code when unpickled is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CorruptCheckpoint(f"checkpoint {name or path} is unreadable (truncated or corrupt: {reason[:160]})") \
            from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"checkpoint {name or path} is not a raydist checkpoint (not a mapping)")
    return state


def final_model_bytes(model_state: dict, config: dict, metrics: Optional[dict], **extra) -> bytes:
    """The final-model file (model_final.pt, and a study's best_model.pt): the weights, the config that
    made them, and what the model needs to be rebuilt (raydist.models.transfer.load_trained_model)."""
    cfg = TrainConfig.from_dict(config)
    return checkpoint_bytes({"model": model_state, "config": config, "model_name": cfg.model,
                             "model_args": cfg.model_args, "num_classes": classes_predicted(cfg),
                             "class_names": predicted_class_names(cfg),
                             "metrics": metrics, **extra})


def checkpoint_dir_name(epoch: int, position: int = 0) -> str:
    """The folder a checkpoint of `epoch` is stored in, inside the run folder (Ray Train's runs and a
    one-worker trial's alike; raydist.runs.run_folder finds them by this name). One written inside the next
    epoch, `position` images in (a spot notice's), sorts between that epoch's and the next's."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}" + (f"_at_{position:07d}" if position else "")


def read_model_file(path: str) -> dict:
    """A model_final.pt, best_model.pt or checkpoint.pt, from a local path or a URI (s3://...);
    CorruptCheckpoint naming it when it cannot be read."""
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"no such file: {path}")
    return load_checkpoint_file(io.BytesIO(data), name=path)


# ---- which checkpoint is best ----------------------------------------------------------------------------


def merit(metrics: dict, metric: str, mode: Optional[str] = None) -> float:
    """An epoch's `metric` scored so that higher is better (val_acc as it is, val_loss negated; `mode`
    overrides the metric's own direction); -inf when it was not measured or is not finite."""
    value = metrics.get(metric)
    sign = 1 if (mode or metric_mode(metric)) == "max" else -1
    return sign * value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def best_checkpoint(kept: list[tuple[dict, str]], metric: str) -> Optional[tuple[dict, str]]:
    """The (metrics, path) of `kept` whose epoch scored best by `metric` (the earliest of equals), or None."""
    return max(kept, key=lambda c: merit(c[0], metric), default=None)


def checkpoints_to_keep(kept: list[tuple[dict, str]], metric: str, best_few: int, *, pin_every: int = 0) -> set[str]:
    """The paths a run keeps: its `best_few` best by `metric` (the later of equals) and its latest; with
    `pin_every`, also the latest two at epochs that are multiples of it (a PBT trial's offers)."""
    latest = max(kept, key=lambda c: c[0]["epoch"])
    best = sorted(kept, key=lambda c: (merit(c[0], metric), c[0]["epoch"]), reverse=True)[:best_few]
    pinned = sorted((c for c in kept if pin_every and c[0]["epoch"] % pin_every == 0), key=lambda c: c[0]["epoch"])[-2:]
    return {path for _, path in best + pinned} | {latest[1]}
