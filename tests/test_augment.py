"""Batched augmentation: shapes, dtypes, value ranges, and that each transform is what it claims."""

import pytest
import torch
import torch.nn.functional as F

from raydist.data.augment import KINDS, Augmenter, colour_jitter, random_affine_flip, random_crop_flip


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
    assert torch.allclose(out, expected, atol=1e-5)


def test_crop_flip_is_a_window_of_the_padded_image_mirrored_for_about_half():
    images = _images(n=200)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (4, 4, 4, 4))
    offsets, mirrored = set(), 0
    for o, p in zip(out, padded):
        windows = [(dy, dx, m) for dy in range(9) for dx in range(9) for m in (False, True)
                   if torch.equal(o.flip(2) if m else o, p[:, dy:dy + 32, dx:dx + 32])]
        assert windows, "output is not a (mirrored) window of the zero-padded image"
        offsets.add(windows[0][:2])
        mirrored += windows[0][2]
    assert len(offsets) > 30  # offsets really vary per image
    assert 60 < mirrored < 140


def test_affine_with_no_rotation_shear_or_zoom_is_identity_or_a_mirror():
    images = _images(n=100)
    out = random_affine_flip(images, 0.0, 0.0, (1.0, 1.0), torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, images)]
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and 25 < sum(mirrored) < 75


def test_affine_keeps_the_centre_and_moves_the_rest():
    x = torch.zeros(64, 3, 33, 33, dtype=torch.uint8)
    x[:, :, 16, 16] = 255  # the centre pixel stays put under rotation, shear and zoom about the centre
    x[:, :, 16, 28] = 255  # an off-centre dot moves
    out = random_affine_flip(x, 10.0, 10.0, (0.8, 1.2), torch.Generator().manual_seed(0))
    assert (out[:, :, 16, 16] == 255).all()
    assert (out[:, 0, 16, 28] == 0).sum() > 32 and (out[:, 0, 16, 4] == 0).sum() > 32
    assert (out.flatten(1).float().sum(1) > 0).all()


def test_affine_zoom_in_leaves_no_border_and_zoom_out_leaves_one():
    ones = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    zoomed_in = random_affine_flip(ones, 0.0, 0.0, (1.2, 1.2), torch.Generator().manual_seed(0))
    zoomed_out = random_affine_flip(ones, 0.0, 0.0, (0.8, 0.8), torch.Generator().manual_seed(0))
    assert (zoomed_in == 255).all()
    assert (zoomed_out[:, :, 0, :] == 0).all() and (zoomed_out[:, :, 16, 16] == 255).all()


def test_colour_jitter_keeps_range_and_zero_strength_is_identity():
    x = torch.rand(8, 3, 16, 16)
    assert torch.allclose(colour_jitter(x.clone(), 0.0, torch.Generator().manual_seed(0)), x, atol=1e-6)
    out = colour_jitter(x.clone(), 0.2, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)


def test_same_seed_same_augmentation():
    images = _images()
    a = Augmenter("dli", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)(images, train=True)
    b = Augmenter("dli", mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)(images, train=True)
    assert torch.equal(a, b)


def test_colour_jitter_matches_torchvisions_brightness_contrast_and_saturation():
    import torchvision.transforms.functional as TF

    from raydist.data.augment import uniform

    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    x[0] = 0.5  # a uniform grey image: saturation must leave it grey (the old code darkened it)
    strength = 0.4
    out = colour_jitter(x.clone(), strength, torch.Generator().manual_seed(5))
    # the same factors, drawn from the same generator state, applied one by one as torchvision does
    factors = uniform(3 * len(x), 1 - strength, 1 + strength, torch.Generator().manual_seed(5)).view(3, -1)
    for i, image in enumerate(x):
        brightness, contrast, saturation = factors[:, i].tolist()
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, brightness), contrast),
                                        saturation)
        assert torch.allclose(out[i], expected, atol=1e-5), (i, (out[i] - expected).abs().max())
    # (torchvision's grey weights sum to 0.9999, hence the looser bound)
    assert torch.allclose(out[0], torch.full_like(out[0], 0.5 * factors[0, 0].item()), atol=2e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_one_channel_images_and_a_resize_come_out_normalized_at_the_asked_size(kind):
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    aug = Augmenter(kind, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0, channels=1, size=64)
    out = aug(images, train=True)
    assert out.shape == (6, 1, 64, 64) and out.dtype == torch.float32
    evaluated = aug(images, train=False)
    # evaluation: the normalized image, resized (bilinear) and nothing else
    expected = torch.nn.functional.interpolate((images.float() / 255 - 0.5) / 0.25, size=(64, 64), mode="bilinear",
                                               align_corners=False)
    assert torch.allclose(evaluated, expected, atol=1e-5)
    assert Augmenter("none", mean=(0.5,) * 3, std=(0.25,) * 3, size=16)(images.expand(-1, 3, -1, -1),
                                                                           train=False).shape == (6, 3, 16, 16)
