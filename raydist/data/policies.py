"""RandAugment, TrivialAugment (wide) and random erasing for whole batches on the worker's device.

    out = rand_augment(images_uint8, gen)            # N x C x H x W uint8 in, same shape and device out
    out = trivial_augment(images_uint8, gen)
    x = random_erase(normalized_float, gen, prob=0.25)

torchvision runs these policies one image at a time (or, in v2 on a batch, with ONE draw for the whole
batch). Here every image draws its own op, sign (and, for TrivialAugment, magnitude bin), as torchvision's
per-image path does, and each op kind is one batched pass over the images that drew it: the five geometric
ops of a layer are one gather (a per-image inverse affine matrix), each colour op one pass over its images.

What matches torchvision (transforms.v2, uint8 tensors; the tests compare op by op):
- the op set (Identity, ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color, Contrast,
  Sharpness, Posterize, Solarize, AutoContrast, Equalize), the magnitude tables of v2's RandAugment and
  TrivialAugmentWide, random signs, `num_ops` ops in sequence with a fixed bin (RandAugment);
- the ops' arithmetic: nearest sampling with fill 0; shears about the top-left corner (torchvision passes
  center=[0, 0], as in the AutoAugment paper), rotation and translation about the centre; translation by
  int(magnitude) pixels; blends rounded the way its float32 kernels round (they fuse multiply-add), the
  floored grey of Color and Contrast, Sharpness's 3x3 [[1,1,1],[1,5,1],[1,1,1]]/13 with border pixels
  kept, Solarize's threshold as 255 x v2's fraction (v1's table, linspace(255, 0), puts three of
  TrivialAugment's 31 thresholds a hair lower: 119, 102 and 51 themselves are inverted there, not in v2),
  PIL's Equalize lookup table as torchvision computes it. Colour ops are bit-exact on this build (the tests
  allow the blends 1 of 255 where another CPU build's fused multiply-add might round otherwise). So are the geometric
  ops, whose float32 sampling coordinates follow torchvision's step by step, but for a rare row: sin, cos
  and tan here (torch, float64) may differ from Python's math in the last bit, and where that moves a
  float32 matrix entry across a rounding midpoint, pixels on an x.5 boundary read their neighbour.
Where it differs, deliberately:
- the random numbers: all drawn from `gen` for the whole batch at once (one stream, seeded), so the same
  seed gives the same batch but not the images torchvision's global-RNG draws would give;
- only fill 0 and nearest interpolation (the defaults), and no Invert (neither policy uses it);
- grey images (1 channel): Color is the identity, as in torchvision.
`random_erase` is timm's RandomErasing in "pixel" mode for a normalized batch: one rectangle per chosen
image, filled with standard normal noise; a rectangle that would not fit is clamped to the image (as
augment.random_resized_crop clamps) instead of redrawn up to 10 times.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE = 1, 2, 3, 4, 5  # the geometric ops: one gather for all
SIGNED = (False, True, True, True, True, True, True, True, True, True, False, False, False, False)
GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, exactly as torchvision's rgb_to_grayscale


def magnitudes(bins: int, height: int, width: int, *, wide: bool = False, device=None) -> torch.Tensor:
    """len(OPS) x bins float32: v2 RandAugment's magnitude per op and bin, or TrivialAugmentWide's (`wide`).
    Units as apply_op reads them: shear factor, pixels, degrees, factor - 1, bits, fraction of 255.
    Cached per device (a copy to a GPU per batch would wait for it): read it, do not write to it."""
    return _magnitudes(bins, height, width, wide, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)  # some 30 small tensor ops: once per size, policy and device, not per batch
def _magnitudes(bins: int, height: int, width: int, wide: bool, device: torch.device) -> torch.Tensor:
    def lin(end: float) -> torch.Tensor:
        return torch.linspace(0.0, end, bins, dtype=torch.float32)

    colour, shear = (0.99, 0.99) if wide else (0.9, 0.3)
    tx, ty = (32.0, 32.0) if wide else (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    posterize = (8 - torch.arange(bins) / ((bins - 1) / (6 if wide else 4))).round()
    zero = torch.zeros(bins)
    return torch.stack([zero, lin(shear), lin(shear), lin(tx), lin(ty), lin(135.0 if wide else 30.0),
                        lin(colour), lin(colour), lin(colour), lin(colour), posterize,
                        torch.linspace(1.0, 0.0, bins, dtype=torch.float32), zero, zero]).to(device)


def rand_augment(images: torch.Tensor, gen: torch.Generator, *, num_ops: int = 2, magnitude: int = 9,
                 bins: int = 31) -> torch.Tensor:
    """torchvision's RandAugment per image: `num_ops` ops in sequence, each drawn uniformly per image, at
    magnitude bin `magnitude` of `bins`, with a random sign where the op has one."""
    if not 0 <= magnitude < bins:
        raise ValueError(f"magnitude {magnitude} is not a bin of {bins}")
    n, _, h, w = images.shape
    level = magnitudes(bins, h, w, device=images.device)[:, magnitude]
    ops = torch.randint(len(OPS), (num_ops, n), generator=gen, device=gen.device).to(images.device)
    negative = (torch.rand(num_ops, n, generator=gen, device=gen.device) < 0.5).to(images.device)
    out = images.clone(memory_format=torch.contiguous_format)
    for layer in range(num_ops):  # the layers are sequential: each reads the one before
        _apply_(out, ops[layer], _signed(level[ops[layer]], ops[layer], negative[layer]))
    return out


def trivial_augment(images: torch.Tensor, gen: torch.Generator, *, bins: int = 31) -> torch.Tensor:
    """torchvision's TrivialAugmentWide per image: one op, one magnitude bin and one sign per image."""
    n, _, h, w = images.shape
    op = torch.randint(len(OPS), (n,), generator=gen, device=gen.device).to(images.device)
    level = torch.randint(bins, (n,), generator=gen, device=gen.device).to(images.device)
    negative = (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(images.device)
    table = magnitudes(bins, h, w, wide=True, device=images.device)
    out = images.clone(memory_format=torch.contiguous_format)
    return _apply_(out, op, _signed(table[op, level], op, negative))


def _signed(magnitude: torch.Tensor, op: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    signed = (op >= SHEAR_X) & (op <= OPS.index("Sharpness"))  # SIGNED: ops 1 to 9
    return torch.where(signed & negative, -magnitude, magnitude)


def apply_op(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Image i gets OPS[op[i]] at the signed magnitude[i] (units of `magnitudes`); a new uint8 tensor."""
    out = images.clone(memory_format=torch.contiguous_format)
    return _apply_(out, op.to(images.device), magnitude.to(images.device, torch.float32))


def _apply_(out: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """In place. Every image gets exactly one op, so the passes touch disjoint images and their order is free.
    On the CPU each op runs on the images that drew it (grouping them reads the counts: free there); on a
    GPU, where that read would stall the host every batch, every op runs on the whole batch and each image
    keeps its own op's result (_apply_masked_: the same output, more arithmetic, no sync)."""
    if out.device.type != "cpu":
        return _apply_masked_(out, op, magnitude)
    rows = _as_rows(out)
    # The images grouped by op: one sort and one count (one device sync) instead of a mask per op.
    order = op.argsort(stable=True)
    counts = torch.bincount(op, minlength=len(OPS)).tolist()
    starts = [sum(counts[:k]) for k in range(len(OPS) + 1)]
    moved = order[starts[SHEAR_X]:starts[ROTATE + 1]]  # ops 1-5 sit together in the sorted order
    if moved.numel():
        rows.index_copy_(0, moved, _as_rows(_affine(out.index_select(0, moved), op[moved], magnitude[moved])))
    for kind, colour_op in COLOUR_OPS.items():
        idx = order[starts[kind]:starts[kind + 1]]
        if idx.numel():
            result = colour_op(out.index_select(0, idx), magnitude[idx].view(-1, 1, 1, 1))
            rows.index_copy_(0, idx, _as_rows(result.contiguous()))
    return out


def _apply_masked_(out: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """_apply_ with no host sync: the geometric ops as one gather over the whole batch (an image with
    another op gets the identity's matrix, which reads every pixel from itself), then each colour op over
    the whole batch, kept where the image drew it."""
    geometric = (op >= SHEAR_X) & (op <= ROTATE)
    affine_op = torch.where(geometric, op, torch.zeros_like(op))  # Identity: not moved
    result = _affine(out, affine_op, torch.where(geometric, magnitude, torch.zeros_like(magnitude)))
    out.copy_(torch.where(geometric.view(-1, 1, 1, 1), result, out))
    level = magnitude.view(-1, 1, 1, 1)
    source = out.clone()  # every op reads the image as the geometric pass left it
    for kind, colour_op in COLOUR_OPS.items():
        out.copy_(torch.where((op == kind).view(-1, 1, 1, 1), colour_op(source, level), out))
    return out


def _as_rows(images: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 batch as one row per image, of int32 where the size allows: index_copy_ moves
    elements one by one, so four bytes at a time is about ten times faster at 224 px."""
    rows = images.view(len(images), -1)
    return rows.view(torch.int32) if rows.shape[1] % 4 == 0 else rows


def _affine(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Shear, translate or rotate each image (its own op), nearest, fill 0: one gather.

    The inverse matrix (output pixel -> source, in coordinates centred on the image) is built as
    torchvision's _get_inverse_affine_matrix builds it, in float64, for each op's arguments: shear by the
    angle atan(m) about the top-left corner (center=[0, 0]), translation by int(m) pixels, rotation by m
    degrees about the centre. The sampling coordinates then follow its float32 path (affine_grid's
    normalisation, grid_sample's un-normalisation and round-half-even), so pixels land where its do."""
    n, _, h, w = images.shape
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    # torchvision goes to degrees and back (math.degrees, math.radians): kept for the last bits
    shear = torch.atan(m) * (180.0 / math.pi) * (math.pi / 180.0)
    rot = -torch.remainder(m, 360.0) * (math.pi / 180.0)  # rotate() takes angle % 360, the matrix -angle
    cos, sin = torch.cos(rot), torch.sin(rot)
    is_rot, is_sx, is_sy = op == ROTATE, op == SHEAR_X, op == SHEAR_Y
    m00 = torch.where(is_rot, cos, one)
    m01 = torch.where(is_sx, torch.tan(shear), torch.where(is_rot, sin, zero))
    m10 = torch.where(is_sy, torch.sin(shear) / torch.cos(shear), torch.where(is_rot, -sin, zero))
    m11 = m00
    # Shears turn about the corner (-w/2, -h/2); translation moves by -int(m).
    cx, cy = -w * 0.5, -h * 0.5
    t0 = torch.where(is_sx, (cx - cx) - m01 * cy, torch.where(op == TRANSLATE_X, -m.trunc(), zero))
    t1 = torch.where(is_sy, (cy - m10 * cx) - cy, torch.where(op == TRANSLATE_Y, -m.trunc(), zero))
    theta = torch.stack([m00, m01, t0, m10, m11, t1], 1).float().view(n, 2, 3)
    theta[:, 0] /= 0.5 * w  # by Python numbers: a tensor made for it would be a copy the GPU waits for
    theta[:, 1] /= 0.5 * h
    xs = torch.arange(w, device=images.device, dtype=torch.float32).sub_((w - 1) * 0.5).view(1, 1, w)
    ys = torch.arange(h, device=images.device, dtype=torch.float32).sub_((h - 1) * 0.5).view(1, h, 1)
    src = []
    for row, size in ((0, w), (1, h)):
        t = theta[:, row, :, None, None]
        grid = (xs * t[:, 0] + ys * t[:, 1]).add_(t[:, 2])  # in [-1, 1] across the image
        # grid_sample's un-normalisation (align_corners=False) and nearest pixel (round half to even);
        # then every source outside the image becomes -1 or `size`: the zero border gather_with_border adds
        src.append(grid.add_(1).mul_(size / 2).sub_(0.5).round_().clamp_(-1, size))
    return gather_with_border(images, src[1], src[0])


def gather_with_border(images: torch.Tensor, src_y: torch.Tensor, src_x: torch.Tensor) -> torch.Tensor:
    """out[n, :, i, j] = images[n, :, src_y[n, i, j], src_x[n, i, j]] for whole-number coordinates in
    [-1, H] x [-1, W]; -1 and H (W) read a zero border, so no mask pass is needed."""
    n, c, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1)).reshape(n, c, (h + 2) * (w + 2))
    flat = src_y.add_(1).mul_(w + 2).add_(src_x).add_(1).long().reshape(n, 1, h * w)  # overwrites src_y
    return padded.gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


# -- colour ops: (images k x C x H x W uint8, signed magnitude k x 1 x 1 x 1 float32) -> uint8. Each makes
# one float32 copy and works on it in place: at 224 px a fresh batch-sized buffer costs more than the maths.
def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    factor = (1 + m.double()).float()  # torchvision: 1.0 + magnitude in Python, float32 in the kernel
    return x.float().mul_(factor).clamp_(0, 255).to(torch.uint8)


def _blend(x: torch.Tensor, other: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x * f + other * (1 - f), f = 1 + m, rounded as torchvision's x.mul(f).add_(other, alpha=1 - f).
    Its add kernel fuses the multiply-add (one rounding); so does addcmul's, which takes a per-image
    factor (tests/test_policies.py holds both to that)."""
    f = 1 + m.double()
    out = x.float().mul_(f.float())
    return out.addcmul_(other, (1 - f).float()).clamp_(0, 255).to(torch.uint8)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's grey level, N x 1 x H x W float, with the luma weights of torchvision's rgb_to_grayscale;
    a grey image's own channel, copied (callers change it in place). raydist.data.augment's colour jitter
    uses it too."""
    if x.shape[1] == 1:
        return x.clone() if x.is_floating_point() else x.float()
    r, g, b = x.unbind(1)
    return r.mul(GREY[0]).add_(g, alpha=GREY[1]).add_(b, alpha=GREY[2]).unsqueeze(1)


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(x, grey(x).floor_(), m)  # torchvision's grey, floored


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    level = grey(x).floor_()  # a whole number already for a grey image
    return _blend(x, level.mean((1, 2, 3), keepdim=True), m)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with the 3x3 [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 smoothing, border pixels kept."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    out = x.float()
    # The 3x3 sum as shifted adds: whole numbers, exact in float32, and ten times faster than a grouped
    # conv2d on CPU. Integer sums / 13 are never within 1/26 of a half, so their rounding is exactly
    # that of torchvision's float32 convolution.
    rows = out[..., :, :-2] + out[..., :, 1:-1]
    rows += out[..., :, 2:]
    blurred = rows[..., :-2, :] + rows[..., 1:-1, :]
    blurred += rows[..., 2:, :]
    inner = out[..., 1:-1, 1:-1]
    blurred.add_(inner, alpha=4).div_(13).round_().sub_(inner)
    inner.addcmul_(blurred, (1 - (1 + m.double())).float())  # torchvision's alpha, 1 - factor, fused
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    keep = m.long().clamp(0, 8)
    return x & ((255 << (8 - keep)) & 255).to(torch.uint8)  # the top `keep` bits


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Invert the pixels >= 255 x m; for whole-number pixels that is >= the threshold rounded up, so the
    comparison stays in uint8."""
    threshold = (255 * m.double()).float().ceil_().clamp_(0, 255).to(torch.uint8)
    return torch.where(x >= threshold, x.bitwise_not(), x)


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to 0-255 (a flat channel kept), torchvision's float32 steps one by one."""
    xf = x.float()
    low, high = xf.amin((2, 3), keepdim=True), xf.amax((2, 3), keepdim=True)
    flat = high == low
    inv_scale = (high - low).mul_(1.0 / 255)
    low, inv_scale = low.masked_fill_(flat, 0.0), inv_scale.masked_fill_(flat, 1.0)
    return xf.sub_(low).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalization per image and channel, as torchvision's equalize computes it, for all
    channels of all images at once: values offset by 256 per channel, one histogram, one table lookup
    (int32 indices: half the memory of int64 at 224 px)."""
    k, c, h, w = x.shape
    offset = torch.arange(0, k * c * 256, 256, device=x.device, dtype=torch.int32).view(k * c, 1)
    index = (x.reshape(k * c, h * w).int() + offset).view(-1)
    # index_add_, not bincount: on a GPU bincount reads its input's largest value to the host
    # (int32 counts: a pixel count fits, and the ones cost half the memory traffic of int64's at 224 px)
    hist = torch.zeros(k * c * 256, device=x.device, dtype=torch.int32)
    hist = hist.index_add_(0, index, torch.ones_like(index)).view(k * c, 256).long()
    cum = hist.cumsum(1)
    # the "max" is the channel's highest value present: the first bin where the cumulative count peaks
    top = hist.gather(1, cum.argmax(1, keepdim=True))
    step = (h * w - top).div_(255, rounding_mode="floor")
    lut = (cum[:, :-1] + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = F.pad(lut, (1, 0))  # lut[0] = 0
    # a channel with step 0 (fewer than 255 pixels below its top value) is left as it is
    lut = torch.where(step != 0, lut, torch.arange(256, device=x.device)).to(torch.uint8)
    return lut.view(-1).index_select(0, index).view(k, c, h, w)


COLOUR_OPS = {6: _brightness, 7: _color, 8: _contrast, 9: _sharpness, 10: _posterize, 11: _solarize,
              12: _autocontrast, 13: _equalize}


def random_erase(x: torch.Tensor, gen: torch.Generator, prob: float, *, scale=(0.02, 1 / 3),
                 ratio=(0.3, 3.3)) -> torch.Tensor:
    """timm's RandomErasing, "pixel" mode, on a normalized float batch (in place): each image with
    probability `prob` gets one rectangle of `scale` of its area, aspect ratio log-uniform in `ratio`,
    filled with standard normal noise (the data's own scale after normalization). A side that would not
    fit is clamped to the image rather than redrawn."""
    n, c, h, w = x.shape
    u = torch.rand(5, n, generator=gen, device=gen.device).to(x.device)
    area = (u[1] * (scale[1] - scale[0]) + scale[0]) * (h * w)
    aspect = torch.exp(u[2] * (math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0]))
    side_h = torch.sqrt(area / aspect).round_().clamp_(1, h)
    side_w = torch.sqrt(area * aspect).round_().clamp_(1, w)
    # the clamp: u * (h - side + 1) can round up to its bound in float32
    top = torch.minimum((u[3] * (h - side_h + 1)).floor_(), h - side_h).view(n, 1, 1)
    left = torch.minimum((u[4] * (w - side_w + 1)).floor_(), w - side_w).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    mask = ((u[0] < prob).view(n, 1, 1) & (rows >= top) & (rows < top + side_h.view(n, 1, 1))
            & (cols >= left) & (cols < left + side_w.view(n, 1, 1)))
    mask = mask.unsqueeze(1).expand(n, c, h, w)
    if x.device.type != "cpu":  # noise for every pixel, kept under the mask: counting them would sync
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device, x.dtype)
        return torch.where(mask, noise, x, out=x)
    # on the CPU, noise only for the erased pixels (a fifth of the batch on average, not all of it)
    count = int(mask.sum())
    if count:
        x.masked_scatter_(mask, torch.randn(count, generator=gen, device=gen.device).to(x.device, x.dtype))
    return x
