"""Batched data augmentation on the worker's device: one call per batch, no per-image Python, no PIL.

    from raydist.augment import Augmenter
    aug = Augmenter("crop_flip", mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", seed=0)
    x = aug(images_uint8, train=True)      # float32 N x 3 x H x W, normalized

Kinds:
- none:      normalize only;
- crop_flip: pad-4 random crop and horizontal flip (the CIFAR standard), done on uint8 by indexing;
- dli:       the DLI assessment's set: flip, rotation +-10 deg, shear +-10 deg, scale 0.8-1.2
             (one affine grid_sample for all three), colour jitter 0.2 (brightness, contrast, saturation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("none", "crop_flip", "dli")
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


class Augmenter:
    def __init__(self, kind: str, *, mean, std, device="cpu", seed: int = 0, crop_padding: int = 4,
                 max_rotation_deg: float = 10.0, max_shear_deg: float = 10.0, scale=(0.8, 1.2), jitter: float = 0.2):
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.pad = kind, crop_padding
        self.rotation, self.shear, self.scale, self.jitter = max_rotation_deg, max_shear_deg, scale, jitter
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, images: torch.Tensor, *, train: bool) -> torch.Tensor:
        if train and self.kind == "crop_flip":
            images = flip(random_crop(images, self.pad, self.gen), self.gen)
        x = images.float().div_(255)
        if train and self.kind == "dli":
            x = flip(x, self.gen)
            x = random_affine(x, self.rotation, self.shear, self.scale, self.gen)
            x = colour_jitter(x, self.jitter, self.gen)
        return (x - self.mean) / self.std


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device) * (high - low) + low


def random_crop(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` and cut a random H x W window per image, by gathering rows and columns."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # n x h x 1
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # n x 1 x w
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indices split by a slice put their broadcast shape first: n x h x w x c.
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left-right."""
    mask = torch.rand(images.shape[0], generator=gen, device=gen.device).to(images.device) < 0.5
    return torch.where(mask[:, None, None, None], images.flip(3), images)


def random_affine(x: torch.Tensor, max_rot_deg: float, max_shear_deg: float, scale, gen) -> torch.Tensor:
    """Rotate, shear (along x) and scale every image about its centre in one grid_sample."""
    n = x.shape[0]
    angle = uniform(n, -max_rot_deg, max_rot_deg, gen).to(x.device) * (math.pi / 180)
    shear = uniform(n, -max_shear_deg, max_shear_deg, gen).to(x.device) * (math.pi / 180)
    zoom = uniform(n, scale[0], scale[1], gen).to(x.device)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # forward = zoom * rotation @ shear;  [[c, -s], [s, c]] @ [[1, t], [0, 1]] = [[c, c*t - s], [s, s*t + c]]
    a, b = cos * zoom, (cos * tan - sin) * zoom
    c, d = sin * zoom, (sin * tan + cos) * zoom
    det = a * d - b * c
    # affine_grid maps output positions to input positions: it wants the inverse transform.
    theta = torch.stack([torch.stack([d, -b, torch.zeros_like(a)], 1),
                         torch.stack([-c, a, torch.zeros_like(a)], 1)], 1) / det[:, None, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def colour_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn from [1 - strength, 1 + strength] per image."""
    n = x.shape[0]
    factors = uniform(3 * n, 1 - strength, 1 + strength, gen).to(x.device).view(3, n, 1, 1, 1)
    weights = torch.tensor(GREY, device=x.device).view(1, 3, 1, 1)
    x = (x * factors[0]).clamp_(0, 1)
    mean_grey = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean_grey) * factors[1] + mean_grey).clamp_(0, 1)
    grey = (x * weights).sum(1, keepdim=True)
    return ((x - grey) * factors[2] + grey).clamp_(0, 1)
