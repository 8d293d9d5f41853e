"""`python -m raydist.export`: a trained raydist model as a file that a plain runtime serves.

    python -m raydist.export runs/digits-resnet8-20261207 --format onnx          # -> runs/.../export/
    python -m raydist.export runs/photos/model_final.pt --format torchscript --out served/

The model is what raydist.predict takes (a run folder, a study folder, a model file or checkpoint). Written
into --out (default: an `export` folder beside the model file):
- `model.onnx` (ONNX from torch's dynamo exporter, weights inside the file, any batch size),
  `model.torchscript.pt` (torch.jit: `torch.jit.load` in a Python or C++ process with libtorch and nothing
  else; torch deprecates torch.jit from 2.10 on, so its warnings are silenced here) or `model.pt2`
  (torch.export, torch.jit's successor: `torch.export.load(path).module()`, AOTInductor for C++);
- `classes.json`: the output index -> class name;
- `preprocessing.json`: what a server does to a uint8 image before the model: the side images are stored at
  (shorter side resized, centre square), the centre crop or resize to the model's input side, the channels
  read, and the normalisation `(x / 255 - mean) / std` per channel: raydist's own evaluation preprocessing
  (raydist.loop.evaluate.input_pipeline), which the exported graph leaves out so that a server can batch and
  place it as it likes. The model's input is float32 N x C x S x S; its output the logits N x classes.

Then the check: the run's own validation images (the data set's validation split, as the run held it out)
through raydist's preprocessing, into the exported model (onnxruntime for ONNX, torch.jit for TorchScript)
and into raydist's model: the largest difference of their logits and the share of images whose top class
agrees, printed and kept in `preprocessing.json`. A difference above a tolerance is exit 1. Where the
validation images cannot be read here (a data set not on this machine) the file is written unchecked and
the line says why.

Bad input (no such run or model file, an unknown format, a model the exporter cannot trace) is one line,
exit 2, and leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import warnings
from typing import Optional

from raydist.cli import OneLineErrorParser
from raydist.errors import ConfigError, first_line
from raydist.storage import is_uri

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}
CLASSES_FILE, PREPROCESSING_FILE = "classes.json", "preprocessing.json"
TOLERANCE = 1e-3  # the largest logit difference accepted, relative to the largest logit's magnitude

DESCRIPTION = """Export a trained raydist model to ONNX, TorchScript or torch.export's .pt2, with its class names
and input preprocessing beside it, checked against raydist's own outputs on real validation images.

example:
  python -m raydist.export runs/digits-resnet8-20261207 --format onnx"""


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="raydist.export", description=DESCRIPTION)
    parser.add_argument("model", metavar="RUN_OR_MODEL_FILE",
                        help="a run folder, a study folder, or a model_final.pt / best_model.pt / checkpoint")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="onnx (any ONNX runtime), torchscript (torch.jit.load, Python or C++) or pt2 "
                             "(torch.export.load)")
    parser.add_argument("--out", metavar="DIR", help="folder to write into (default: export/ beside the model)")
    parser.add_argument("--check-images", type=int, default=256, metavar="N",
                        help="validation images the exported model is checked on (default 256; 0: no check)")
    return parser


def preprocessing(cfg) -> dict:
    """What raydist's evaluation does to a uint8 image before the model, as numbers a server can apply."""
    from raydist.data.folder import stored_size
    from raydist.data.registry import DATASETS
    from raydist.data.sizes import input_side, stored_side

    spec = DATASETS[cfg.dataset]
    channels, side = cfg.input_channels(), input_side(cfg)
    mean, std = (spec.mean, spec.std) if cfg.normalize == "dataset" else ((0.5,) * 3, (0.5,) * 3)
    stored = stored_size(side) if cfg.dataset == "folder" else stored_side(cfg)
    return {
        "input": {"dtype": "float32", "layout": "NCHW", "channels": channels, "side": side},
        "stored_side": stored,  # images decoded to this square (a folder's: shorter side, then the centre)
        # torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=side < stored)
        "to_input": ("centre crop" if cfg.dataset == "folder" else
                     "bilinear resize (align_corners false, antialiased when shrinking)") if stored != side else "none",
        "mean": list(mean[:channels]), "std": list(std[:channels]),  # of x / 255, per channel
        "output": "logits (softmax for probabilities)",
    }


def export_model(net, fmt: str, example, path: str) -> None:
    """`net` (eval mode) written to `path` in `fmt`, traced at `example`'s shape with any batch size."""
    import torch

    if fmt == "torchscript":
        with torch.no_grad(), _jit_quietly():
            torch.jit.trace(net, example, check_trace=False).save(path)
        return
    batch = torch.export.Dim("batch", min=1)
    if fmt == "pt2":
        torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), path)
        return
    # external_data=False: the weights inside the one file (a model under ONNX's 2 GB limit), not beside it
    # under the temporary name the file is written with
    torch.onnx.export(net, (example,), path, dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), external_data=False, verbose=False)


@contextlib.contextmanager
def _jit_quietly():
    """torch.jit's deprecation warnings (torch 2.10 on) silenced: the format is asked for by name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def exported_logits(path: str, fmt: str, x):
    """The exported file's logits for `x` (N x C x S x S float32, CPU), run as a server would run it."""
    import numpy as np
    import torch

    if fmt == "torchscript":
        with torch.no_grad(), _jit_quietly():
            return torch.jit.load(path, map_location="cpu")(x).float()
    if fmt == "pt2":
        with torch.no_grad():
            return torch.export.load(path).module()(x).float()
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x.numpy())})
    return torch.from_numpy(out).float()


def validation_images(cfg, count: int):
    """Up to `count` of the run's validation images (uint8, as stored), or a ConfigError saying why not. An
    image folder's are `count` files picked across its classes and decoded alone (not its whole split)."""
    from raydist.data.sizes import class_list
    from raydist.data.sources import load_split

    if cfg.dataset == "folder":
        return _folder_images(cfg, count)
    try:
        val = load_split(cfg.dataset, "val", data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                         classes=class_list(cfg), channels=cfg.input_channels(), input_size=cfg.input_size,
                         fake_image_size=cfg.fake_image_size, fake_num_classes=cfg.fake_num_classes,
                         fake_val_size=min(cfg.fake_val_size, count))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg.dataset}'s validation images cannot be read here ({exc})") from None
    return val.images[:count]


def _folder_images(cfg, count: int):
    """`count` validation files of an image folder, taken from each class in turn, decoded as the run's
    evaluation decoded them."""
    import dataclasses

    from raydist.data.folder import load_folder_split, stored_size
    from raydist.data.sizes import input_side
    from raydist.data.sources import folder_index

    try:
        index = folder_index(cfg.data_dir, cfg.val_fraction)
        by_class: dict[int, list] = {}
        for f in index.splits["val"]:
            by_class.setdefault(f.label, []).append(f)
        picked, queues = [], [list(files) for files in by_class.values()]
        while len(picked) < count and any(queues):
            picked += [q.pop(0) for q in queues if q][:count - len(picked)]
        subset = dataclasses.replace(index, splits={"val": picked})
        images, _, _ = load_folder_split(subset, "val", stored=stored_size(input_side(cfg)), use_cache=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the folder's validation images cannot be read here ({exc})") from None
    return images


def check(predictor, path: str, fmt: str, images) -> dict:
    """raydist's logits against the exported file's on `images`, preprocessed as raydist evaluates."""
    import torch

    from raydist.loop.evaluate import input_pipeline

    with torch.no_grad():
        x = input_pipeline(predictor.cfg, "cpu")(images.cpu(), train=False).contiguous()
        ours = predictor.net.cpu()(x).float()
    theirs = exported_logits(path, fmt, x)
    scale = max(ours.abs().max().item(), 1e-6)
    return {"images": len(images), "max_abs_diff": (ours - theirs).abs().max().item(), "logit_scale": scale,
            "same_top1": (ours.argmax(1) == theirs.argmax(1)).float().mean().item()}


def main(argv: Optional[list[str]] = None) -> int:
    from raydist.predict import Predictor

    args = build_parser().parse_args(argv)
    try:
        if args.check_images < 0:
            raise ConfigError(f"--check-images must be 0 or more, got {args.check_images}")
        if args.out and is_uri(args.out):
            raise ConfigError(f"--out {args.out}: raydist.export writes a local folder; copy it from there")
        predictor = Predictor(args.model, device="cpu")
        if not args.out and is_uri(predictor.path):
            raise ConfigError(f"{args.model} is in remote storage: give --out DIR, a local folder to write into")
        out = args.out or os.path.join(os.path.dirname(predictor.path), "export")
        written = _write(predictor, args.format, out)
    except ConfigError as exc:
        print(f"raydist.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported: {written['model']} ({args.format}), {written['classes']}, {written['preprocessing']}")
    if not args.check_images:
        return 0
    try:
        if args.format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError('onnxruntime is not installed (pip install onnxruntime, or the "raydist[export]" '
                              'extra)')
        images = validation_images(predictor.cfg, args.check_images)
    except ConfigError as exc:
        print(f"not checked: {exc}")
        return 0
    try:
        result = check(predictor, written["model"], args.format, images)
    except Exception as exc:  # noqa: BLE001 - a runtime that refuses the file: the check failed, say why
        print(f"check failed: the {args.format} runtime could not run {written['model']} ({first_line(exc, 300)})")
        return 1
    _record(written["preprocessing"], result)
    agrees = result["max_abs_diff"] <= TOLERANCE * result["logit_scale"]
    print(f"checked on {result['images']} validation images: largest logit difference "
          f"{result['max_abs_diff']:.2e} (logits up to {result['logit_scale']:.3g}), same top class on "
          f"{result['same_top1']:.1%}{'' if agrees else ': MORE THAN THE TOLERANCE'}")
    return 0 if agrees else 1


def _write(predictor, fmt: str, out: str) -> dict:
    """The model, classes.json and preprocessing.json in `out`, each written whole (a temporary name, then
    renamed): an export that fails leaves none of them behind. ConfigError for a model that cannot export."""
    import torch

    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot be made a folder ({exc.strerror or exc})") from None
    prep = preprocessing(predictor.cfg)
    side, channels = prep["input"]["side"], prep["input"]["channels"]
    example = torch.zeros(2, channels, side, side)
    paths = {"model": os.path.join(out, FORMATS[fmt]), "classes": os.path.join(out, CLASSES_FILE),
             "preprocessing": os.path.join(out, PREPROCESSING_FILE)}
    # model.partial.onnx: the temporary name keeps the extension (torch.export warns about a .pt2 without it)
    partial = {key: "{0}.partial{1}".format(*os.path.splitext(path)) for key, path in paths.items()}
    try:
        export_model(predictor.net.cpu().eval(), fmt, example, partial["model"])
    except Exception as exc:  # noqa: BLE001 - the exporter's many ways to refuse a model, in one line
        _remove(partial.values())
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(out)  # the folder this export made, empty again
        raise ConfigError(f"{predictor.cfg.model} cannot be exported to {fmt}: {first_line(exc, 300)}") from None
    for key, content in (("classes", predictor.class_names), ("preprocessing", prep)):
        with open(partial[key], "w") as fh:
            json.dump(content, fh, indent=1)
    for key in paths:
        os.replace(partial[key], paths[key])
    return paths


def _record(path: str, result: dict) -> None:
    with open(path) as fh:
        prep = json.load(fh)
    prep["check"] = result
    with open(f"{path}.partial", "w") as fh:
        json.dump(prep, fh, indent=1)
    os.replace(f"{path}.partial", path)


def _remove(paths) -> None:
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
