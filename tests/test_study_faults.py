"""A study whose trials fail in every way at once, on the session cluster's 2 CPUs: more trials than room,
one trial's process SIGKILLed mid-run (it resumes from its checkpoint), one that runs out of memory (error,
its cause in one line, its tracebacks in its folder), one that diverges; healthy trials finish, the best is
a healthy one, and nothing of the study is left on the cluster afterwards. The trials have one worker, so
each trains in its own trial process (the default); the TorchTrainer path's worker loss is in test_faults."""

import os
import re
import signal
import time

import yaml
from conftest import read_csv, start_tune, wait_for_free_cluster
from test_faults import HUGE_CLASSES, _Lines

from raydist.study.study_file import load_study
from raydist.runs.history import read_history

# 8 one-worker trials, 2 at once. The first runs 6 epochs (its worker is killed after epoch 2); the second
# asks for a head of 10^11 fake classes, too large to allocate (out of memory); the third has LR 300 (diverges in epoch 1, no
# warmup). Cosine schedules: with a constant LR the 6-epoch trial's accuracy swung by 25 points from epoch to
# epoch (74-86% at best, by the CPU's rounding); with cosine it ends near 91%.
FAULT_STUDY = f"""
num_samples: 8
search: {{algorithm: random, seed: 0}}
scheduler: {{type: fifo}}
fixed: {{model: resnet8, num_workers: 1, batch_size: 32, warmup_epochs: 0, fake_image_size: 32,
        fake_num_classes: {HUGE_CLASSES}, fake_train_size: 64, fake_val_size: 16}}
searched:
  dataset: {{choice: [digits, fake]}}
  lr: {{choice: [0.1, 0.4, 300.0]}}
  epochs: {{choice: [2, 6]}}
points_to_evaluate:
  - {{dataset: digits, lr: 0.4, epochs: 6}}
  - {{dataset: fake, lr: 0.4, epochs: 2}}
  - {{dataset: digits, lr: 300.0, epochs: 2}}
  - {{dataset: digits, lr: 0.4, epochs: 2}}
  - {{dataset: digits, lr: 0.1, epochs: 2}}
  - {{dataset: digits, lr: 0.4, epochs: 2}}
  - {{dataset: digits, lr: 0.1, epochs: 2}}
  - {{dataset: digits, lr: 0.4, epochs: 2}}
"""


def test_a_study_survives_a_killed_worker_an_out_of_memory_trial_and_a_diverged_one(ray_cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    (tmp_path / "faults.yaml").write_text(FAULT_STUDY)
    experiment = tmp_path / "runs" / "faults"
    # --verbose: the trials' own epoch lines, which carry the pid Ray prefixes to each (the victim's here).
    proc = start_tune(ray_cluster, "--search-space", str(tmp_path / "faults.yaml"), "--storage-path",
                      str(tmp_path / "runs"), "--name", "faults", "--verbose")
    out = _Lines(proc)
    # The 6-epoch trial's process is the one printing "epoch 2/6": kill it as soon as it says so.
    victim = int(out.wait_for(r"\(run_trial pid=(\d+)[^)]*\)\S* epoch +2/6 ")[1])
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=600)
    out.thread.join(timeout=10)
    stdout = "\n".join(out.lines)
    assert proc.returncode == 0, stdout[-6000:]
    assert "2 at once" in stdout

    rows = read_csv(experiment / "results.csv")
    assert len(rows) == 8
    by_kind = {}
    for row in rows:
        kind = ("long" if row["epochs"] == "6" else "oom" if row["dataset"] == "fake"
                else "diverged" if float(row["lr"]) == 300 else "healthy")
        by_kind.setdefault(kind, []).append(row)
    (long,), (oom,), (diverged,) = by_kind["long"], by_kind["oom"], by_kind["diverged"]

    # The killed trial failed, said why in one line (and its error.log), and was run again from its latest
    # checkpoint (failures.trial_restarts, 1 by default): every epoch once, the first ones from before the kill
    # (a start from scratch would have reported them again, and the history keeps the latest report of an epoch).
    log = experiment / f"trial_{long['trial_id']}" / "error.log"
    assert re.search(rf"^trial {long['trial_id']} failed: its process \(pid {victim}\) on node \S+ died without "
                     rf"raising an error .*; running it again from its latest checkpoint \(restart 1 of 1\) "
                     rf"\(log: {re.escape(str(log))}\)$", stdout, re.M), stdout[-6000:]
    assert f"pid {victim}" in log.read_text().splitlines()[0]
    history = read_history(str(experiment / f"trial_{long['trial_id']}"))
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert history[0]["reported_unix"] < killed_at < history[-1]["reported_unix"]
    assert long["status"] == "finished" and long["epochs_run"] == "6"

    # Out of memory: "error", its cause in one line in the row and on the console, its tracebacks in its folder.
    assert oom["status"] == "error"
    assert "out of memory on cpu training resnet8 with a per-worker batch of 32" in oom["error"], oom["error"]
    assert "--grad-accum" in oom["error"]
    log = experiment / f"trial_{oom['trial_id']}" / "error.log"
    assert "can't allocate memory" in log.read_text()
    assert re.search(rf"^trial {oom['trial_id']} failed: .*out of memory on cpu .*\(tracebacks: {re.escape(str(log))}\)$",
                     stdout, re.M), stdout[-4000:]

    assert diverged["status"] == "diverged"
    healthy = by_kind["healthy"] + [long]
    assert all(r["status"] == "finished" for r in healthy), healthy
    best = max(healthy, key=lambda r: float(r["best_val_acc"]))
    assert float(best["best_val_acc"]) >= 0.80
    assert f"best trial {best['trial_id']}" in stdout

    # The study file keeps its failure settings for --resume.
    saved = yaml.safe_load((experiment / "study.yaml").read_text())
    assert saved["failures"] == {"worker_restarts": 0, "trial_restarts": 1}
    assert load_study(str(experiment / "study.yaml")).trial_restarts == 1

    # Nothing of the study is left: no placement group, no Train worker or controller, every CPU free.
    wait_for_free_cluster()
    left = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.class_name in ("RayTrainWorker", "TrainController")]
    assert not left, left
    assert ray.available_resources().get("CPU") == 2


QUIET_FAULTS = f"""
num_samples: 3
max_concurrent: 1
search: {{algorithm: random, seed: 0}}
scheduler: {{type: fifo}}
fixed: {{model: resnet8, num_workers: 1, batch_size: 32, warmup_epochs: 0, epochs: 2, fake_image_size: 32,
        fake_num_classes: {HUGE_CLASSES}, fake_train_size: 64, fake_val_size: 16}}
searched:
  dataset: {{choice: [digits, fake]}}
  lr: {{choice: [0.4, 300.0]}}
points_to_evaluate:
  - {{dataset: fake, lr: 0.4}}
  - {{dataset: digits, lr: 300.0}}
  - {{dataset: digits, lr: 0.4}}
"""


def test_the_default_console_says_each_failure_in_one_line(ray_cluster, tmp_path):
    """Without --verbose: a trial that raised says its cause when Tune runs it again and when it gives up,
    a diverged one says why it stopped, and Ray's tracebacks stay in the trials' error.log files."""
    (tmp_path / "quiet.yaml").write_text(QUIET_FAULTS)
    proc = start_tune(ray_cluster, "--search-space", str(tmp_path / "quiet.yaml"), "--storage-path",
                      str(tmp_path / "runs"), "--name", "quiet")
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-5000:]
    rows = {(r["dataset"], r["lr"]): r for r in read_csv(tmp_path / "runs" / "quiet" / "results.csv")}
    oom, diverged, healthy = rows[("fake", "0.4")], rows[("digits", "300.0")], rows[("digits", "0.4")]
    assert (oom["status"], diverged["status"], healthy["status"]) == ("error", "diverged", "finished")
    log = tmp_path / "runs" / "quiet" / f"trial_{oom['trial_id']}" / "error.log"
    again = re.findall(rf"^trial {oom['trial_id']} failed: (out of memory on cpu .*); running it again from its "
                       rf"latest checkpoint \(restart 1 of 1\)$", stdout, re.M)
    final = re.findall(rf"^trial {oom['trial_id']} failed: (out of memory on cpu .*) \(after 0/2 epochs\) "
                       rf"\(tracebacks: {re.escape(str(log))}\)$", stdout, re.M)
    assert len(again) == len(final) == 1 and again == final, stdout[-5000:]
    assert re.search(rf"^trial {diverged['trial_id']} diverged: .* \(1/2 epochs", stdout, re.M), stdout[-5000:]
    assert re.search(rf"^trial {healthy['trial_id']} finished \(2/2 epochs", stdout, re.M)
    assert "Traceback" not in stdout and "RayTaskError" not in stdout
