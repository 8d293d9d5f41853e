"""A study killed mid-trial and resumed, end to end on the session cluster; and, without Ray, the pieces a
resume rests on: per-trial histories, ASHA's rebuilt rungs, and the flags --resume refuses or applies.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
from cli import without_ray_lines
from conftest import read_csv, start_tune, wait_for_free_cluster
import yaml

from raydist import tune
from raydist.ray_edge.trials import train_run_name
from raydist.study.study_file import save_study
from raydist.study.study_file import load_study
from raydist.ray_edge.history import ASHAWithHistory, HistoryCallback, rung_records
from raydist.runs.history import read_history
from raydist.preflight import validate

# Three pinned trials, one at a time, 5 epochs each. ASHA (rungs at epochs 1, 2, 4) lets the first, poor
# trial finish (it is first at every rung; chance level, 8%, throughout) and the good second one go on
# (about 30% after epoch 1 and 70% after epoch 2 here: small batches, no warmup, so that it is clearly ahead
# from the first rung); the driver is killed while the second is mid-run. After the resume, the third trial
# (poor again) must be stopped at epoch 1 by the records the first two left at rung 1, which only the
# rebuilt rungs still hold.
RESUME_STUDY = """
num_samples: 3
max_concurrent: 1
search: {algorithm: hyperopt, initial_points: 3, seed: 0}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
fixed: {dataset: digits, model: resnet8, num_workers: 1, epochs: 5, warmup_epochs: 0, batch_size: 16}
searched:
  lr: {loguniform: [0.001, 4.0]}
points_to_evaluate:
  - {lr: 0.001}
  - {lr: 0.5}
  - {lr: 0.001}
"""


def _tune(address, *args):
    # Its own session, so that killing it kills exactly the driver (Ray then cleans its trials up).
    return start_tune(address, *args, start_new_session=True)


def test_a_killed_study_resumes_every_trial_from_its_checkpoint_with_its_history_and_rungs(ray_cluster, tmp_path):
    import ray

    (tmp_path / "resume.yaml").write_text(RESUME_STUDY)
    experiment = tmp_path / "runs" / "resume-kill"
    proc = _tune(ray_cluster, "--search-space", str(tmp_path / "resume.yaml"), "--storage-path",
                 str(tmp_path / "runs"), "--name", "resume-kill")
    deadline = time.monotonic() + 600
    while True:  # until the second trial (trial ids are not in order: by first report) is at epoch 2 or later
        histories = {t: read_history(str(t)) for t in experiment.glob("trial_*")}
        trials = [t for _, t in sorted((h[0]["reported_unix"], t) for t, h in histories.items() if h)]
        if len(trials) > 1 and any(r["epoch"] >= 2 and r["checkpoint_path"] for r in histories[trials[1]]):
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only; its trials' processes go with its Ray job
    killed_at = time.time()
    proc.communicate(timeout=60)
    wait_for_free_cluster()  # the session cluster gets its CPUs back, through Ray's own job cleanup
    print(f"SIGKILL of a study's driver: the cluster was whole {time.time() - killed_at:.1f} s after the signal")

    first, second = trials[0], trials[1]
    first_id, second_id = first.name.removeprefix("trial_"), second.name.removeprefix("trial_")
    first_final = next(first.glob("resume.*/model_final.pt"))
    first_before = (first / "history.jsonl").read_bytes(), first_final.stat().st_mtime_ns
    before = read_history(str(second))
    last_checkpoint = max(r["epoch"] for r in before if r["checkpoint_path"])
    assert 2 <= last_checkpoint < 5
    # A resume in a new Ray session finds none of the Tune logger files the old session kept locally.
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    staging = list(Path(session_dir, "artifacts").glob("*/resume-kill"))
    assert staging, f"no Tune staging folder for the study under {session_dir}/artifacts"
    for folder in staging:
        subprocess.run(["rm", "-rf", str(folder)], check=True)

    proc = _tune(ray_cluster, "--resume", str(experiment), "--max-concurrent", "2")
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-5000:]
    assert "study resume: 3 trials" in stdout and "2 at once" in stdout  # its name, today's concurrency

    rows = {r["trial_id"]: r for r in read_csv(experiment / "results.csv")}
    assert len(rows) == 3 and first_id in rows and second_id in rows
    (third_id,) = set(rows) - {first_id, second_id}
    # The finished trial was not run again.
    assert ((first / "history.jsonl").read_bytes(), first_final.stat().st_mtime_ns) == first_before
    assert rows[first_id]["status"] == "finished"

    # The interrupted trial went on from its last checkpoint, under its own run name, and kept every epoch.
    after = read_history(str(second))
    resumed = [r["epoch"] for r in after if r["reported_unix"] > killed_at]
    assert resumed == list(range(last_checkpoint + 1, 6))
    assert [r["epoch"] for r in after] == [1, 2, 3, 4, 5]
    assert after[:last_checkpoint] == [r for r in before if r["epoch"] <= last_checkpoint]
    assert sorted(p.name for p in second.iterdir() if p.is_dir()) == [f"resume.{second_id}"]
    assert (second / f"resume.{second_id}" / "checkpoint_epoch_0005").is_dir()
    assert rows[second_id]["status"] == "finished" and rows[second_id]["epochs_run"] == "5"
    curves = read_csv(experiment / "learning_curves.csv")
    assert [int(c["epoch"]) for c in curves if c["trial_id"] == second_id] == [1, 2, 3, 4, 5]
    # ... which Tune's own record of it, written anew in the new session, no longer shows.
    with open(second / "result.json") as fh:
        assert [json.loads(line)["epoch"] for line in fh if line.strip()] == resumed

    # ASHA's rung at epoch 1 came back: the poor third trial is stopped there.
    assert rows[third_id]["status"] == "stopped early" and rows[third_id]["epochs_run"] == "1", rows[third_id]
    # Two at once after the resume: the third trial reported while the second was still running.
    third = read_history(str(experiment / f"trial_{third_id}"))
    assert third[0]["reported_unix"] < after[-1]["reported_unix"]
    saved = yaml.safe_load((experiment / "study.yaml").read_text())
    assert saved["name"] == "resume" and saved["max_concurrent"] == 2  # the next resume keeps both
    wait_for_free_cluster()


# ---- per-trial history and ASHA's rungs, without Ray running ------------------------------------------


def _report(callback, epoch, acc, checkpoint=None):
    metrics = {"epoch": epoch, "val_acc": acc, "val_loss": 1 - acc, "epoch_time_s": 0.01, "stop_reason": ""}
    callback.after_report(None, [metrics, dict(metrics)], SimpleNamespace(path=checkpoint) if checkpoint else None)


def test_history_keeps_every_epoch_across_attempts_and_replaces_replayed_ones(tmp_path):
    trial = str(tmp_path / "trial_a")
    first = HistoryCallback(trial)
    _report(first, 1, 0.5, "/ckpt/1")
    _report(first, 2, 0.6, "/ckpt/2")
    time.sleep(0.1)
    _report(first, 3, 0.65)  # no checkpoint: the interruption loses this epoch's work...
    time.sleep(1.0)  # ... and the trial is down for a while (long, so a busy machine cannot blur the bound below)
    second = HistoryCallback(trial)  # the trial restarted from its epoch-2 checkpoint
    _report(second, 3, 0.7, "/ckpt/3")
    _report(second, 4, 0.8, "/ckpt/4")
    history = read_history(trial)
    assert [(r["epoch"], r["val_acc"], r["checkpoint_path"]) for r in history] == [
        (1, 0.5, "/ckpt/1"), (2, 0.6, "/ckpt/2"), (3, 0.7, "/ckpt/3"), (4, 0.8, "/ckpt/4")]
    # Time spent counts the lost epoch, not the time the trial was down.
    assert history[1]["time_total_s"] < 0.1 < history[2]["time_total_s"] < history[3]["time_total_s"] < 1.0
    with open(tmp_path / "trial_a" / "history.jsonl", "a") as fh:
        fh.write('{"epoch": 5, "val_ac')  # a writer killed mid-line
    assert [r["epoch"] for r in read_history(trial)] == [1, 2, 3, 4]
    assert read_history(str(tmp_path / "trial_none")) == []


def _asha(cls):
    return cls(time_attr="epoch", metric="val_acc", mode="max", max_t=4, grace_period=1, reduction_factor=2,
               stop_last_trials=False)


def _restored_trial(trial_path):
    """What ASHA reads of a trial Tune restored: its id and where its files are."""
    return SimpleNamespace(trial_id=os.path.basename(trial_path).removeprefix("trial_"),
                           storage=SimpleNamespace(trial_dir_name=os.path.basename(trial_path),
                                                   trial_fs_path=trial_path,
                                                   storage_filesystem=pyarrow.fs.LocalFileSystem()))


def test_asha_rungs_are_rebuilt_from_saved_histories(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    curves = {"a": [0.5, 0.7, 0.8, 0.9], "b": [0.6, 0.75]}  # a finished; b was interrupted after epoch 2
    live = _asha(ASHAScheduler)  # the scheduler of the uninterrupted study, fed as results came in
    for trial_id, accs in curves.items():
        callback = HistoryCallback(str(tmp_path / f"trial_{trial_id}"))
        live.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        for epoch, acc in enumerate(accs, 1):
            _report(callback, epoch, acc, checkpoint=f"/ckpt/{trial_id}/{epoch}")
            live.on_trial_result(None, SimpleNamespace(trial_id=trial_id), {"epoch": epoch, "val_acc": acc})

    restored = _asha(ASHAScheduler)  # what Tune restores today: the scheduler as created, rungs empty
    rebuilt = _asha(ASHAWithHistory)
    for scheduler in (restored, rebuilt):
        for trial_id in curves:
            scheduler.on_trial_add(None, _restored_trial(str(tmp_path / f"trial_{trial_id}")))
    assert rung_records(rebuilt) == rung_records(live) == {4: {"a": 0.9}, 2: {"a": 0.7, "b": 0.75},
                                                            1: {"a": 0.5, "b": 0.6}}
    assert rung_records(restored) == {4: {}, 2: {}, 1: {}}

    poor = {"epoch": 1, "val_acc": 0.3}  # a new trial, after the resume, far behind at rung 1
    for scheduler, action in ((restored, TrialScheduler.CONTINUE), (rebuilt, TrialScheduler.STOP)):
        scheduler.on_trial_add(None, _restored_trial(str(tmp_path / "trial_c")))  # no history yet
        assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="c"), poor) == action
    # The interrupted trial goes on from its checkpoint: its rungs are not judged or recorded twice.
    assert rebuilt.on_trial_result(None, SimpleNamespace(trial_id="b"), {"epoch": 3, "val_acc": 0.76}) == "CONTINUE"
    assert rung_records(rebuilt)[2] == {"a": 0.7, "b": 0.75}


# ---- what --resume accepts -----------------------------------------------------------------------------

SMALL = """
num_samples: 2
scheduler: {type: fifo}
fixed: {dataset: digits, model: resnet8, num_workers: 1, epochs: 2}
searched:
  lr: {loguniform: [0.5, 2.0]}
"""


@pytest.fixture
def saved_experiment(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL)
    experiment = tmp_path / "runs" / "small-1"
    save_study(load_study(str(tmp_path / "small.yaml")), str(experiment))
    return experiment


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("flags, message", [
    (["--set", "epochs=4"], "--set epochs would change the study's trials mid-run; only data_dir, download"),
    (["--set", "lr=0.3"], "--set lr would change the study's trials mid-run"),
    (["--search-space", "digits_quick"], "continues the study as it was; drop --search-space"),
    (["--storage-path", "/tmp/elsewhere"], "continues the study as it was; drop --storage-path"),
    (["--num-samples", "9"], "drop --num-samples"),
    (["--scheduler", "fifo"], "drop --scheduler"),
    (["--wandb"], "keeps the loggers the study started with; drop --wandb"),
    (["--wandb-project", "p"], "keeps the loggers the study started with; drop --wandb-project"),
    (["--mlflow-uri", "sqlite:///x.db"], "keeps the loggers the study started with; drop --mlflow-uri"),
])
def test_resume_refuses_what_it_cannot_apply_in_one_line(saved_experiment, flags, message, monkeypatch, capsys):
    before = _snapshot(saved_experiment)
    monkeypatch.setattr(tune, "run_study", lambda plan: pytest.fail("Ray must not start"))
    assert tune.main(["--resume", str(saved_experiment), *flags]) == 2
    err = without_ray_lines(capsys.readouterr().err)
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(saved_experiment) == before  # nothing written


def test_resume_applies_concurrency_and_data_location_and_keeps_the_study_name(saved_experiment, tmp_path):
    plan = tune.parse_args(["--resume", str(saved_experiment), "--max-concurrent", "3",
                            "--set", f"data_dir={tmp_path / 'data'}"])
    assert plan.resume and plan.max_concurrent == 3 and plan.study.max_concurrent == 3
    assert plan.study.fixed["data_dir"] == str(tmp_path / "data")
    assert plan.study.name == "small"  # not "study", the saved file's name: trials keep their run names
    assert train_run_name(plan.study.name, "abc_00001") == "small.abc_00001"
    save_study(plan.study, str(saved_experiment))  # what run_study does before the restored study runs
    again = tune.parse_args(["--resume", str(saved_experiment)])
    assert again.max_concurrent == 3 and again.study.fixed["data_dir"] == str(tmp_path / "data")
    assert again.study.name == "small"


def test_a_trial_process_that_died_between_its_checkpoint_and_its_report_resumes_with_that_epoch_on_record(
        ray_cluster, tmp_path, capsys):
    """A one-worker trial trains in its own process and writes each checkpoint before it records the epoch:
    a death in between leaves a checkpoint the history does not know. The restarted trial resumes from it,
    puts its epoch on record from the checkpoint's own metrics, and ranks it with the others, so the run
    folder keeps `keep_checkpoints` plus the latest, not a forgotten extra one."""
    import dataclasses

    from raydist.config.fields import TrainConfig
    from raydist.ray_edge.fit import fit_in_trial
    from raydist.run_config import prepare

    trial_path = str(tmp_path / "trial_x")
    cfg = TrainConfig(dataset="digits", model="resnet8", num_workers=1, cpus_per_worker=1, epochs=3,
                      batch_size=32, lr=0.4, warmup_epochs=0, keep_checkpoints=1, keep_by="val_loss",
                      storage_path=trial_path, name="run")
    validate(cfg)
    cfg = prepare(cfg, explicit={})
    reports = []
    fit_in_trial(cfg, trial_path=trial_path, on_report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    history_file = Path(trial_path) / "history.jsonl"
    lines = history_file.read_text().splitlines()
    lost = json.loads(lines[-1])  # the process "died" after writing epoch 3's checkpoint, before recording it
    history_file.write_text("\n".join(lines[:-1]) + "\n")
    assert Path(lost["checkpoint_path"]).is_dir()

    reports.clear()
    summary = fit_in_trial(dataclasses.replace(cfg, epochs=5), trial_path=trial_path, on_report=reports.append)
    assert f"resuming from {lost['checkpoint_path']}" in capsys.readouterr().out
    # Tune hears of the recovered epoch 3 first (it never did), then of the epochs trained now; 1-3 are not
    # trained again.
    assert [(r["epoch"], r["checkpoint_path"]) for r in reports][0] == (3, lost["checkpoint_path"])
    assert [r["epoch"] for r in reports] == [3, 4, 5] and reports[0]["val_loss"] == lost["val_loss"]
    history = read_history(trial_path)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    recovered = history[2]
    assert recovered["recovered"] and recovered["val_loss"] == lost["val_loss"]
    assert recovered["checkpoint_path"] == lost["checkpoint_path"]
    # It went on learning from there: 2 epochs from scratch reach about 0.55, these 2 from epoch 3 about 0.8
    # (0.797 in CI on 2026-12-02, 0.80 before it: the bar keeps a margin).
    assert history[-1]["val_acc"] > 0.7
    best = min((r for r in history if r["checkpoint_path"]), key=lambda r: (r["val_loss"], -r["epoch"]))
    on_disk = sorted(str(p) for p in (Path(trial_path) / "run").glob("checkpoint_epoch_*"))
    assert on_disk == sorted({best["checkpoint_path"], history[-1]["checkpoint_path"]})
    assert summary.best_checkpoint == best["checkpoint_path"]
    assert [r["epoch"] for r in summary.history] == [4, 5]

    # Died after the checkpoint of its last epoch: the restart trains nothing, and the epoch still reaches
    # the history and Tune.
    lines = history_file.read_text().splitlines()
    history_file.write_text("\n".join(lines[:-1]) + "\n")
    reports.clear()
    fit_in_trial(dataclasses.replace(cfg, epochs=5), trial_path=trial_path, on_report=reports.append)
    assert [r["epoch"] for r in reports] == [5] and reports[0]["val_acc"] == history[-1]["val_acc"]
    assert [r["epoch"] for r in read_history(trial_path)] == [1, 2, 3, 4, 5]
    assert (Path(trial_path) / "run" / "model_final.pt").is_file()


def test_a_trial_asha_stopped_just_before_the_kill_is_stopped_at_its_first_result_after_the_resume(tmp_path):
    """The study was killed after ASHA decided to stop trial b at its rung but before Tune saved that: b
    comes back unfinished, its rung already on record. Plain ASHA lets it train on for good; the rebuilt
    scheduler stops it at its first new result, as the uninterrupted study did. A trial ASHA let go on
    (a, interrupted as well) goes on."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    curves = {"a": [0.5, 0.7, 0.8], "b": [0.6, 0.4]}  # b reaches rung 2 after a, far below it
    live = _asha(ASHAScheduler)
    decisions = {}
    for trial_id, accs in curves.items():
        callback = HistoryCallback(str(tmp_path / f"trial_{trial_id}"))
        live.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        for epoch, acc in enumerate(accs, 1):
            _report(callback, epoch, acc, checkpoint=f"/ckpt/{trial_id}/{epoch}")
            decisions[trial_id, epoch] = live.on_trial_result(None, SimpleNamespace(trial_id=trial_id),
                                                              {"epoch": epoch, "val_acc": acc})
    assert decisions["b", 2] == TrialScheduler.STOP  # what the uninterrupted study did; then the kill

    plain, rebuilt = _asha(ASHAScheduler), _asha(ASHAWithHistory)
    for scheduler in (plain, rebuilt):
        for trial_id in curves:  # both restored unfinished (Tune had saved neither as ended)
            scheduler.on_trial_add(None, SimpleNamespace(**vars(_restored_trial(str(tmp_path / f"trial_{trial_id}"))),
                                                         status="PENDING"))
    assert rung_records(rebuilt) == rung_records(live)
    b_next, a_next = {"epoch": 3, "val_acc": 0.45}, {"epoch": 4, "val_acc": 0.85}
    assert plain.on_trial_result(None, SimpleNamespace(trial_id="b"), b_next) == TrialScheduler.CONTINUE
    assert rebuilt.on_trial_result(None, SimpleNamespace(trial_id="b"), b_next) == TrialScheduler.STOP
    assert rebuilt.on_trial_result(None, SimpleNamespace(trial_id="a"), a_next) == TrialScheduler.CONTINUE
