"""Batched RandAugment / TrivialAugmentWide / random erasing: each op against torchvision's own per-image
kernel at the same magnitude, the policies' draws (per image, seeded, uniform), and random_erase's rectangles."""

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from raydist.data import policies
from raydist.data.policies import OPS, SIGNED, apply_op, magnitudes, rand_augment, random_erase, trivial_augment

GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
# Color, Contrast and Sharpness reproduce torchvision's fused multiply-add with addcmul: exact on every build
# we ran (x86, AVX2 and AVX-512), but a kernel that rounded the product first could be 1 off in rare pixels.
BLENDS = {"Color", "Contrast", "Sharpness"}


def _images(n, c, h, w, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen)
    images[::3] = images[::3] // 4 + 100  # low-contrast images, where AutoContrast and Equalize do something
    images[1::5, :, :, :] = images[1::5, :1]  # some grey ones (equal channels)
    return images


def _torchvision(img, name, m):
    """The op as torchvision.transforms.v2's RandAugment / TrivialAugmentWide apply it to one image."""
    nearest = v2.InterpolationMode.NEAREST
    if name == "ShearX":
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0],
                         interpolation=nearest, center=[0, 0])
    if name == "ShearY":
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))],
                         interpolation=nearest, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        move = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return TF.affine(img, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    kernels = {"Identity": lambda: img, "Rotate": lambda: TF.rotate(img, m, interpolation=nearest),
               "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
               "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
               "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
               "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m), "Posterize": lambda: TF.posterize(img, int(m)),
               "Solarize": lambda: TF.solarize(img, 255.0 * m), "AutoContrast": lambda: TF.autocontrast(img),
               "Equalize": lambda: TF.equalize(img)}
    return kernels[name]()


def _assert_close_to_torchvision(ours, ref, names):
    """Per op kind: geometric ops may move a few pixels (see below), blends may be 1 off, the rest exact."""
    for name in set(names):
        rows = torch.tensor([n == name for n in names])
        differ = (ours[rows] != ref[rows]).any(1)  # pixels (any channel) that differ
        if name in GEOMETRIC:
            # Nearest sampling: a source coordinate that lands on a rounding boundary (x.5 up to float32
            # error) can round the other way, and sin/cos/tan here (torch, float64) and in torchvision
            # (Python's math) may differ in the last bit: a rare pixel reads its neighbour's value.
            assert differ.float().mean() <= 0.005, name
        elif name in BLENDS:
            assert (ours[rows].int() - ref[rows].int()).abs().max() <= 1, name
            assert differ.float().mean() <= 0.001, name
        else:
            assert torch.equal(ours[rows], ref[rows]), name


@pytest.mark.parametrize("wide", [False, True], ids=["randaugment", "trivialaugment"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 31, 45)], ids=["rgb32", "grey28", "rgb31x45"])
@pytest.mark.parametrize("op", range(len(OPS)), ids=OPS)
def test_each_op_matches_torchvision_at_every_magnitude(op, shape, wide):
    """Every bin of the table, both signs where the op has one; one image per (bin, sign)."""
    table = magnitudes(31, shape[1], shape[2], wide=wide)[op]
    mags = torch.cat([table, -table]) if SIGNED[op] else table
    images = _images(len(mags), *shape)
    ours = apply_op(images, torch.full((len(mags),), op), mags)
    ref = torch.stack([_torchvision(img, OPS[op], float(m)) for img, m in zip(images, mags)])
    assert ours.shape == images.shape and ours.dtype == torch.uint8
    _assert_close_to_torchvision(ours, ref, [OPS[op]] * len(mags))


def test_the_magnitude_tables_are_torchvisions():
    for policy, wide in ((v2.RandAugment, False), (v2.TrivialAugmentWide, True)):
        ours = magnitudes(31, 24, 40, wide=wide)
        for i, name in enumerate(OPS):
            theirs, signed = policy._AUGMENTATION_SPACE[name]
            table = theirs(31, 24, 40)
            assert torch.equal(ours[i], torch.zeros(31) if table is None else table.float()), (policy, name)
            assert SIGNED[i] == signed, name


def _replay_draws(policy, n, seed, num_ops=2):
    """The (op, signed magnitude) per layer and image that rand_augment / trivial_augment draw from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    if policy == "rand":
        ops = torch.randint(len(OPS), (num_ops, n), generator=gen)
        negative = torch.rand(num_ops, n, generator=gen) < 0.5
        level = magnitudes(31, 32, 32)[:, 9]
        return [(ops[i], torch.where(torch.tensor(SIGNED)[ops[i]] & negative[i], -level[ops[i]], level[ops[i]]))
                for i in range(num_ops)]
    op = torch.randint(len(OPS), (n,), generator=gen)
    level = torch.randint(31, (n,), generator=gen)
    negative = torch.rand(n, generator=gen) < 0.5
    mag = magnitudes(31, 32, 32, wide=True)[op, level]
    return [(op, torch.where(torch.tensor(SIGNED)[op] & negative, -mag, mag))]


@pytest.mark.parametrize("policy", ["rand", "trivial"])
def test_a_whole_policy_is_torchvisions_ops_in_sequence_with_each_images_own_draws(policy):
    images = _images(96, 3, 32, 32)
    gen = torch.Generator().manual_seed(5)
    ours = rand_augment(images, gen) if policy == "rand" else trivial_augment(images, gen)
    ref = images.clone()
    for ops, mags in _replay_draws(policy, len(images), seed=5):
        ref = torch.stack([_torchvision(img, OPS[o], float(m)) for img, o, m in zip(ref, ops, mags)])
    differ = (ours != ref).any(1).float().mean()
    assert differ <= 0.002  # only the geometric rounding boundaries of the test above, if any


def test_every_image_draws_its_own_ops():
    images = _images(1, 3, 32, 32).expand(64, 3, 32, 32)
    for out in (rand_augment(images, torch.Generator().manual_seed(0)),
                trivial_augment(images, torch.Generator().manual_seed(0))):
        distinct = {bytes(img.flatten().tolist()) for img in out}
        assert len(distinct) >= 40  # per-batch draws would give 1; repeats come from equal draws (2 ops of 14)


def test_same_seed_same_batch_other_seed_other_batch():
    images = _images(32, 3, 32, 32)
    for policy in (rand_augment, trivial_augment):
        a, b = (policy(images, torch.Generator().manual_seed(7)) for _ in range(2))
        c = policy(images, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.equal(images, _images(32, 3, 32, 32))  # the input is left alone


def test_ops_signs_and_bins_are_drawn_uniformly(monkeypatch):
    seen = []
    real = policies._apply_

    def spy(out, op, magnitude):
        seen.append((op.clone(), magnitude.clone()))
        return real(out, op, magnitude)

    monkeypatch.setattr(policies, "_apply_", spy)
    images = torch.zeros(7000, 1, 4, 4, dtype=torch.uint8)
    rand_augment(images, torch.Generator().manual_seed(0), num_ops=2)
    trivial_augment(images, torch.Generator().manual_seed(1))
    op = torch.cat([o for o, _ in seen])
    mag = torch.cat([m for _, m in seen])
    share = torch.bincount(op, minlength=len(OPS)).float() / len(op)
    assert ((share - 1 / 14).abs() < 0.2 / 14).all(), share  # 21000 draws: 1/14 +- 20%
    signed = torch.tensor(SIGNED)[op] & (mag != 0)
    assert abs((mag[signed] < 0).float().mean() - 0.5) < 0.03
    _, trivial_mag = seen[-1]
    rotations = trivial_mag[seen[-1][0] == OPS.index("Rotate")].abs()
    assert len(rotations.unique()) >= 28  # TrivialAugment's bin is per image too (31 bins, ~500 draws)


@pytest.mark.parametrize("policy", [rand_augment, trivial_augment])
def test_shape_dtype_and_device_are_kept_for_any_layout_and_size(policy):
    for images in (_images(8, 3, 32, 32), _images(8, 1, 28, 28),
                   _images(8, 3, 24, 40).contiguous(memory_format=torch.channels_last), _images(1, 3, 2, 2)):
        out = policy(images, torch.Generator().manual_seed(0))
        assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device


def _erased(before, after):
    return (before != after).any(1)  # N x H x W: pixels the noise replaced (noise is never exactly the pixel)


def test_random_erase_with_prob_0_changes_nothing():
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(random_erase(x.clone(), torch.Generator().manual_seed(0), 0.0), x)


def test_random_erase_with_prob_1_erases_one_rectangle_per_image_of_the_scale():
    x = torch.zeros(200, 3, 64, 48)
    erased = _erased(x, random_erase(x.clone(), torch.Generator().manual_seed(0), 1.0))
    for mask in erased:
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        height, width = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width  # one block each way
        assert mask.sum() == height * width  # and all of it: an axis-aligned rectangle
        # the area share is in (0.02, 1/3), give or take rounding each side to whole pixels
        slack = (height + width) / 2 / mask.numel()
        assert 0.02 - slack <= mask.float().mean() <= 1 / 3 + slack
    noise = random_erase(x.clone(), torch.Generator().manual_seed(0), 1.0)[erased.unsqueeze(1).expand_as(x)]
    assert abs(noise.mean()) < 0.02 and abs(noise.var() - 1) < 0.03  # standard normal, per pixel


def test_random_erase_with_prob_half_erases_about_half_and_is_seeded():
    x = torch.randn(1000, 1, 16, 16)
    out = random_erase(x.clone(), torch.Generator().manual_seed(3), 0.5)
    assert 0.43 < _erased(x, out).flatten(1).any(1).float().mean() < 0.57
    assert torch.equal(out, random_erase(x.clone(), torch.Generator().manual_seed(3), 0.5))


@pytest.mark.parametrize("channels", [3, 1])
def test_the_gpus_masked_pass_gives_the_grouped_passs_images(channels):
    # On a GPU every op runs on the whole batch and each image keeps its own op's result (no host read of
    # the op counts); the same images as the CPU's grouping, checked here on the CPU, every op and sign.
    images = _images(2 * len(OPS) * 3, channels, 20, 24)
    op = torch.arange(len(OPS)).repeat_interleave(6)
    level = magnitudes(31, 20, 24)[op, 9]
    signed = torch.where(torch.arange(len(op)) % 2 == 0, -level, level)
    grouped = policies._apply_(images.clone(), op, signed)
    masked = policies._apply_masked_(images.clone(), op, signed)
    assert torch.equal(grouped, masked)
