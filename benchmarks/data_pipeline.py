"""Images per second: raydist's batched augmentation against the DLI assessment's per-image torchvision pipeline.

    python benchmarks/data_pipeline.py [--images 4096] [--threads 1]

Both sides augment the same 32x32 RGB images with the same operations (flip, rotation 10 deg, shear 10 deg,
scale 0.8-1.2, colour jitter 0.2, normalize) on the same number of CPU threads, in one process, one after
the other. The per-image side is what a torchvision DataLoader worker runs per sample (PIL in, tensor out);
the batched side is raydist.augment.Augmenter("dli") on uint8 batches of 256.
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from raydist.augment import Augmenter

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def per_image_pipeline():
    return transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(10),
        transforms.RandomAffine(0, shear=10, scale=(0.8, 1.2)),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def time_per_image(images: np.ndarray) -> float:
    pipeline = per_image_pipeline()
    pils = [Image.fromarray(img) for img in images]  # the data set's PIL images, as torchvision's CIFAR10 gives them
    start = time.perf_counter()
    batch = torch.stack([pipeline(img) for img in pils])
    elapsed = time.perf_counter() - start
    assert batch.shape == (len(images), 3, 32, 32)
    return len(images) / elapsed


def time_batched(images: np.ndarray, kind: str, batch_size: int = 256) -> float:
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    augment = Augmenter(kind, mean=MEAN, std=STD, seed=0)
    augment(data[:batch_size], train=True)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(data), batch_size):
        out = augment(data[i:i + batch_size], train=True)
    elapsed = time.perf_counter() - start
    assert out.shape[1:] == (3, 32, 32)
    return len(images) / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    per_image = time_per_image(images)
    batched = time_batched(images, "dli")
    crop_flip = time_batched(images, "crop_flip")
    print(f"images: {args.images} (32x32 RGB), CPU threads: {args.threads}")
    print(f"torchvision per-image pipeline (dli ops): {per_image:12,.0f} images/s")
    print(f"raydist batched, dli ops:                 {batched:12,.0f} images/s   ratio {batched / per_image:6.1f}x")
    print(f"raydist batched, crop_flip (default):     {crop_flip:12,.0f} images/s   ratio {crop_flip / per_image:6.1f}x")


if __name__ == "__main__":
    main()
