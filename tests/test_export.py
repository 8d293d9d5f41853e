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
    if prep["to_input"].startswith("bilinear resize"):
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
    assert not out.exists()  # the folder it made, removed again


@pytest.mark.parametrize("args, says", [
    (["s3://bucket/runs/a/model_final.pt", "--format", "onnx"],
     "s3://bucket/runs/a/model_final.pt is in remote storage: give --out DIR, a local folder to write into"),
    (["{run}", "--format", "onnx", "--out", "s3://bucket/exported"],
     "--out s3://bucket/exported: raydist.export writes a local folder; copy it from there"),
])
def test_remote_storage_needs_a_local_out_folder(trained, capsys, monkeypatch, args, says):
    import raydist.predict

    # The model file itself is read through pyarrow's S3 client; here a stand-in resolves the URI.
    real = raydist.predict.Predictor.__init__

    def at_uri(self, path, **kw):
        real(self, str(trained), **kw)
        self.path = "s3://bucket/runs/a/model_final.pt"

    monkeypatch.setattr(raydist.predict.Predictor, "__init__", at_uri)
    code, _, err = run_main("raydist.export", [a.format(run=trained) for a in args], capsys, monkeypatch)
    assert code == 2 and err.strip() == f"raydist.export: error: {says}"


def test_without_onnxruntime_the_model_is_written_and_said_unchecked(trained, tmp_path, capsys, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    code, said, _ = run_main("raydist.export", [str(trained), "--format", "onnx", "--out", str(tmp_path)], capsys,
                             monkeypatch)
    assert code == 0 and (tmp_path / "model.onnx").exists()
    assert said.splitlines()[-1] == ('not checked: onnxruntime is not installed (pip install onnxruntime, or the '
                                     '"raydist[export]" extra)')


@pytest.mark.parametrize("served, code, says", [
    (lambda path, fmt, x: (_ for _ in ()).throw(RuntimeError("opset 99 is not supported")), 1,
     "check failed: the torchscript runtime could not run {out}/model.torchscript.pt (opset 99 is not supported)"),
    (lambda path, fmt, x: torch.zeros(len(x), 10), 1, "MORE THAN THE TOLERANCE"),
])
def test_an_export_that_does_not_serve_raydists_outputs_is_exit_1(trained, tmp_path, capsys, monkeypatch, served,
                                                                 code, says):
    monkeypatch.setattr(export, "exported_logits", served)
    got, said, _ = run_main("raydist.export", [str(trained), "--format", "torchscript", "--out", str(tmp_path)],
                            capsys, monkeypatch)
    assert got == code and says.format(out=tmp_path) in said.splitlines()[-1]


def test_an_image_folders_check_decodes_only_the_images_it_checks_taken_from_every_class(tmp_path, monkeypatch):
    """A folder's whole validation split can be tens of thousands of photos: the check decodes the N it uses,
    a class at a time (its split is sorted by class, so its first N would be one class)."""
    from image_folders import write_digits_folder

    from raydist.data import folder as folder_module
    from raydist.data.folder import decode_image

    monkeypatch.setenv("RAYDIST_CACHE_DIR", str(tmp_path / "cache"))
    write_digits_folder(tmp_path / "photos", per_class=15)
    cfg = validate(TrainConfig(dataset="folder", data_dir=str(tmp_path / "photos"), input_size=32, num_workers=1))
    decoded = []
    monkeypatch.setattr(folder_module, "decode_image", lambda data, size: decoded.append(size) or decode_image(data,
                                                                                                                 size))
    images = export.validation_images(cfg, 12)
    assert images.shape == (12, 3, 37, 37) and images.dtype == torch.uint8 and len(decoded) == 12
    index = folder_module.scan_folder(str(tmp_path / "photos"), val_fraction=0.2)
    expected = [f for i in range(2) for f in [files[i] for files in _by_class(index.splits["val"])]][:12]
    wanted = torch.from_numpy(np.stack([decode_image((tmp_path / "photos" / f.path).read_bytes(), 37)
                                        for f in expected]))
    assert torch.equal(images, wanted)


def _by_class(files):
    out = {}
    for f in files:
        out.setdefault(f.label, []).append(f)
    return list(out.values())
