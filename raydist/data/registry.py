"""The data sets by name: each one's spec (classes, statistics, image size, what it is read from) and the
published class names. Their loaders are raydist.data.sources.LOADERS; this module imports nothing heavy, so
the checks before a cluster (and Ray Data's decode tasks) can read it without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    mean: tuple[float, float, float]  # per channel, of the images the model sees, scaled to [0, 1]
    std: tuple[float, float, float]
    image_size: int  # side in pixels after loading (fake: set by --fake-image-size)
    title: str  # as people write it, for messages
    needs_files: bool = False  # read from --data-dir (and downloadable)
    grey: bool = False  # one grey level replicated to 3 channels (can be fed as 1: --grey-input)
    has_test: bool = False  # a published test split, measured once at the end (raydist.final_eval)
    val_fraction: float = 0.2  # share held out for validation when --val-fraction is not given
    # The side a model is fed when --input-size is not given (None: image_size). digits: its 8 x 8 scans at
    # 16 px train faster and better than at 32 (docs/benchmarks.md, "Time to accuracy"); ImageNet
    # architectures (the _imagenet models) and models that read fixed sides keep image_size.
    model_side: Optional[int] = None
    flips: bool = True  # a left-right mirror keeps the class (not for digits: a mirrored 2 is no digit)
    # Config defaults of its own, under every preset, --config file and flag (the command line's only; a
    # TrainConfig built in Python keeps the dataclass's). digits: 30 epochs, as fast at 16 px as 15 were at 32.
    recipe: tuple[tuple[str, object], ...] = ()


def padded_stats(mean: float, std: float, *, inner: int, outer: int) -> tuple[float, float]:
    """Mean and std of images zero-padded from inner x inner to outer x outer pixels, from the inner images'
    own. A share a = inner^2 / outer^2 of the pixels is the image and the rest is 0, so the padded mean is
    a * mean and the padded mean square a * (std^2 + mean^2); the std follows."""
    share = inner * inner / (outer * outer)
    padded_mean = share * mean
    return padded_mean, math.sqrt(share * (std * std + mean * mean) - padded_mean * padded_mean)


# Fashion-MNIST's published statistics are those of its 28 x 28 images; the model sees them zero-padded to
# 32 x 32, whose statistics these are (normalising with the 28 x 28 ones gave inputs of mean -0.19, std 0.94).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = padded_stats(0.2860, 0.3530, inner=28, outer=32)  # 0.2190, 0.3318
FOLDER_INPUT_SIZE = 224  # an image folder's default --input-size: what ImageNet models are trained at

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("digits", 10, (0.305, 0.305, 0.305), (0.324, 0.324, 0.324), 32, title="digits", grey=True,
                flips=False, model_side=16, recipe=(("epochs", 30),)),
    DatasetSpec("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, title="CIFAR-10",
                needs_files=True, has_test=True, val_fraction=0.1),
    DatasetSpec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, title="CIFAR-100",
                needs_files=True, has_test=True, val_fraction=0.1),
    DatasetSpec("fashion_mnist", 10, (FASHION_MNIST_MEAN,) * 3, (FASHION_MNIST_STD,) * 3, 32, title="Fashion-MNIST",
                needs_files=True, grey=True, has_test=True, val_fraction=0.1),
    DatasetSpec("fake", 1000, (0.5, 0.5, 0.5), (0.289, 0.289, 0.289), 224, title="fake data"),
    DatasetSpec("folder", 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), FOLDER_INPUT_SIZE, title="image folder",
                needs_files=True, val_fraction=0.1),
)}


def has_test_split(name: str) -> bool:
    return DATASETS[name].has_test


DIGIT_NAMES = [str(d) for d in range(10)]


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]


def parse_classes(spec: str, *, num_classes: int) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "5,7,9" -> [5, 7, 9]; "0-2,8" -> [0, 1, 2, 8]. Order kept (it numbers the labels)."""
    chosen: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        try:
            numbers = list(range(int(low), int(high) + 1)) if dash else [int(low)]
        except ValueError:
            raise ValueError(f"{part!r} is neither a class number nor a range like 0-4") from None
        if dash and int(high) < int(low):
            raise ValueError(f"the range {part!r} is empty")
        chosen += numbers
    outside = [c for c in chosen if not 0 <= c < num_classes]
    if outside:
        raise ValueError(f"class {outside[0]} is outside 0-{num_classes - 1}")
    if len(set(chosen)) != len(chosen):
        raise ValueError("a class is named twice")
    if len(chosen) < 2:
        raise ValueError("a classifier needs at least 2 classes")
    return chosen
