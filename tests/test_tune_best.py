"""Which weights a study exports as its best, without Ray running: the best epoch's own checkpoint when it
was kept, else the nearest kept one, and the report says which."""

import csv
import os
from types import SimpleNamespace

import torch

from raydist import tune
from raydist.ray_edge.study_console import StudyConsole
from raydist.output import report
from raydist.ray_edge import results
from raydist.config.fields import TrainConfig
from raydist.runs.checkpoints import CHECKPOINT_FILE
from raydist.models.registry import create_model
from raydist.study.study_file import load_study
from raydist.ray_edge.history import HistoryCallback

STUDY = """
metric: val_acc
scheduler: {type: fifo}
fixed: {dataset: digits, model: resnet8, num_workers: 1, epochs: 4, checkpoint_every: 2}
searched:
  lr: {loguniform: [0.1, 1.0]}
"""


def _checkpoint(folder, epoch, acc):
    """A checkpoint folder as the engine writes it, with weights of its own."""
    torch.manual_seed(epoch)
    cfg = TrainConfig(dataset="digits", model="resnet8", epochs=4, checkpoint_every=2, lr=0.5)
    os.makedirs(folder)
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict(), "epoch": epoch,
                "config": cfg.to_dict(), "metrics": {"epoch": epoch, "val_acc": acc}},
               os.path.join(folder, CHECKPOINT_FILE))
    return folder


def _history(run_dir, accs, checkpointed, kept):
    """Per-epoch records; `checkpointed` epochs carry a checkpoint path, of which only `kept` exist."""
    history = []
    for epoch, acc in enumerate(accs, 1):
        path = f"{run_dir}/checkpoint_epoch_{epoch:04d}"
        if epoch in kept:
            _checkpoint(path, epoch, acc)
        history.append({"epoch": epoch, "val_acc": acc, "checkpoint_path": path if epoch in checkpointed else None})
    return history


def _study(tmp_path):
    (tmp_path / "best.yaml").write_text(STUDY)
    return load_study(str(tmp_path / "best.yaml"))


def test_the_best_epochs_own_checkpoint_when_kept_else_the_nearest_kept_one(tmp_path):
    study, run = _study(tmp_path), str(tmp_path / "run")
    # checkpoint_every 2: epoch 3, the best, was never saved; 2 and 4 are as near, 4 scores better
    history = _history(run, [0.5, 0.7, 0.9, 0.8], checkpointed={2, 4}, kept={2, 4})
    best = results.checkpoint_of_best_epoch
    assert best(history, history[2], study, str(tmp_path)) == (f"{run}/checkpoint_epoch_0004", 4)
    assert best(history, history[1], study, str(tmp_path)) == (f"{run}/checkpoint_epoch_0002", 2)
    # every epoch saved, but the best one's was deleted (beyond keep_checkpoints): 1 and 3 are as near
    history = _history(str(tmp_path / "run2"), [0.5, 0.9, 0.6, 0.4], checkpointed={1, 2, 3, 4}, kept={1, 3, 4})
    assert best(history, history[1], study, str(tmp_path))[1] == 3
    assert best(history, None, study, str(tmp_path)) == (None, None)
    # an epoch that scored as well as the best one is as good as its own
    history = _history(str(tmp_path / "run3"), [0.5, 0.9, 0.6, 0.9], checkpointed={1, 2, 3, 4}, kept={1, 3, 4})
    assert best(history, history[1], study, str(tmp_path))[1] == 4
    row = report.trial_row("t", {}, history, planned_epochs=4, metric="val_acc", mode="max", weights_epoch=4)
    assert (row["best_epoch"], row["weights_epoch"]) == (4, 4)  # nothing to explain


def test_the_study_exports_the_nearest_kept_weights_and_says_which_epoch_they_are_from(tmp_path, capsys):
    study = _study(tmp_path)
    experiment = tmp_path / "exp"
    trial = experiment / "trial_t1"
    run = str(trial / "best.t1")
    history = _history(run, [0.5, 0.7, 0.9, 0.8], checkpointed={2, 4}, kept={2, 4})
    callback = HistoryCallback(str(trial))  # the trial's history as the Train controller writes it
    for record in history:
        path = record.pop("checkpoint_path")
        callback.after_report(None, [record], SimpleNamespace(path=path) if path else None)
    grid = [SimpleNamespace(path=str(trial), config={"lr": 0.5}, error=None, metrics_dataframe=None)]

    result = results.summarize(study, grid, str(experiment), seconds=1.0)
    best = result.best
    assert (best["trial_id"], best["best_epoch"], best["weights_epoch"]) == ("t1", 3, 4)
    assert best["checkpoint"] == f"{run}/checkpoint_epoch_0004"
    with open(experiment / "results.csv", newline="") as fh:
        (row,) = csv.DictReader(fh)
    assert (row["best_epoch"], row["weights_epoch"]) == ("3", "4")
    saved = torch.load(experiment / "best_model.pt", map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["best_epoch"]) == (4, 3)
    kept = torch.load(f"{run}/checkpoint_epoch_0004/{CHECKPOINT_FILE}", map_location="cpu", weights_only=False)
    assert all(torch.equal(saved["model"][k], kept["model"][k]) for k in kept["model"])
    tune.print_result(result, study)
    assert "best trial t1: val_acc 90.00% at epoch 3; weights from epoch 4 (lr=0.5)" in capsys.readouterr().out


def test_a_trial_still_pending_when_the_study_was_interrupted_keeps_its_values_and_is_unfinished(tmp_path):
    """Tune's result for a trial that reported nothing has no config (seen: `raydist.tune` interrupted while
    its second trial started ended in AttributeError): the values come from the saved experiment state."""
    import json

    study = _study(tmp_path)
    experiment = tmp_path / "exp"
    trial = experiment / "trial_t1"
    callback = HistoryCallback(str(trial))
    for record in _history(str(trial / "best.t1"), [0.5, 0.7, 0.9, 0.8], checkpointed={4}, kept={4}):
        path = record.pop("checkpoint_path")
        callback.after_report(None, [record], SimpleNamespace(path=path) if path else None)
    state = {"trial_data": [[json.dumps({"trial_id": "t1", "status": "TERMINATED", "config": {"lr": 0.5}}), "{}"],
                            [json.dumps({"trial_id": "t2", "status": "PENDING", "config": {"lr": 0.25}}), "{}"]]}
    (experiment / "experiment_state-2026-12-01_20-17-05.json").write_text(json.dumps(state))
    grid = [SimpleNamespace(path=str(trial), config={"lr": 0.5}, error=None, metrics_dataframe=None,
                            metrics={"epoch": 4, "val_acc": 0.8}),
            SimpleNamespace(path=str(experiment / "trial_t2"), config=None, error=None, metrics_dataframe=None,
                            metrics={})]
    result = results.summarize(study, grid, str(experiment), seconds=1.0)
    pending = next(r for r in result.rows if r["trial_id"] == "t2")
    assert pending["lr"] == 0.25 and pending["status"] == report.UNFINISHED and result.interrupted
    assert result.best["trial_id"] == "t1"


def test_a_trial_the_scheduler_stopped_counts_only_the_epochs_tune_received(tmp_path):
    """ASHA's stop reaches a TorchTrainer trial while it trains on: the epoch its run reports meanwhile is in
    the run's own record but never reached Tune (seen on a loaded machine: stopped at its epoch-4 rung, the
    record held epoch 5). The study's results are what the scheduler and the searcher saw; a trial still
    running when the study was interrupted keeps every epoch of its record."""
    import json

    study = _study(tmp_path)
    experiment = tmp_path / "exp"
    grid = []
    for trial_id, status in (("stopped", "TERMINATED"), ("running", "RUNNING")):
        trial = experiment / f"trial_{trial_id}"
        callback = HistoryCallback(str(trial))
        # epoch 5, the one Tune never saw, is the best: counted, it would make this trial the best one
        for record in _history(str(trial / f"best.{trial_id}"), [0.5, 0.6, 0.7, 0.75, 0.99], checkpointed={4, 5},
                               kept={4, 5}):
            path = record.pop("checkpoint_path")
            callback.after_report(None, [record], SimpleNamespace(path=path) if path else None)
        grid.append(SimpleNamespace(path=str(trial), config={"lr": 0.5}, error=None, metrics_dataframe=None,
                                    metrics={"epoch": 4, "val_acc": 0.75}))  # Tune's last result
    state = {"trial_data": [[json.dumps({"trial_id": t, "status": s, "config": {"lr": 0.5}}), "{}"]
                            for t, s in (("stopped", "TERMINATED"), ("running", "RUNNING"))]}
    (experiment / "experiment_state-2026-12-06_11-50-00.json").write_text(json.dumps(state))
    result = results.summarize(study, grid, str(experiment), seconds=1.0)
    rows = {r["trial_id"]: r for r in result.rows}
    assert [h["epoch"] for h in result.histories["stopped"]] == [1, 2, 3, 4]
    assert (rows["stopped"]["epochs_run"], rows["stopped"]["final_val_acc"]) == (4, 0.75)
    assert rows["stopped"]["checkpoint"].endswith("checkpoint_epoch_0004")
    assert [h["epoch"] for h in result.histories["running"]] == [1, 2, 3, 4, 5]  # interrupted: all of its record
    with open(experiment / "learning_curves.csv", newline="") as fh:
        assert max(int(r["epoch"]) for r in csv.DictReader(fh) if r["trial_id"] == "stopped") == 4


def test_ties_name_one_best_trial_everywhere_lower_val_loss_then_earlier_epoch_then_trial_id(tmp_path, capsys,
                                                                                           monkeypatch):
    """Two trials with the same best val_acc (common on digits' 359 validation images): results.csv's and
    best_model.pt's choice (report.best_row) and the console's and `raydist.cluster status`'s (the study
    console's best so far) are the same trial, whatever order the trials come in."""
    def records(accs_losses):
        return [{"epoch": e, "val_acc": a, "val_loss": loss} for e, (a, loss) in enumerate(accs_losses, 1)]

    histories = {"b1": records([(0.5, 1.0), (0.9, 0.40), (0.9, 0.30)]),   # its best: epoch 3 (lower loss)
                 "a2": records([(0.9, 0.35), (0.8, 0.5)]),                 # as good, a higher loss
                 "c3": records([(0.7, 0.6), (0.9, 0.30)])}                 # b1's equal, an epoch sooner
    assert report.best_record(histories["b1"], "val_acc", "max")["epoch"] == 3
    rows = [report.trial_row(t, {"lr": 0.1}, h, planned_epochs=len(h), metric="val_acc", mode="max")
            for t, h in histories.items()]
    for order in (rows, rows[::-1]):
        assert report.best_row(order, "val_acc", "max")["trial_id"] == "c3"  # 0.9, loss 0.30, at epoch 2

    published = {}  # what `raydist.cluster status` reads (the GCS record; no Ray here)
    monkeypatch.setattr("raydist.ray_edge.status.publish_study", lambda name, record: published.update({name: record}))
    study = _study(tmp_path)
    console = StudyConsole(study, str(tmp_path / "exp"), 1, cluster_has_gpus=False)
    trials = [SimpleNamespace(trial_id=t, config={"lr": 0.1}, status="RUNNING") for t in histories]
    for trial in trials[::-1]:
        for record in histories[trial.trial_id]:
            console.on_trial_result(0, trials, trial, record)
    assert console.best_so_far(trials)[:2] == ("c3", 0.9)
    assert published["exp"]["best"]["trial_id"] == "c3"
    # equal in everything: the lower trial id, in both places
    same = [report.trial_row(t, {"lr": 0.1}, records([(0.9, 0.3)]), planned_epochs=1, metric="val_acc", mode="max")
            for t in ("z9", "d4")]
    assert report.best_row(same, "val_acc", "max")["trial_id"] == "d4"
    console = StudyConsole(study, str(tmp_path / "exp2"), 1, cluster_has_gpus=False)
    trials = [SimpleNamespace(trial_id=t, config={"lr": 0.1}, status="RUNNING") for t in ("z9", "d4")]
    for trial in trials:
        console.on_trial_result(0, trials, trial, records([(0.9, 0.3)])[0])
    assert console.best_so_far(trials)[0] == "d4"
