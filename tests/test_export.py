"""`python -m raydist.export`: a trained model as ONNX, TorchScript or torch.export's .pt2, with its classes and
preprocessing beside it, checked against raydist's own outputs; bad input is one line, exit 2, nothing written."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli import run_main
from conftest import digits_val_accuracy

from raydist import export
from raydist.config.fields import TrainConfig
from raydist.data.sources import load_split
from raydist.loop.context import local_context
from raydist.loop.run import run
from raydist.preflight import validate
from raydist.runs.checkpoints import read_model_file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits run of 3 epochs with augmentation on (the default's crop), one worker: its run folder."""
    folder = tmp_path_factory.mktemp("run")
    history = run(validate(TrainConfig(epochs=3, num_workers=1, cpus_per_worker=2.0)), local_context(str(folder)))
    assert history[-1]["val_acc"] > 0.8  # it learned (chance: 0.1)
    return folder


def _served(prep: dict, images: torch.Tensor) -> np.ndarray:
    """What a server does with preprocessing.json alone, in numpy and torch's resize only."""
    x = images[:, :prep["input"]["channels"]].float().numpy() / 255
    mean, std = np.array(prep["mean"]).reshape(1, -1, 1, 1), np.array(prep["std"]).reshape(1, -1, 1, 1)
    x = torch.from_numpy(((x - mean) / std).astype(np.float32))
    side = prep["input"]["side"]
    if prep["to_input"] == "bilinear resize":
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return x.numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_an_exported_model_served_from_its_files_alone_classifies_as_raydist_does(trained, tmp_path, fmt, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "served"
    code, said, err = run_main("raydist.export", [str(trained), "--format", fmt, "--out", str(out)], capsys,
                               monkeypatch)
    assert code == 0, err
    assert "same top class on 100.0%" in said
    assert sorted(p.name for p in out.iterdir()) == sorted([export.FORMATS[fmt], "classes.json", "preprocessing.json"])
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep["input"] == {"dtype": "float32", "layout": "NCHW", "channels": 3, "side": 16}
    assert prep["check"]["same_top1"] == 1.0 and prep["check"]["max_abs_diff"] < 1e-3
    assert json.loads((out / "classes.json").read_text()) == [str(i) for i in range(10)]

    # served from the files alone: the validation split, preprocessed from preprocessing.json's numbers
    val = load_split("digits", "val")
    x = _served(prep, val.images)
    logits = torch.from_numpy(np.asarray(export.exported_logits(str(out / export.FORMATS[fmt]), fmt,
                                                                torch.from_numpy(x))))
    served_acc = (logits.argmax(1) == val.labels).float().mean().item()
    # raydist's own accuracy for the same model and images (its evaluation path, not the export's)
    assert served_acc == pytest.approx(digits_val_accuracy(read_model_file(str(trained / "model_final.pt"))),
                                       abs=1.5 / 359)


@pytest.mark.parametrize("args, says", [
    (["no-such-run", "--format", "onnx"], "no-such-run: no such run folder or model file"),
    (["{run}", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["{run}", "--format", "onnx", "--check-images", "-1"], "--check-images must be 0 or more, got -1"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, capsys, monkeypatch, args, says):
    out = tmp_path / "out"
    code, _, err = run_main("raydist.export", [*[a.format(run=trained) for a in args], "--out", str(out)], capsys,
                            monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_a_model_the_exporter_refuses_is_one_line_and_leaves_no_file(trained, tmp_path, capsys, monkeypatch):
    def refuse(net, fmt, example, path):
        open(path, "wb").write(b"half")  # as an exporter that fails midway leaves its file
        raise RuntimeError("Unsupported operator: aten::frobnicate\nmore detail")

    monkeypatch.setattr(export, "export_model", refuse)
    out = tmp_path / "out"
    code, _, err = run_main("raydist.export", [str(trained), "--format", "onnx", "--out", str(out)], capsys,
                            monkeypatch)
    assert code == 2 and err.strip() == ("raydist.export: error: resnet8 cannot be exported to onnx: Unsupported "
                                         "operator: aten::frobnicate")
    assert list(out.iterdir()) == []
