"""One raydist run is one W&B run, whatever restarts it: real W&B, offline (no key here), in this process."""

import glob
import os

from wandb_file import read_wandb_history

from raydist.wandb_log import WandbRun, run_id


def test_every_start_of_one_run_continues_its_one_wandb_run_and_another_run_gets_its_own(tmp_path, monkeypatch):
    """A restart after a failure, a resize or --resume started a new W&B run each time (two runs for one
    raydist run, offline); now each start continues the run whose id comes from the run folder."""
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline
    run_folder = str(tmp_path / "runs" / "digits-resnet8-1")
    ids = []
    for attempt, epochs in enumerate(([1, 2], [3]), start=1):  # the first start, then a restart at epoch 3
        logger = WandbRun.start({"lr": 0.4}, folder=str(tmp_path / f"events{attempt}"), run_name="digits-resnet8-1",
                                project="raydist-test", run_folder=run_folder)
        for epoch in epochs:
            logger.log({"epoch": epoch, "val_acc": 0.5 + epoch / 10})
        ids.append(logger.run.id)
        logger.finish()
    assert ids == [run_id(run_folder)] * 2
    steps = []
    for attempt in (1, 2):
        (run_file,) = glob.glob(str(tmp_path / f"events{attempt}" / "wandb" / f"offline-run-*-{ids[0]}" / "*.wandb"))
        steps += [int(record["_step"]) for record in read_wandb_history(run_file)]
    assert steps == [1, 2, 3]  # `wandb sync` uploads both into the one run, each epoch once
    assert run_id(str(tmp_path / "runs" / "digits-resnet8-2")) != ids[0]
    assert run_id(run_folder + "/") == ids[0] and os.path.basename(run_folder) not in ids[0]
