"""Weights & Biases for one run (`--wandb`): rank 0 logs each epoch's metrics, as it writes TensorBoard's.

    logger = WandbRun.start(cfg, folder=log_dir, run_name="cifar100-resnet50-...")
    logger.log(metrics)      # once per epoch
    logger.finish()

Without an API key (WANDB_API_KEY or ~/.netrc) it logs offline into FOLDER/wandb/offline-run-*, which
`wandb sync` uploads later; a study's trials use Ray's WandbLoggerCallback instead (raydist.tune --wandb).

One raydist run is one W&B run: raydist.train gives each new run an id (--wandb-id, kept in config.yaml),
and every start of the run's workers (a restart after a failure, a resize, `--resume RUN_FOLDER`) continues
it (`resume="allow"`), as history.jsonl and curves.png continue. Each start used to open a new W&B run.
Epochs trained again after a restart (those after the last checkpoint) keep their first values in W&B,
whose steps only go up; history.jsonl has the values of the run that went on.
"""

from __future__ import annotations

import os
from typing import Optional

# What an epoch's metrics send: the curves; the rest (paths, reasons, clocks) stays in history.jsonl.
LOGGED = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "val_loss_tta", "val_acc_tta", "lr",
          "grad_norm", "images_per_s", "epoch_time_s", "world_size", "global_batch")


def key_present() -> bool:
    """An API key W&B would find: the environment's, or `wandb login`'s in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def offline_unless_key() -> Optional[str]:
    """The W&B mode to use: the environment's WANDB_MODE, else "offline" when no key is set (None: online)."""
    return os.environ.get("WANDB_MODE") or (None if key_present() else "offline")


def run_id(run_folder: str) -> str:
    """A W&B run id from `run_folder` (its storage path and name), for a loop started without --wandb-id
    (not through raydist.train): the same on every start of that run, different for every other folder."""
    import hashlib

    return "raydist-" + hashlib.sha1(run_folder.rstrip("/").encode()).hexdigest()[:16]


class WandbRun:
    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, config: dict, *, folder: str, run_name: str, project: Optional[str],
              run_id: Optional[str] = None) -> "WandbRun":
        import wandb

        mode = offline_unless_key()
        os.makedirs(folder, exist_ok=True)
        run = wandb.init(project=project or "raydist", name=run_name, config=config, dir=folder, mode=mode,
                         id=run_id, resume="allow" if run_id else None,
                         settings=wandb.Settings(silent=True))
        where = f"offline to {run.dir.rsplit('/files', 1)[0]} (wandb sync it)" if mode == "offline" else run.url
        print(f"W&B: logging {run_name} {where}", flush=True)
        return cls(run)

    def log(self, metrics: dict) -> None:
        self.run.log({k: metrics[k] for k in LOGGED if k in metrics}, step=int(metrics["epoch"]))

    def finish(self) -> None:
        self.run.finish()
