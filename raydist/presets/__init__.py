"""Presets: one command per workflow that raydist replaces (`python -m raydist.train --preset NAME`).

Each preset is a YAML file of config keys beside this module, read like a `--config` file that comes
first: --config files and flags override it. Its header comment says which workflow it reproduces, what
it keeps exactly and what it changes and why; `--preset list` prints the first line of each.

    python -m raydist.train --preset list
    python -m raydist.train --preset dli --data-dir ~/data --download --num-workers 4 --use-gpu
"""

from __future__ import annotations

import os

from raydist.errors import ConfigError

FOLDER = os.path.dirname(os.path.abspath(__file__))

# The Ray Tune notebook's two studies are studies, not single runs: named here so `--preset list` points
# to them.
NOTEBOOK_STUDIES = {"cifar10_tune_cnn": "the Ray Tune CIFAR-10 tutorial's search over its CNN's shape",
                    "fashion_mnist_transfer": "the notebook's transfer study, ImageNet ResNet-18 to Fashion-MNIST"}


def names() -> list[str]:
    return sorted(f[:-len(".yaml")] for f in os.listdir(FOLDER) if f.endswith(".yaml"))


def path(name: str) -> str:
    """The preset's YAML file; an unknown name is one ConfigError listing the known ones."""
    if name not in names():
        raise ConfigError(f"--preset {name!r} is not a preset; known: {', '.join(names())} (or --preset list)")
    return os.path.join(FOLDER, f"{name}.yaml")


def header(name: str) -> list[str]:
    """The preset's header comment, without the '# ' marks."""
    lines = []
    for line in open(path(name)):
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def listing() -> str:
    """What `--preset list` prints: each preset's first header line, then the notebook's studies."""
    rows = [header(name)[0] for name in names()]
    rows.append("")
    rows.append("studies of the Ray Tune notebook (python -m raydist.tune --search-space NAME):")
    rows += [f"{name}: {what}" for name, what in NOTEBOOK_STUDIES.items()]
    return "\n".join(rows)
