"""`python -m raydist.predict`: classify image files with a trained raydist model.

    python -m raydist.predict runs/photos-resnet18 ~/new_photos/            # one line per image
    python -m raydist.predict runs/photos-resnet18/model_final.pt a.jpg b.png --top-k 3 --csv preds.csv
    python -m raydist.predict runs/photos-resnet18 ~/labelled/ --per-class report/    # + accuracy per class

The model is a run folder (its model_final.pt), a study folder (its best_model.pt), or a model file
(model_final.pt, best_model.pt, a checkpoint folder or its checkpoint.pt), local or a URI. Class names come
from the file itself (saved there since raydist learned image folders), else the run folder's classes.json,
else the label numbers. Every image goes through the evaluation preprocessing of the run's validation:
decoded as the training folder's images were (raydist.data.folder.decode_image: RGB, shorter side to the
stored size, centre square), then raydist.loop.evaluate.input_pipeline without augmentation (centre crop or
resize, the data set's normalisation, the channels the model reads). Runs on a GPU when there is one.

Output: per image, `path<TAB>name probability%` for the top k (best first). A file that cannot be decoded
gets a line saying so on stderr and the exit code 1; a missing path or model exits 2 before anything runs.
With --per-class DIR the folders given are labelled (one subfolder per class, named as the model's classes,
as an image folder data set is): the last line gives the accuracy (and top-5 for 10 classes or more), and DIR
gets per_class.csv and confusion.png, as a run folder has them (raydist.output.mistakes).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Optional

from raydist.cli import OneLineErrorParser
from raydist.errors import ConfigError

DESCRIPTION = """Classify image files (or every image in folders) with a trained raydist model: one line per
image with its top-k classes and probabilities, or a CSV.

example:
  python -m raydist.predict runs/photos-resnet18 ~/new_photos/ --top-k 3"""


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="raydist.predict", description=DESCRIPTION)
    parser.add_argument("model", metavar="RUN_OR_MODEL_FILE",
                        help="a run folder, a study folder, or a model_final.pt / best_model.pt / checkpoint")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=1, help="classes shown per image, best first (default 1)")
    parser.add_argument("--csv", metavar="FILE", help="also write the predictions to this CSV file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--per-class", metavar="DIR", help="the folders are labelled (a subfolder per class, named "
                        "as the model's classes): say the accuracy, and write per_class.csv and confusion.png here")
    return parser


def model_file(path: str) -> str:
    """The model file a run folder, study folder, checkpoint folder or file names; ConfigError if none."""
    from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE
    from raydist.storage import is_uri

    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such run folder or model file")
    for name in (FINAL_MODEL_FILE, "best_model.pt", CHECKPOINT_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ConfigError(f"{path}: holds no {FINAL_MODEL_FILE}, best_model.pt or {CHECKPOINT_FILE}; give a finished "
                      f"run's folder or a model file")


def image_files(paths: list[str]) -> list[str]:
    """Files as given, and every image file in the folders given (sorted); ConfigError for a missing path."""
    from raydist.data.folder import is_image_file

    found = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            inside = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files if is_image_file(f))
            if not inside:
                raise ConfigError(f"{path}: holds no image file (.jpg, .jpeg, .png, .webp, .bmp)")
            found += inside
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such image file or folder")
    seen: set = set()  # a folder given twice (or inside another given one) is predicted once
    return [f for f in found if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]


def image_labels(paths: list[str], files: list[str], class_names: list[str]) -> list[Optional[int]]:
    """Each file's class: the subfolder of a given folder it lies in, which must name one of the model's
    classes (ConfigError naming the first that does not). As training reads an image folder, images beside
    the class subfolders and hidden subfolders are not labelled (None): predicted, not counted."""
    known = {name: i for i, name in enumerate(class_names)}
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    folders = [os.path.expanduser(p) for p in paths]
    labels: list[Optional[int]] = []
    for path in files:
        folder = next((f for f in folders if os.path.isdir(f) and path.startswith(os.path.join(f, ""))), None)
        if folder is None:
            raise ConfigError(f"--per-class: {path} is a file, not a folder of class subfolders")
        parts = os.path.relpath(path, folder).split(os.sep)
        if len(parts) < 2 or parts[0].startswith("."):
            labels.append(None)
        elif parts[0] in known:
            labels.append(known[parts[0]])
        else:
            raise ConfigError(f"--per-class: {os.path.join(folder, parts[0])} is not a subfolder named for one of "
                              f"the model's classes ({shown})")
    if all(label is None for label in labels):
        raise ConfigError(f"--per-class: {', '.join(paths)} holds its images directly, not in subfolders named "
                          f"for the model's classes ({shown}); give the folder above the class folders")
    return labels


class Predictor:
    """A saved raydist model with its validation-time preprocessing and class names."""

    def __init__(self, path: str, device=None):
        import torch

        from raydist.config.fields import TrainConfig
        from raydist.data.sizes import classes_predicted
        from raydist.models.transfer import load_trained_model
        from raydist.runs.checkpoints import read_model_file

        self.path = model_file(path)
        try:
            saved = read_model_file(self.path)
            self.cfg = TrainConfig.from_saved(saved["config"])
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - not a raydist model file, or cut short
            raise ConfigError(f"{self.path}: cannot be read as a raydist model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.class_names = saved.get("class_names") or self._run_folder_classes()
        count = saved.get("num_classes") or (len(self.class_names) if self.class_names else None)
        if count is None:  # an older checkpoint: its config's data set says
            count = classes_predicted(self.cfg)
        if not self.class_names or len(self.class_names) != count:
            self.class_names = [str(i) for i in range(count)]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            net = load_trained_model({"model_name": self.cfg.model, "num_classes": count, **saved})
        except ValueError as exc:  # a timm model on a machine without timm, a model this raydist lacks
            raise ConfigError(f"{self.path}: {exc}") from None
        self.net = net.to(self.device)

    def _run_folder_classes(self) -> Optional[list[str]]:
        from raydist.runs.run_folder import CLASSES_FILE

        folder = os.path.dirname(self.path)
        for candidate in (folder, os.path.dirname(folder)):  # a run folder, or a checkpoint folder inside one
            path = os.path.join(candidate, CLASSES_FILE)
            if os.path.isfile(path):
                with open(path) as fh:
                    return json.load(fh)
        return None

    def stored_side(self) -> int:
        """The side images are decoded to, as the training data's were."""
        from raydist.data.folder import stored_size
        from raydist.data.registry import DATASETS
        from raydist.data.sizes import input_side

        if self.cfg.dataset == "folder":
            return stored_size(input_side(self.cfg))
        return DATASETS[self.cfg.dataset].image_size if self.cfg.dataset != "fake" else self.cfg.fake_image_size

    def probabilities(self, images):
        """uint8 N x 3 x S x S (as decoded) -> N x classes probabilities."""
        import torch

        from raydist.loop.evaluate import input_pipeline

        pipeline = input_pipeline(self.cfg, self.device)
        if self.cfg.input_channels() == 1:
            images = images[:, :1]
        with torch.no_grad():
            x = pipeline(images.to(self.device), train=False)
            return torch.softmax(self.net(x).float(), dim=1).cpu()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        predictor = Predictor(args.model)
        files = image_files(args.images)
        labels = image_labels(args.images, files, predictor.class_names) if args.per_class else None
        if args.per_class:
            try:  # made now: a folder that cannot be is one line before any image is read
                os.makedirs(args.per_class, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--per-class {args.per_class}: cannot be made a folder ({exc.strerror or exc}); "
                                  f"give a folder for per_class.csv and confusion.png") from None
    except ConfigError as exc:
        print(f"raydist.predict: error: {exc}", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from raydist.data.folder import decode_image

    k = min(args.top_k, len(predictor.class_names))
    side, rows, failed = predictor.stored_side(), [], 0
    tally = LabelledTally(len(predictor.class_names)) if labels is not None else None
    for start in range(0, len(files), args.batch_size):
        batch, names, truth = [], [], []
        for n, path in enumerate(files[start:start + args.batch_size], start=start):
            try:
                with open(path, "rb") as fh:
                    batch.append(decode_image(fh.read(), side))
                names.append(path)
                truth.append(labels[n] if labels is not None else None)
            except Exception as exc:  # noqa: BLE001 - one bad file does not stop the others
                failed += 1
                print(f"raydist.predict: {path}: cannot be decoded as an image ({type(exc).__name__})",
                      file=sys.stderr)
        if not batch:
            continue
        probs = predictor.probabilities(torch.from_numpy(np.stack(batch)))
        if tally is not None:
            tally.add(probs, truth)
        top_p, top_i = probs.topk(k, dim=1)
        for path, ps, idx in zip(names, top_p.tolist(), top_i.tolist()):
            ranked = [(predictor.class_names[i], p) for i, p in zip(idx, ps)]
            rows.append((path, ranked))
            print(f"{path}\t" + ", ".join(f"{name} {p:.1%}" for name, p in ranked), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path"] + [f"{field}_{r}" for r in range(1, k + 1) for field in ("class", "prob")])
            for path, ranked in rows:
                writer.writerow([path] + [value for name, p in ranked for value in (name, f"{p:.6f}")])
    if tally is not None:
        print(tally.write(args.per_class, predictor.class_names, title=f"{predictor.path} on {', '.join(args.images)}"))
    return 1 if failed else 0


class LabelledTally:
    """--per-class: the confusion matrix and top-5 count of the labelled images predicted so far."""

    def __init__(self, classes: int):
        from raydist.output.mistakes import MATRIX_CLASSES

        # as a run keeps it: no matrix above MATRIX_CLASSES classes (it grows with their square)
        self.confusion = [[0] * classes for _ in range(classes)] if classes <= MATRIX_CLASSES else None
        self.correct = self.top5 = self.count = 0

    def add(self, probs, truth: list[Optional[int]]) -> None:
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices.tolist()
        for label, ranked in zip(truth, top):
            if label is None:  # beside the class folders: predicted, not counted
                continue
            if self.confusion is not None:
                self.confusion[label][ranked[0]] += 1
            self.correct += label == ranked[0]
            self.top5 += label in ranked
            self.count += 1

    def write(self, folder: str, names: list[str], *, title: str) -> str:
        """per_class.csv and confusion.png into `folder` (an earlier call's removed first); the line that
        says the accuracy, or that nothing was counted."""
        from raydist.output.mistakes import MATRIX_CLASSES, write_mistake_files

        # an earlier call's files go first, also when nothing is counted now
        paths = write_mistake_files(folder, self.confusion if self.count else None, names, title=title)
        if not self.count:
            return f"no labelled image could be decoded: nothing written to {folder}"
        top5 = f", top-5 {self.top5 / self.count:.2%}" if len(names) >= 10 else ""
        written = (f"per class: {paths[0]}, {paths[1]}" if paths
                   else f"no per-class files above {MATRIX_CLASSES:,} classes")
        return f"accuracy {self.correct / self.count:.2%} on {self.count} labelled images{top5}; {written}"


if __name__ == "__main__":
    sys.exit(main())
