"""Every registered model's parameters and forward FLOPs per image, counted (not timed): docs/models.md.

    python benchmarks/model_sizes.py                      # prints the table
    python benchmarks/model_sizes.py --out docs/models.md # and writes it

Parameters with 10 classes (the ImageNet models also with their 1000), FLOPs of one image's forward pass as
PyTorch's FlopCounterMode counts them (a multiply-add is 2 FLOPs; convolutions and matrix products only), at
the input size each model is built for: 32 x 32 for the CIFAR models, 224 x 224 for torchvision's.
A training step costs about 3x the forward.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_env import describe, environment
from raydist.models.registry import MODELS, create_model

IMAGENET_MODELS = ("resnet18_imagenet", "resnet50_imagenet")


def count(name: str, classes: int, side: int) -> tuple[int, float]:
    net = create_model(name, num_classes=classes).eval()
    params = sum(p.numel() for p in net.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, side, side))
    return params, counter.get_total_flops() / 1e9


def table() -> list[str]:
    lines = ["| model | input | parameters (10 classes) | parameters (1000 classes) | GFLOP per image, forward |",
             "|---|---|---|---|---|"]
    for name in sorted(MODELS):
        side = 224 if name in IMAGENET_MODELS else 32
        params, gflop = count(name, 10, side)
        thousand = f"{count(name, 1000, side)[0]:,}" if name in IMAGENET_MODELS else ""
        args = MODELS[name].arguments()
        shape = f" (defaults: {', '.join(f'{k}={p.default}' for k, p in args.items())})" if args else ""
        lines.append(f"| {name}{shape} | {side} x {side} | {params:,} | {thousand} | {gflop:.4g} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the Markdown page here (e.g. docs/models.md)")
    args = parser.parse_args()
    env = environment(sys.argv)
    rows = table()
    print("\n".join(rows))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Models: parameters and FLOPs\n\n"
                     "Counted by `python benchmarks/model_sizes.py --out docs/models.md` (counts, not timings: the "
                     "same on any machine).\n"
                     f"Made with: {describe(env)}.\n\n"
                     "FLOPs are those of one image's forward pass as PyTorch's `FlopCounterMode` counts them (a "
                     "multiply-add is 2; convolutions and matrix products), at the input each model is built for. "
                     "A training step costs about 3x the forward. The models with arguments (`--model-arg`) are "
                     "shown at their defaults; e.g. `--model wrn --model-arg depth=28 --model-arg widen=10` is "
                     "WRN-28-10.\n\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
