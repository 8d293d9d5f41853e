"""Images per second: raydist's batched augmentation against torchvision's per-image pipeline, a DataLoader
with workers and torchvision v2 on whole uint8 batches, for the same operations, side by side.

    python benchmarks/data_pipeline.py [--images 4096] [--rounds 7] [--ops dli crop_flip randaugment]
                                       [--json docs/data_pipeline.json]

Three sets of operations (--ops picks; default all), each run by every pipeline:
- dli:       the DLI assessment's training transform: flip, rotation 10 deg, shear 10 deg, scale 0.8-1.2,
             colour jitter 0.2 (brightness, contrast, saturation), to float, normalize;
- crop_flip: pad-4 random 32x32 crop, horizontal flip, to float, normalize (raydist's default);
- randaugment: RandAugment alone (2 ops at magnitude 9 of 31, nearest, fill 0), uint8 in and out: torchvision's
             v2.RandAugment against raydist.data.policies.rand_augment.
Pipelines:
- per_image:  torchvision transforms on PIL images one at a time, as a DataLoader worker runs them (1 thread);
              for randaugment v2.RandAugment on uint8 tensor images one at a time (its per-image draws);
- dataloader: the same per-image transforms in a torch DataLoader with one worker per core (persistent
              workers, batches of 256: what a training script would use on this machine);
- v2_batch:   torchvision.transforms.v2 on uint8 tensors of 256 images (1 thread). v2 draws ONE set of
              random parameters per call, so every image of a batch gets the same crop, angle, jitter:
              cheaper, but not the same augmentation;
- raydist:    raydist.data.augment.Augmenter on uint8 batches of 256 (1 thread), per-image parameters; for
              randaugment raydist.data.policies.rand_augment (per-image ops and signs).

Method: every pipeline is warmed up first; then --rounds rounds, each timing every pipeline once (the order
rotates from round to round), each timing at least --min-seconds long. Ratios are taken within a round
(neighbours in time) and reported as the median over rounds with the min-max; like for like only (a
pipeline against per_image with the same operations). The load average before and after goes in the JSON:
on a shared machine the absolute images/s move with other work, the in-round ratios much less.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

from bench_env import describe, environment, load_average, spread, summary
from raydist.data.augment import Augmenter
from raydist.data.policies import rand_augment

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
BATCH = 256  # images per batch for every batched pipeline and the DataLoader
OPS = ("dli", "crop_flip", "randaugment")
TENSOR_OPS = ("randaugment",)  # run on uint8 tensor images (no PIL) and left uint8: the policy alone


def per_image_transform(ops: str):
    """torchvision's classic transforms on one PIL image; v2's RandAugment on one uint8 tensor image."""
    if ops == "randaugment":
        return v2.RandAugment()  # the defaults: 2 ops, magnitude 9 of 31, nearest, fill 0
    if ops == "dli":
        head = [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10),
                transforms.RandomAffine(0, shear=10, scale=(0.8, 1.2)),
                transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    else:
        head = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def v2_batch_transform(ops: str):
    """torchvision.transforms.v2 on a uint8 N x 3 x H x W tensor: one parameter draw for the whole batch."""
    if ops == "randaugment":
        return v2.RandAugment()  # on a batch: the same 2 ops and signs for all 256 images
    if ops == "dli":
        head = [v2.RandomHorizontalFlip(), v2.RandomRotation(10), v2.RandomAffine(0, shear=10, scale=(0.8, 1.2)),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    else:
        head = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    return v2.Compose([*head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class PILImages(torch.utils.data.Dataset):
    def __init__(self, pils, transform):
        self.pils, self.transform = pils, transform

    def __len__(self):
        return len(self.pils)

    def __getitem__(self, i):
        return self.transform(self.pils[i])


# -- one pass over the images per pipeline; each returns the number of images it produced
def make_pipelines(images: np.ndarray, workers: int, selected=OPS) -> dict:
    pils = [Image.fromarray(img) for img in images]  # the data set's PIL images, as torchvision's CIFAR10 gives them
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    singles = list(tensor)  # uint8 3 x 32 x 32 images, for the policy that works on tensors
    pipelines = {}
    for ops in selected:
        inputs, dtype = (singles, torch.uint8) if ops in TENSOR_OPS else (pils, torch.float32)

        def per_image(t=per_image_transform(ops), inputs=inputs):
            out = torch.stack([t(img) for img in inputs])
            assert out.shape == (len(inputs), 3, 32, 32)
            return len(out)

        loader = torch.utils.data.DataLoader(PILImages(inputs, per_image_transform(ops)), batch_size=BATCH,
                                             num_workers=workers, persistent_workers=True)

        def dataloader(loader=loader):
            return sum(len(batch) for batch in loader)

        def batched(augment, dtype=dtype):
            def run():
                n = 0
                for i in range(0, len(tensor), BATCH):
                    out = augment(tensor[i:i + BATCH])
                    n += len(out)
                assert out.shape[1:] == (3, 32, 32) and out.dtype == dtype
                return n
            return run

        if ops == "randaugment":
            raydist_run = batched(lambda x, g=torch.Generator().manual_seed(0): rand_augment(x, g))
        else:
            raydist_run = batched(lambda x, a=Augmenter(ops, mean=MEAN, std=STD, seed=0): a(x, train=True))
        pipelines[(ops, "per_image")] = per_image
        pipelines[(ops, "dataloader")] = dataloader
        pipelines[(ops, "v2_batch")] = batched(v2_batch_transform(ops))
        pipelines[(ops, "raydist")] = raydist_run
    return pipelines


def timed(run, min_seconds: float) -> float:
    """Images per second over whole passes, repeated until at least min_seconds have passed."""
    images, start = 0, time.perf_counter()
    while True:
        images += run()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="random 32x32 RGB images per pass")
    parser.add_argument("--rounds", type=int, default=7, help="timings of every pipeline, interleaved")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="shortest timing (whole passes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: cores)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="sets of operations (default: all)")
    parser.add_argument("--json", default="", help="write the raw timings here (e.g. docs/data_pipeline.json)")
    args = parser.parse_args()
    env = environment(sys.argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    pipelines = make_pipelines(images, args.workers, args.ops)
    for run in pipelines.values():  # warm-up: first calls, allocator, DataLoader workers started
        run()
    names = list(pipelines)
    rates = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(timed(pipelines[name], args.min_seconds))
    env["load_average_end"] = load_average()

    results = {}
    for (ops, pipeline), values in rates.items():
        base = rates[(ops, "per_image")]
        results[f"{ops}/{pipeline}"] = {
            "images_per_s": summary(values, 1),
            "ratio_to_per_image": summary([v / b for v, b in zip(values, base)], 3),
            "cores": args.workers if pipeline == "dataloader" else 1}
    print(describe(env) + f"; load average at end {env['load_average_end']}")
    print(f"{args.images} images of 32x32 RGB, batches of {BATCH}, {args.rounds} interleaved rounds "
          f"(median, min-max over rounds)")
    for name, res in results.items():
        print(f"{name:>22}: {spread(res['images_per_s'], '{:,.0f}'):>32} images/s on {res['cores']} core(s); "
              f"x per-image {spread(res['ratio_to_per_image'], '{:.1f}')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "settings": vars(args) | {"batch": BATCH}, "results": results}, fh,
                      indent=1)
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
