"""Batched data augmentation on the worker's device: one call per batch, no per-image Python, no PIL.

    aug = Augmenter("crop_flip", mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", seed=0)
    x = aug(images_uint8, train=True)      # float32 N x 3 x H x W, normalized

Kinds:
- none:      normalize only;
- crop:      pad-4 random crop (a shift of up to 4 pixels each way), done on uint8 by indexing; for data
             a mirror changes (digits: a mirrored 2 is no digit);
- crop_flip: pad-4 random crop and horizontal flip (the CIFAR standard), done on uint8 by indexing;
- resized_crop: ImageNet's training crop: a random window of 8-100% of the area with an aspect ratio in
             3/4-4/3, resized to the output side (bilinear) and mirrored for a random half;
- dli:       the DLI assessment's set: flip, rotation +-10 deg, shear +-10 deg, scale 0.8-1.2
             (one affine grid_sample for all three), colour jitter 0.2 (brightness, contrast, saturation).

Policies (`policy=`), on top of a kind's crop and mirror, per image on the uint8 batch
(raydist.data.policies): randaugment (2 ops at magnitude bin 9 of 31, torchvision's RandAugment) and
trivialaugment (1 op at a random magnitude, TrivialAugmentWide). `erase=P`: random erasing, one rectangle of
noise in a share P of the training images, on the normalized batch.

`crop=N` is for images stored larger than the model's input (an image folder stores a 224 input at 256):
evaluation takes their centre N x N (ImageNet's resize-256 / crop-224), as does training for every kind
but resized_crop, whose window is drawn from the whole stored image and resized to N x N.

`size=N` then resizes the whole normalized batch to N x N (bilinear; antialiased when shrinking), in
training and evaluation alike: ImageNet models' stride-32 stem and stages need more than 32 pixels.
Images may have 3 channels or 1 (grey data fed as one channel).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from raydist.data.policies import gather_with_border, grey, rand_augment, random_erase, trivial_augment
from raydist.data.registry import DATASETS

KINDS = ("none", "crop", "crop_flip", "resized_crop", "dli")
POLICIES = {"randaugment": rand_augment, "trivialaugment": trivial_augment}
MIRRORING = ("crop_flip", "resized_crop", "dli")  # the kinds that mirror a random half of the images


def augment_kind(augment: str, dataset: str) -> str:
    """--augment with auto resolved: ImageNet's random-resized crop for photos, CIFAR's pad-crop otherwise,
    mirrored only where a mirror keeps the class (the registry's `flips`). A policy (randaugment,
    trivialaugment) runs after auto's kind."""
    if augment not in ("auto", *POLICIES):
        return augment
    if dataset == "folder":
        return "resized_crop"
    return "crop_flip" if DATASETS[dataset].flips else "crop"


def augment_policy(augment: str) -> Optional[str]:
    """The policy --augment names (randaugment, trivialaugment), or None."""
    return augment if augment in POLICIES else None


def mirrors(augment: str, dataset: str) -> bool:
    """Whether training under --augment mirrors images: what --tta's mirrored view needs the model to know."""
    return augment_kind(augment, dataset) in MIRRORING


class Augmenter:
    def __init__(self, kind: str, *, mean, std, device="cpu", seed: int = 0, crop_padding: int = 4,
                 max_rotation_deg: float = 10.0, max_shear_deg: float = 10.0, scale=(0.8, 1.2), jitter: float = 0.2,
                 channels: int = 3, size: Optional[int] = None, crop: Optional[int] = None,
                 policy: Optional[str] = None, erase: float = 0.0):
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(KINDS)}")
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r}; known: {', '.join(POLICIES)}")
        self.kind, self.pad, self.size, self.crop = kind, crop_padding, size, crop
        self.policy, self.erase = policy, erase
        self.rotation, self.shear, self.scale, self.jitter = max_rotation_deg, max_shear_deg, scale, jitter
        self.device = torch.device(device)
        mean = torch.tensor(mean[:channels], device=self.device).view(1, channels, 1, 1)
        std = torch.tensor(std[:channels], device=self.device).view(1, channels, 1, 1)
        self.shift, self.scale_01, self.scale_u8 = -mean / std, 1 / std, 1 / (255 * std)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, images: torch.Tensor, *, train: bool) -> torch.Tensor:
        x = self._resize(self._normalized(images, train))
        if train and self.erase:
            x = random_erase(x, self.gen, self.erase)
        return x

    def _normalized(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.kind == "resized_crop":
            x = random_resized_crop_flip(images, self.crop, self.gen)  # float, still 0-255
            if self.policy is None:
                return torch.addcmul(self.shift, x, self.scale_u8)
            images = x.round_().to(torch.uint8)  # the policies' ops are uint8's, as torchvision's
        if self.crop is not None and not (train and self.kind == "resized_crop"):
            images = centre_crop(images, self.crop)
        if train and self.kind in ("crop", "crop_flip"):
            images = random_crop_flip(images, self.pad, self.gen, flip=self.kind == "crop_flip")
        if train and self.policy is not None:
            images = POLICIES[self.policy](images, self.gen)
        if train and self.kind == "dli":
            images = random_affine_flip(images, self.rotation, self.shear, self.scale, self.gen)
            x = colour_jitter(images.float().div_(255), self.jitter, self.gen)
            return torch.addcmul(self.shift, x, self.scale_01)
        # (x / 255 - mean) / std as one multiply-add
        return torch.addcmul(self.shift, images.float(), self.scale_u8)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None or x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=self.size < min(x.shape[-2:]))

def centre_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    """The centre side x side pixels (a view; images smaller than that are returned as they are)."""
    h, w = images.shape[-2:]
    if side >= h and side >= w:
        return images
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return images[..., top:top + side, left:left + side]


def random_resized_crop_flip(images: torch.Tensor, side: Optional[int], gen: torch.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip for a whole batch, as one affine grid_sample:
    per image a window of `scale` of the area and an aspect ratio drawn log-uniformly from `ratio`, resized
    (bilinear) to side x side (default: the images' own size); float32 out, on the 0-255 scale of the input.
    Where torchvision redraws a window that does not fit (10 tries, then a centre crop), each side is
    clamped to the image instead."""
    n, c, h, w = images.shape
    out_h, out_w = (side, side) if side else (h, w)
    device = images.device
    area = uniform(n, scale[0], scale[1], gen).to(device) * (h * w)
    aspect = torch.exp(uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen).to(device))
    crop_w = torch.sqrt(area * aspect).clamp(1, w)
    crop_h = torch.sqrt(area / aspect).clamp(1, h)
    x0 = torch.rand(n, generator=gen, device=gen.device).to(device) * (w - crop_w)
    y0 = torch.rand(n, generator=gen, device=gen.device).to(device) * (h - crop_h)
    mirror = torch.where(torch.rand(n, generator=gen, device=gen.device).to(device) < 0.5, -1.0, 1.0)
    # affine_grid maps output coordinates in [-1, 1] to input ones: scale by the window's share of the
    # image, move to its centre.
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = crop_w / w * mirror
    theta[:, 0, 2] = (x0 + crop_w / 2) / w * 2 - 1
    theta[:, 1, 1] = crop_h / h
    theta[:, 1, 2] = (y0 + crop_h / 2) / h * 2 - 1
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device) * (high - low) + low


def gather_pixels(images: torch.Tensor, src_y: torch.Tensor, src_x: torch.Tensor) -> torch.Tensor:
    """out[n, :, i, j] = images[n, :, src_y[n, i, j], src_x[n, i, j]], zero where the source is outside.

    Every geometric transform here (crop, flip, rotation, shear, zoom) is nearest-neighbour, so each is one
    gather on uint8. Coordinates are whole numbers held as float32 (cheaper than int64 on CPU); a source
    outside the image is clamped to the zero border the policies' gather reads."""
    h, w = images.shape[-2:]
    src_y, src_x = torch.broadcast_tensors(src_y, src_x)
    return gather_with_border(images, src_y.clamp(-1, h), src_x.clamp(-1, w))


def random_crop_flip(images: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """A random H x W window of the image zero-padded by `pad`, mirrored left-right for a random half
    (`flip`)."""
    n, _, h, w = images.shape
    device = images.device
    dy = torch.randint(-pad, pad + 1, (n, 1, 1), generator=gen, device=gen.device).to(device, torch.float32)
    dx = torch.randint(-pad, pad + 1, (n, 1, 1), generator=gen, device=gen.device).to(device, torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    if flip:
        mirror = (torch.rand(n, 1, 1, generator=gen, device=gen.device) < 0.5).to(device)
        cols = torch.where(mirror, w - 1 - cols, cols)
    rows = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    return gather_pixels(images, rows + dy, cols + dx)


def random_affine_flip(images: torch.Tensor, max_rot_deg: float, max_shear_deg: float, scale,
                       gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half, then rotate, shear (along x) and zoom every image about its centre: one gather."""
    n, _, h, w = images.shape
    device = images.device
    angle = uniform(n, -max_rot_deg, max_rot_deg, gen).to(device) * (math.pi / 180)
    shear = uniform(n, -max_shear_deg, max_shear_deg, gen).to(device) * (math.pi / 180)
    zoom = uniform(n, scale[0], scale[1], gen).to(device)
    mirror = torch.where(torch.rand(n, generator=gen, device=gen.device).to(device) < 0.5, -1.0, 1.0)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # forward map = zoom * rotation @ shear @ mirror:  [[c, c*t - s], [s, s*t + c]] @ diag(m, 1)
    a, b = cos * zoom * mirror, (cos * tan - sin) * zoom
    c, d = sin * zoom * mirror, (sin * tan + cos) * zoom
    det = a * d - b * c
    # Each output pixel reads from the inverse map of its position (centred coordinates).
    ys = torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2
    inv = torch.stack([d, -b, -c, a], 1) / det[:, None]  # n x 4
    yy, xx = ys.view(1, h, 1), xs.view(1, 1, w)
    src_x = inv[:, 0, None, None] * xx + inv[:, 1, None, None] * yy + (w - 1) / 2
    src_y = inv[:, 2, None, None] * xx + inv[:, 3, None, None] * yy + (h - 1) / 2
    return gather_pixels(images, src_y.round_(), src_x.round_())


def colour_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn from [1 - strength, 1 + strength] per image (in place)."""
    n = x.shape[0]
    brightness, contrast, saturation = uniform(3 * n, 1 - strength, 1 + strength, gen).to(x.device).view(3, n, 1, 1, 1)
    x.mul_(brightness).clamp_(0, 1)
    # contrast blends with the image's mean grey level, saturation with each pixel's grey level
    mean_grey = grey(x.mean((2, 3), keepdim=True))
    x.mul_(contrast).add_(mean_grey * (1 - contrast)).clamp_(0, 1)
    level = grey(x)  # taken before the multiply below changes x in place
    return x.mul_(saturation).add_(level.mul_(1 - saturation)).clamp_(0, 1)
