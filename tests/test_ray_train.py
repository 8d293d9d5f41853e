"""Real Ray Train runs on the session's cluster: 2-worker DDP on digits learns (and is logged to W&B), resume,
the CLI."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import digits_val_accuracy, read_csv
from wandb_file import read_wandb_history

from raydist.cli import parse_cli
from raydist.runs.checkpoints import FINAL_MODEL_FILE, load_checkpoint_file


def _cli(address, *args):
    return subprocess.run([sys.executable, "-m", "raydist.train", "--address", address, *args],
                          capture_output=True, text=True, timeout=600)


# what `python -m raydist.train` gives digits (its data set's recipe: 30), not the dataclass's 15
CLI_EPOCHS = parse_cli([])[0].epochs


@pytest.fixture(scope="module")
def digits_run(ray_cluster, tmp_path_factory):
    """The default job through the real CLI, 2 CPU workers: `python -m raydist.train --address ...`, logged to
    W&B as a user without a W&B key gets it (offline, into the run folder)."""
    runs = tmp_path_factory.mktemp("runs")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["HOME"] = str(runs)  # no ~/.netrc key either
    result = subprocess.run([sys.executable, "-m", "raydist.train", "--address", ray_cluster, "--num-workers", "2",
                             "--wandb", "--wandb-project", "ray-train-test", "--storage-path", str(runs), "--name",
                             "digits-ddp"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "digits-ddp", result.stdout + result.stderr  # all the console shows (Ray writes to both)


def test_two_worker_ddp_learns_digits(digits_run):
    run_dir, stdout = digits_run
    epochs = CLI_EPOCHS
    # one line per epoch, rank 0 only, each as a script prints it: no "(RayTrainWorker pid=...)" before it
    lines = re.findall(r"^epoch +(\d+)/(\d+) .*val loss [\d.]+ acc +([\d.]+)%", stdout, re.MULTILINE)
    assert [int(e) for e, _, _ in lines] == list(range(1, epochs + 1)), stdout[-3000:]
    final = load_checkpoint_file(str(run_dir / FINAL_MODEL_FILE))
    assert final["metrics"]["world_size"] == 2
    assert final["metrics"]["val_acc"] >= 0.90
    assert f"val acc {final['metrics']['val_acc']:.2%}" in stdout  # the summary line


def test_wandb_logs_every_epoch_of_the_run_offline_without_a_key(digits_run):
    run_dir, stdout = digits_run
    assert "W&B: logging digits-ddp offline to " + str(run_dir / "tensorboard" / "wandb" / "offline-run-") in stdout
    (run_file,) = glob.glob(str(run_dir / "tensorboard" / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = read_wandb_history(run_file)
    history = [json.loads(line) for line in open(run_dir / "history.jsonl")]
    epochs = CLI_EPOCHS
    assert [row["_step"] for row in logged] == list(range(1, epochs + 1))  # one W&B step per epoch, rank 0 only
    for row, epoch in zip(logged, history, strict=True):
        assert row["val_acc"] == pytest.approx(epoch["val_acc"]) and row["world_size"] == 2
    assert logged[-1]["val_acc"] >= 0.90  # what W&B shows is the run that learned (chance: 0.1)


def test_final_model_reproduces_the_reported_validation_accuracy(digits_run):
    run_dir, _ = digits_run
    final = load_checkpoint_file(str(run_dir / FINAL_MODEL_FILE))
    accuracy = digits_val_accuracy(final)
    # The workers' all-reduced accuracy over their shards equals the accuracy over the whole split.
    assert accuracy == pytest.approx(final["metrics"]["val_acc"], abs=1e-6)


def test_the_run_folder_says_what_the_saved_model_gets_wrong_per_class_and_as_a_confusion_picture(digits_run):
    run_dir, _ = digits_run
    final = load_checkpoint_file(str(run_dir / FINAL_MODEL_FILE))
    rows = read_csv(run_dir / "per_class.csv")
    assert [r["name"] for r in rows] == [str(d) for d in range(10)]
    # every validation image once, over both workers' shards: the diagonal is the reported accuracy
    assert sum(int(r["images"]) for r in rows) == 359
    assert sum(int(r["correct"]) for r in rows) == round(final["metrics"]["val_acc"] * 359)
    assert all(int(r["images"]) == sum(int(r[f"predicted_{k}"]) for k in range(10)) for r in rows)
    history = [json.loads(line) for line in open(run_dir / "history.jsonl")]
    assert all(h["val_acc"] <= h["val_top5"] <= 1.0 for h in history) and history[-1]["val_top5"] > 0.99
    png = (run_dir / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_folder_holds_config_checkpoints_and_tensorboard(digits_run):
    run_dir, _ = digits_run
    assert (run_dir / "config.yaml").exists()
    checkpoints = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_epoch_"))
    assert 1 <= len(checkpoints) <= 3  # best 2 by val_acc, plus the latest which Ray always keeps
    assert f"checkpoint_epoch_{CLI_EPOCHS:04d}" in checkpoints
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))


def _png_size(path) -> tuple[int, int]:
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_the_console_has_the_epoch_lines_and_none_of_rays_internal_noise(digits_run):
    """A TorchTrainer run's controller prints Ray Data's deprecation warning and a PreemptionWatcher notice
    at error level, and the driver Ray's token notice: none reaches the console; the log files keep them."""
    _, console = digits_run
    for noise in ("exclude_resources", "PreemptionWatcher", "Token authentication is enabled"):
        assert noise not in console, noise
    assert re.search(r"^Ray's logs: /\S+/logs \(this machine's; each node keeps its own\)$", console, re.M)


def test_the_run_folder_has_curves_png_and_a_resumed_run_continues_it(digits_run, tmp_path):
    """The first run's picture; the resume test below checks that a resumed run redraws it with both runs'
    epochs (module order runs this one first)."""
    run_dir, _ = digits_run
    assert _png_size(run_dir / "curves.png") == (1210, 495)
    from raydist.output import report
    from raydist.runs.history import read_history

    plotted = report.plot_run_curves(read_history(str(run_dir)), str(tmp_path / "check.png"))
    assert [e for e, _ in plotted["val_acc"]][:CLI_EPOCHS] == list(range(1, CLI_EPOCHS + 1))


def test_resume_a_run_folder_continues_at_the_next_epoch(digits_run, ray_cluster):
    run_dir, _ = digits_run
    epochs = CLI_EPOCHS
    drawn_before = (run_dir / "curves.png").stat().st_mtime_ns
    result = _cli(ray_cluster, "--resume", str(run_dir), "--epochs", str(epochs + 2))
    assert result.returncode == 0, result.stderr[-3000:]
    done = [int(e) for e in re.findall(r"epoch +(\d+)/\d+ ", result.stdout)]
    assert done == [epochs + 1, epochs + 2]
    # the same picture, drawn again from the run's whole history: the first run's epochs and these two
    assert (run_dir / "curves.png").stat().st_mtime_ns > drawn_before
    from raydist.output import report
    from raydist.runs.history import read_history

    plotted = report.plot_run_curves(read_history(str(run_dir)), str(run_dir.parent / "check.png"))
    assert [e for e, _ in plotted["val_acc"]] == list(range(1, epochs + 3))
    final = load_checkpoint_file(str(run_dir / FINAL_MODEL_FILE))
    assert final["metrics"]["epoch"] == epochs + 2 and final["config"]["epochs"] == epochs + 2
    assert final["metrics"]["val_acc"] >= 0.90


def test_resume_from_a_checkpoint_folder_starts_a_new_run_at_its_epoch(digits_run, ray_cluster):
    run_dir, _ = digits_run
    checkpoint = sorted(run_dir.glob("checkpoint_epoch_*"))[-1]
    epoch = int(checkpoint.name.rsplit("_", 1)[1])
    result = _cli(ray_cluster, "--resume", str(checkpoint), "--epochs", str(epoch + 1), "--name", "from-checkpoint")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(e) for e in re.findall(r"epoch +(\d+)/\d+ ", result.stdout)] == [epoch + 1]
    new_run = run_dir.parent / "from-checkpoint"
    assert load_checkpoint_file(str(new_run / FINAL_MODEL_FILE))["metrics"]["epoch"] == epoch + 1


def test_a_run_in_uri_storage_has_its_tensorboard_curves_in_the_run_folder(ray_cluster, tmp_path):
    """With a URI --storage-path (file:// here: the same code path as s3://, the workers write through Ray's
    storage filesystem) rank 0 writes TensorBoard events locally and copies them into <run>/tensorboard
    after every epoch; nothing is left in its local temporary folder."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("raydist-tensorboard-")}
    result = _cli(ray_cluster, "--epochs", "2", "--num-workers", "2", "--storage-path", f"file://{tmp_path}",
                  "--name", "uri-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "uri-run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2]
    assert [e.step for e in events.Scalars("val_top5")] == [1, 2]
    assert (tmp_path / "uri-run" / FINAL_MODEL_FILE).is_file()
    # per_class.csv written through the storage layer, confusion.png drawn locally and copied in
    assert (tmp_path / "uri-run" / "per_class.csv").is_file() and (tmp_path / "uri-run" / "confusion.png").is_file()
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("raydist-tensorboard-")} <= before
