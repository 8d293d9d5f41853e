"""Test-set accuracy, measured once at the end: in one process through the engine's evaluation, then through
`python -m raydist.train` on the session's Ray cluster (a Ray task), and for a study's exported best model.
The data is Fashion-MNIST's real idx format, written here: a learnable stand-in (class k is a grey level)."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from raydist.data.augment import Augmenter
from raydist.config.fields import TrainConfig
from raydist.data.registry import DATASETS
from raydist.data.sources import load_split
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.final_eval import TEST_METRICS_FILE, measure_files, summary_line
from raydist.ray_edge.measure import measure_study
from raydist.models.transfer import load_trained_model
from raydist.data.sizes import classes_predicted
from raydist.preflight import validate

N_TRAIN, N_TEST = 600, 200


def _idx(array, dims):
    import struct

    return struct.pack(">HBB", 0, 0x08, dims) + struct.pack(">" + "I" * dims, *array.shape) + array.tobytes()


def write_fashion(root, *, test_label_shift=0):
    """Class k is grey level 20 + 24k plus noise; `test_label_shift` mislabels the test file on purpose."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = (20 + 24 * labels[:, None, None] + rng.integers(-8, 9, (n, 28, 28))).astype(np.uint8)
        if prefix == "t10k":
            labels = ((labels + test_label_shift) % 10).astype(np.uint8)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as fh:
            fh.write(_idx(images, 3))
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as fh:
            fh.write(_idx(labels, 1))


def _plain_accuracy(path, data_dir):
    """The accuracy computed the obvious way, all in one batch: normalise, forward, argmax."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TrainConfig.from_dict(saved["config"])
    model = load_trained_model({"model_name": cfg.model, "num_classes": classes_predicted(cfg), **saved})
    test = load_split("fashion_mnist", "test", data_dir=data_dir)
    spec = DATASETS["fashion_mnist"]
    with torch.no_grad():
        logits = model(Augmenter("none", mean=spec.mean, std=spec.std)(test.images, train=False))
    return (logits.argmax(1) == test.labels).float().mean().item()


def test_the_final_model_and_a_checkpoint_are_measured_on_the_test_split(tmp_path):
    data_dir = str(tmp_path / "data")
    write_fashion(data_dir)
    cfg = TrainConfig(dataset="fashion_mnist", data_dir=data_dir, epochs=3, checkpoint_every=1, num_workers=1,
                      cpus_per_worker=2.0, batch_size=32, lr=0.2, warmup_epochs=0.5)
    validate(cfg)
    history = run(cfg, local_context(str(tmp_path / "run")))
    assert history[-1]["val_acc"] >= 0.9
    final = str(tmp_path / "run" / FINAL_MODEL_FILE)
    checkpoint = str(tmp_path / "run" / "checkpoint_epoch_0002" / CHECKPOINT_FILE)
    measured = measure_files({"final model": final, "best checkpoint": checkpoint}, cpus=2)
    assert measured["final model"]["images"] == measured["best checkpoint"]["images"] == N_TEST
    assert measured["best checkpoint"]["epoch"] == 2 and measured["final model"]["epoch"] == 3
    assert measured["final model"]["acc"] >= 0.9
    for label, path in (("final model", final), ("best checkpoint", checkpoint)):
        assert measured[label]["acc"] == pytest.approx(_plain_accuracy(path, data_dir), abs=0.5 / N_TEST)
    # it is the test file that is measured: mislabel it and the same model scores near zero
    write_fashion(data_dir, test_label_shift=1)
    assert measure_files({"final model": final})["final model"]["acc"] < 0.2


def test_the_summary_line_names_each_model_the_images_and_the_data_set():
    measured = {"title": "CIFAR-10", "images": 10000, "classes": None, "models": {
        "final model": {"acc": 0.7123, "epoch": 10}, "best checkpoint": {"acc": 0.72, "epoch": 7}}}
    assert summary_line(measured) == ("test acc: final model 71.2%, best checkpoint (epoch 7) 72.0% on the 10000 "
                                      "CIFAR-10 test images")
    assert summary_line({"error": "FashionMNIST test split not found in /d: ..."}) == (
        "test acc: not measured (FashionMNIST test split not found in /d: ...)")
    assert summary_line(None) is None


@pytest.fixture(scope="module")
def cli_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data_dir = str(root / "data")
    write_fashion(data_dir)
    result = subprocess.run([sys.executable, "-m", "raydist.train", "--address", ray_cluster, "--dataset",
                             "fashion_mnist", "--data-dir", data_dir, "--num-workers", "2", "--batch-size", "32",
                             "--epochs", "8", "--checkpoint-every", "1", "--storage-path",
                             str(root / "runs"), "--name", "run"], capture_output=True, text=True, timeout=600)
    return result, root / "runs" / "run", data_dir


def test_a_run_ends_with_its_test_accuracy_measured_once_on_the_cluster(cli_run):
    result, run_dir, data_dir = cli_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / TEST_METRICS_FILE).read_text())
    final, best = metrics["models"]["final model"], metrics["models"]["best checkpoint"]
    assert metrics["images"] == N_TEST and metrics["split"] == "test" and final["acc"] >= 0.9
    assert result.stdout.strip().splitlines()[-1] == (
        f"test acc: final model {final['acc']:.1%}, best checkpoint (epoch {best['epoch']}) {best['acc']:.1%} on "
        f"the {N_TEST} Fashion-MNIST test images")
    assert final["path"] == f"{run_dir}/{FINAL_MODEL_FILE}" and best["path"].startswith(f"{run_dir}/checkpoint_epoch_")
    # the task measured exactly what the files hold
    for entry in (final, best):
        assert entry["acc"] == pytest.approx(_plain_accuracy(entry["path"], data_dir), abs=0.5 / N_TEST)


def test_a_studys_best_model_is_measured_once_and_written_beside_it(cli_run, tmp_path):
    _, run_dir, data_dir = cli_run
    shutil.copy(run_dir / FINAL_MODEL_FILE, tmp_path / "best_model.pt")  # the same format as export_best's
    result = types.SimpleNamespace(best_model=str(tmp_path / "best_model.pt"), interrupted=False,
                                   experiment_path=str(tmp_path))
    measured = measure_study(result)
    acc = _plain_accuracy(str(tmp_path / "best_model.pt"), data_dir)
    assert measured["models"]["best model"]["acc"] == pytest.approx(acc, abs=0.5 / N_TEST)
    best = measured["models"]["best model"]
    assert summary_line(measured) == (f"test acc: best model (epoch 8) {best['acc']:.1%} on the {N_TEST} "
                                      f"Fashion-MNIST test images")
    assert json.loads((tmp_path / TEST_METRICS_FILE).read_text()) == measured
    assert measure_study(types.SimpleNamespace(best_model=result.best_model, interrupted=True,
                                               experiment_path=str(tmp_path))) is None  # measured when finished
