"""The run folder's files that raydist reads back: the saved config and the checkpoints a resume starts from.

    is_run_dir, saved = read_resume_target("runs/digits-resnet8-...")   # --resume: run folder or checkpoint?
    latest_checkpoint("runs/digits-resnet8-...")                        # its newest readable checkpoint folder
    write_config(cfg)                                                   # <storage>/<name>/config.yaml

A run folder (local path or URI: everything goes through pyarrow's filesystems) holds config.yaml, written
before training starts, and checkpoint_epoch_NNNN/checkpoint.pt folders (raydist.loop writes their
content). A checkpoint folder can also be given to --resume on its own: it starts a new run from it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import yaml

from raydist.config.fields import TrainConfig
from raydist.data.sizes import predicted_class_names
from raydist.errors import ConfigError
from raydist.runs.checkpoints import checkpoint_epoch, epochs_done, latest_checkpoint
from raydist.storage import filesystem, read_bytes

CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"  # index -> class name of the run's model


def read_resume_target(path: str) -> tuple[bool, dict]:
    """For --resume: (is it a run folder?, the config saved with it).

    A run folder is continued in place: Ray Train hands its latest checkpoint to the workers. A checkpoint
    folder starts a new run from exactly that checkpoint (continuing its old run in place would make Ray
    pick that run's latest checkpoint instead).
    """
    import io

    from raydist.errors import CorruptCheckpoint
    from raydist.runs.checkpoints import CHECKPOINT_FILE, load_checkpoint_file

    def read(name: str) -> Optional[bytes]:
        return read_bytes(f"{path}/{name}")  # an absolute local path or a URI

    checkpoint = read(CHECKPOINT_FILE)
    if checkpoint is not None:
        try:
            return False, load_checkpoint_file(io.BytesIO(checkpoint), name=f"{path}/{CHECKPOINT_FILE}")["config"]
        except CorruptCheckpoint as exc:  # cut short by a crash, or not a checkpoint: before any cluster starts
            raise ConfigError(f"--resume {path}: {exc}") from None
    config = read(CONFIG_FILE)
    if config is not None:
        return True, _saved_config(config, f"{path}/{CONFIG_FILE}")
    raise ConfigError(f"--resume {path}: neither a run folder (with {CONFIG_FILE}) nor a checkpoint folder "
                      f"(with {CHECKPOINT_FILE})")


def _saved_config(text: bytes, where: str) -> dict:
    """A run folder's config.yaml: a mapping of config keys, else one line naming the file."""
    try:
        saved = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--resume: {where} is not valid YAML; it is the config raydist saved with the run: "
                          f"restore it, or start a new run from a checkpoint folder in that run") from None
    if not isinstance(saved, dict) or not saved:
        raise ConfigError(f"--resume: {where} holds {'nothing' if not saved else type(saved).__name__}, not the "
                          f"run's config; restore it, or start a new run from a checkpoint folder in that run")
    return saved


def check_epochs_left(resume: str, is_run_dir: bool, epochs: int) -> None:
    """--epochs is the run's total, counted from its start: at or below the checkpoint's epoch there is
    nothing left to train (Ray would run no epoch and write a final model without metrics)."""
    if is_run_dir:
        latest = latest_checkpoint(resume)
        done = epochs_done(os.path.basename(latest)) if latest else 0
    else:
        done = checkpoint_epoch(resume)
    if epochs <= done:
        raise ConfigError(f"--resume {resume}: the run has trained {done} epoch(s) and --epochs {epochs} is the "
                          f"total from its start, so nothing is left to do; give --epochs above {done} to train "
                          f"{'more' if epochs == done else 'on'}")


def write_config(cfg: TrainConfig) -> None:
    """Save the resolved config in the run folder (local path or URI) before training starts."""

    from raydist.storage import write_atomically

    fs, root = filesystem(cfg.storage_path)
    fs.create_dir(f"{root}/{cfg.name}", recursive=True)
    # Atomic: a run killed while writing it must not leave a folder that --resume cannot read.
    write_atomically(f"{cfg.storage_path}/{cfg.name}/{CONFIG_FILE}",
                     yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    # Index -> class name, so the run's models can be used without the data (raydist.predict).
    write_atomically(f"{cfg.storage_path}/{cfg.name}/{CLASSES_FILE}",
                     json.dumps(predicted_class_names(cfg), indent=1).encode())
