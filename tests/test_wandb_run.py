"""One raydist run is one W&B run, whatever restarts it: real W&B, offline (no key here), in this process."""

import glob
import re
import time

import pytest

from wandb_file import read_wandb_history

from raydist.runs.checkpoints import checkpoint_bytes
from raydist.output.wandb_log import WandbRun, run_id


def test_every_start_of_one_run_continues_its_one_wandb_run_and_another_run_gets_its_own(tmp_path, monkeypatch):
    """A restart after a failure, a resize or --resume started a new W&B run each time (two runs for one
    raydist run, offline); now each start continues the run of the run's id (config.yaml's wandb_id)."""
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline
    ids = []
    for attempt, epochs in enumerate(([1, 2], [3]), start=1):  # the first start, then a restart at epoch 3
        logger = WandbRun.start({"lr": 0.4}, folder=str(tmp_path / f"events{attempt}"), run_name="digits-resnet8-1",
                                project="raydist-test", run_id="raydist-0123456789abcdef")
        for epoch in epochs:
            logger.log({"epoch": epoch, "val_acc": 0.5 + epoch / 10})
        ids.append(logger.run.id)
        logger.finish()
    assert ids == ["raydist-0123456789abcdef"] * 2
    steps = {}
    deadline = time.monotonic() + 30  # W&B's service may still be writing a run file after finish() returned
    while time.monotonic() < deadline:  # (once, in a full quick-tier run, the second file had no record yet)
        for attempt in (1, 2):
            (run_file,) = glob.glob(str(tmp_path / f"events{attempt}" / "wandb" / f"offline-run-*-{ids[0]}" /
                                        "*.wandb"))
            steps[attempt] = [int(record["_step"]) for record in read_wandb_history(run_file)]
        if steps == {1: [1, 2], 2: [3]}:
            break
        time.sleep(0.5)
    assert steps == {1: [1, 2], 2: [3]}  # `wandb sync` uploads both into the one run, each epoch once
    # a loop started without an id (not through raydist.train) takes one from its run folder
    run_folder = str(tmp_path / "runs" / "digits-resnet8-1")
    assert run_id(run_folder) == run_id(run_folder + "/") != run_id(str(tmp_path / "runs" / "digits-resnet8-2"))


def test_each_new_run_gets_a_wandb_id_of_its_own_and_only_its_run_folder_continues_it(tmp_path):
    """raydist.train gives a new run a random W&B id, saved in config.yaml: a restart and --resume of the run
    folder keep it; a run from a checkpoint folder, or continued under another name, is a new W&B run; a new
    run under a reused name (its folder deleted) too (an id made from the folder's path continued the old
    W&B run, and W&B refuses the id of a run deleted there)."""
    import yaml

    from raydist.errors import ConfigError
    from raydist.cli import parse_cli
    from raydist.run_config import prepare
    from raydist.runs.run_folder import write_config

    def start(*args):
        return prepare(*parse_cli([*args, "--storage-path", str(tmp_path)]))

    first = start("--wandb", "--name", "a")
    assert re.fullmatch(r"raydist-[0-9a-f]{16}", first.wandb_id)
    assert start("--wandb", "--name", "a").wandb_id != first.wandb_id  # the same name again: another run
    assert start("--name", "plain").wandb_id is None  # no W&B, no id
    write_config(first)
    (tmp_path / "a" / "checkpoint_epoch_0001").mkdir()
    (tmp_path / "a" / "checkpoint_epoch_0001" / "checkpoint.pt").write_bytes(
        checkpoint_bytes({"epoch": 1, "config": first.to_dict()}))
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["wandb_id"] == first.wandb_id
    assert start("--resume", str(tmp_path / "a"), "--epochs", "5").wandb_id == first.wandb_id
    assert start("--resume", str(tmp_path / "a"), "--epochs", "5", "--name", "b").wandb_id not in (None, first.wandb_id)
    from_checkpoint = start("--resume", str(tmp_path / "a" / "checkpoint_epoch_0001"), "--epochs", "5")
    assert from_checkpoint.wandb_id not in (None, first.wandb_id)
    assert start("--wandb", "--wandb-id", "my_run-7", "--name", "c").wandb_id == "my_run-7"
    with pytest.raises(ConfigError, match="--wandb-id my_run-7 without --wandb: nothing would be logged"):
        start("--wandb-id", "my_run-7")
    with pytest.raises(ConfigError, match="--wandb-id 'a/b': W&B run ids are 1-64 letters, digits, - and _"):
        start("--wandb", "--wandb-id", "a/b")
