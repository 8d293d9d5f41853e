"""The data sets by name: each one's spec (classes, statistics, image size, what it is read from), registered
by its loader with `@register_dataset` (raydist.data.sources), and the published class names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    mean: tuple[float, float, float]  # per channel, of the images the model sees, scaled to [0, 1]
    std: tuple[float, float, float]
    image_size: int  # side in pixels after loading (fake: set by --fake-image-size)
    load: Callable[..., object]  # split -> a TensorSource or FakeSource (raydist.data.sources)
    title: str  # as people write it, for messages
    needs_files: bool = False  # read from --data-dir (and downloadable)
    grey: bool = False  # one grey level replicated to 3 channels (can be fed as 1: --grey-input)
    has_test: bool = False  # a published test split, measured once at the end (raydist.final_eval)
    val_fraction: float = 0.2  # share held out for validation when --val-fraction is not given


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name, num_classes, mean, std, image_size, **details):
    def wrap(load):
        DATASETS[name] = DatasetSpec(name, num_classes, mean, std, image_size, load, **details)
        return load
    return wrap


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
