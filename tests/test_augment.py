"""Batched augmentation: shapes, dtypes, value ranges, and that each transform is what it claims."""

import pytest
import torch
import torch.nn.functional as F

from raydist.augment import KINDS, Augmenter, colour_jitter, flip, random_affine, random_crop


def _images(n=16, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_dtype_and_normalization(kind):
    images = _images()
    aug = Augmenter(kind, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=0)
    out = aug(images, train=True)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= -2.0 - 1e-6 and out.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 for x in [0, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_eval_only_normalizes(kind):
    images = _images()
    out = Augmenter(kind, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), seed=0)(images, train=False)
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(out, expected)


def test_flip_is_a_flip_of_about_half():
    images = _images(n=400)
    out = flip(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 150 < sum(flipped) < 250


def test_crop_is_a_window_of_the_padded_image():
    images = _images(n=32)
    out = random_crop(images, 4, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (4, 4, 4, 4))
    offsets = set()
    for o, p in zip(out, padded):
        matches = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(o, p[:, dy:dy + 32, dx:dx + 32])]
        assert matches, "crop is not a window of the zero-padded image"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets really vary per image


def test_affine_with_no_rotation_shear_or_zoom_is_identity():
    x = torch.rand(4, 3, 32, 32)
    out = random_affine(x, 0.0, 0.0, (1.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_affine_rotation_moves_pixels_but_keeps_the_centre():
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 16, 16] = 1.0  # a dot at the centre stays there under rotation, shear and zoom about the centre
    x[:, :, 16, 28] = 1.0  # an off-centre dot moves
    out = random_affine(x, 10.0, 10.0, (0.8, 1.2), torch.Generator().manual_seed(0))
    assert (out[:, :, 16, 16] > 0.5).all()
    assert (out[:, :, 16, 28] < 0.9).sum() > 32


def test_colour_jitter_keeps_range_and_zero_strength_is_identity():
    x = torch.rand(8, 3, 16, 16)
    assert torch.allclose(colour_jitter(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-6)
    out = colour_jitter(x, 0.2, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)


def test_same_seed_same_augmentation():
    images = _images()
    a = Augmenter("dli", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)(images, train=True)
    b = Augmenter("dli", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)(images, train=True)
    assert torch.equal(a, b)
