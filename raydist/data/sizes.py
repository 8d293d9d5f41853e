"""What a data set holds, known before its images are loaded: training and validation sizes after the
hold-out and the class and size selection, class counts and class names (for the checks before any cluster
starts, and for the run folder's classes.json)."""

from __future__ import annotations

from typing import Optional

import torch

from raydist.config.fields import TrainConfig
from raydist.data.registry import CIFAR10_NAMES, DATASETS, DIGIT_NAMES, FASHION_MNIST_NAMES, parse_classes
from raydist.data.sources import folder_index, load_digits_split
from raydist.data.splits import held_out_count, subset_size
from raydist.errors import ConfigError
from raydist.models.registry import model_spec

FILE_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}  # the published training
# sets, each with the same number of images per class


def train_size(name: str, *, val_fraction: Optional[float] = None, fake_train_size: int = 12800,
               classes: Optional[list[int]] = None, train_fraction: float = 1.0,
               train_per_class: Optional[int] = None, data_dir: str = "") -> int:
    """Training images of a data set after the validation hold-out and the class and size selection, known
    without loading the images (for checks before any cluster starts)."""
    fraction = DATASETS[name].val_fraction if val_fraction is None else val_fraction
    if name == "fake":
        return fake_train_size
    if name == "digits":
        labels = load_digits_split("train", val_fraction=fraction).labels
        per_class = torch.bincount(labels, minlength=10).tolist()
    elif name == "folder":
        per_class = folder_index(data_dir, fraction).counts("train")
    else:
        total = DATASETS[name].num_classes
        published = FILE_TRAIN_SIZES[name] // total
        per_class = [published - held_out_count(published, fraction)] * total
    kept = [per_class[c] for c in (classes if classes else range(len(per_class)))]
    return sum(subset_size(n, train_fraction, train_per_class) for n in kept)


def val_size(name: str, *, val_fraction: Optional[float] = None, fake_val_size: int = 1280,
             classes: Optional[list[int]] = None, data_dir: str = "") -> int:
    """Validation images of a data set after the hold-out and the class selection (for checks before any
    cluster starts: an empty validation split would divide by zero in every worker)."""
    fraction = DATASETS[name].val_fraction if val_fraction is None else val_fraction
    if name == "fake":
        return fake_val_size
    if name == "digits":
        per_class = torch.bincount(load_digits_split("val", val_fraction=fraction).labels, minlength=10).tolist()
    elif name == "folder":
        per_class = folder_index(data_dir, fraction).counts("val")
    else:
        total = DATASETS[name].num_classes
        per_class = [held_out_count(FILE_TRAIN_SIZES[name] // total, fraction)] * total
    return sum(per_class[c] for c in (classes if classes else range(len(per_class))))


def num_classes(name: str, fake_num_classes: int = 1000, *, data_dir: str = "",
                val_fraction: Optional[float] = None) -> int:
    """Classes of the whole data set (a run's model predicts raydist.data.sizes.classes_predicted(cfg))."""
    if name == "folder":
        return len(folder_index(data_dir, val_fraction).classes)
    return fake_num_classes if name == "fake" else DATASETS[name].num_classes


def class_names(name: str, *, data_dir: str = "", val_fraction: Optional[float] = None,
                fake_num_classes: int = 1000) -> list[str]:
    """Index -> class name of a data set's labels (before --classes picks some): an image folder's subfolder
    names; the published names of digits, CIFAR-10 and Fashion-MNIST; the label numbers of CIFAR-100;
    none for fake data."""
    known = {"digits": DIGIT_NAMES, "cifar10": CIFAR10_NAMES, "fashion_mnist": FASHION_MNIST_NAMES}
    if name == "folder":
        return list(folder_index(data_dir, val_fraction).classes)
    if name in known:
        return list(known[name])
    if name == "fake":  # random labels have no names (and there can be billions of them)
        return []
    return [str(i) for i in range(num_classes(name, fake_num_classes))]


def input_side(cfg: TrainConfig) -> int:
    """The side in pixels of the images the model reads: --input-size, else the data set's own side for
    models (digits: 16) where the model reads it, else the images' stored side."""
    if cfg.input_size:
        return cfg.input_size
    preferred = DATASETS[cfg.dataset].model_side
    try:
        spec = model_spec(cfg.model)
    except ValueError:  # checked elsewhere
        spec = None
    # ImageNet architectures (those with published ImageNet weights, given by --pretrained or a --weights file)
    # read images near their own size; a model that reads fixed sides reads those.
    if preferred and spec and not spec.pretrained_weights and not (
            spec.input_sides and not spec.input_sides[0] <= preferred <= spec.input_sides[1]):
        return preferred
    return stored_side(cfg)


def stored_side(cfg: TrainConfig) -> int:
    """The side in pixels of the images as loaded (before any --input-size resize)."""
    return cfg.fake_image_size if cfg.dataset == "fake" else DATASETS[cfg.dataset].image_size


def class_list(cfg: TrainConfig) -> Optional[list[int]]:
    """--classes as a list of class indices, or None for all of them."""
    if cfg.classes is None:
        return None
    try:
        return parse_classes(cfg.classes, num_classes=_all_classes(cfg))
    except ValueError as exc:
        raise ConfigError(f"--classes {cfg.classes!r}: {exc}") from None


def _all_classes(cfg: TrainConfig) -> int:
    return num_classes(cfg.dataset, cfg.fake_num_classes, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction)


def classes_predicted(cfg: TrainConfig) -> int:
    """Classes a run's model predicts: those of --classes, else the data set's."""
    selected = class_list(cfg)
    return len(selected) if selected else _all_classes(cfg)


def predicted_class_names(cfg: TrainConfig) -> list[str]:
    """Index -> name of the classes a run's model predicts (an image folder's subfolder names, in the
    order of --classes when given)."""
    names = class_names(cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                        fake_num_classes=cfg.fake_num_classes)
    selected = class_list(cfg)
    return [names[c] for c in selected] if selected and names else names
