"""Mixup and CutMix on the device, per image, and the loss and training accuracy against mixed targets.

    mixer = BatchMixer(gen, mixup=0.2, cutmix=1.0, prob=1.0)   # gen: the augmenter's generator
    x, mixed = mixer(x, labels)            # x: the augmented, normalized batch
    loss = mixed.loss(logits, label_smoothing=0.1)
    correct = mixed.correct(logits)        # a 0-dim tensor: the credit of the batch's predictions

Each image of a micro-batch is mixed (with probability `prob`) with its partner, the image at the mirrored
position of the batch (x.flip(0): the batch is shuffled every epoch, so partners change), by its own share
`lam` drawn from Beta(A, A): mixup blends the two images, `lam * own + (1 - lam) * partner`; cutmix pastes a
rectangle of the partner's covering `1 - lam` of the area (clipped at the border, `lam` then the share
actually left). With both on, each mixed image takes one of the two at even odds (timm's switch_prob 0.5);
timm draws one `lam` per batch by default, here every image draws its own (timm's "elem" mode).

The loss is `lam * CE(logits, own) + (1 - lam) * CE(logits, partner)`, which is the cross-entropy against the
mixed target `lam * onehot(own) + (1 - lam) * onehot(partner)`, with label smoothing applied to each one-hot
first (CE is linear in its target): the same target as timm's mixup with smoothing.

Training accuracy under mixing counts each prediction `lam` when it is the image's own label and `1 - lam`
when it is its partner's: the accuracy against the mixed target. An image that is not mixed counts 1 or 0
as before; a mixed one of two different labels can count at most max(lam, 1 - lam), so a mixed run's
train_acc stays well below an unmixed run's.

The draws come from the augmenter's generator (`gen`, on the batch's device), after the batch's augmentation
drew from it: raydist.loop.recipe.seed_epoch seeds it from (seed, epoch, rank), so a run resumed at an
epoch's end mixes exactly as the uninterrupted one did (one resumed inside an epoch draws a stream of its
own for the rest of it, as the augmentation does), and the mixing draws are not the augmentation's numbers again (a
second generator seeded alike would repeat them). No host sync: Beta comes from torch's Dirichlet sampler,
which takes a generator and, unlike torch.distributions, checks nothing on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Mixed:
    """One micro-batch's targets: each image's own label, its partner's and its own label's share."""
    labels: torch.Tensor
    partner_labels: torch.Tensor
    lam: torch.Tensor  # float32 per image; 1 for an image left unmixed

    def to(self, device) -> "Mixed":
        return Mixed(self.labels.to(device), self.partner_labels.to(device), self.lam.to(device))

    def loss(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 under autocast, as CrossEntropyLoss does
        own = F.cross_entropy(logits, self.labels, reduction="none", label_smoothing=label_smoothing)
        other = F.cross_entropy(logits, self.partner_labels, reduction="none", label_smoothing=label_smoothing)
        return (self.lam * own + (1 - self.lam) * other).mean()

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        predicted = logits.argmax(1)
        own, other = (predicted == self.labels).float(), (predicted == self.partner_labels).float()
        return (self.lam * own + (1 - self.lam) * other).sum()


class BatchMixer:
    def __init__(self, gen: torch.Generator, *, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0):
        self.gen, self.mixup, self.cutmix, self.prob = gen, mixup, cutmix, prob

    @classmethod
    def from_config(cls, cfg, gen: torch.Generator) -> Optional["BatchMixer"]:
        """The run's mixer, or None when --mixup and --cutmix are both off."""
        if not (cfg.mixup or cfg.cutmix):
            return None
        return cls(gen, mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob)

    def _uniform(self, *shape: int, device) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.gen.device).to(device)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Mixed]:
        n, _, h, w = x.shape
        device = x.device
        u = self._uniform(4, n, device=device)  # mixed?, cutmix or mixup?, the box's centre row and column
        mixed = u[0] < self.prob
        use_cut = u[1] < 0.5 if self.mixup and self.cutmix else torch.full((n,), bool(self.cutmix), device=device)
        alpha = torch.where(use_cut, self.cutmix or 1.0, self.mixup or 1.0).float().to(self.gen.device)
        # Beta(a, a) as the first share of a Dirichlet(a, a) draw
        lam = torch._sample_dirichlet(torch.stack([alpha, alpha], 1), generator=self.gen)[:, 0].to(device)
        partner = x.flip(0)
        # cutmix: a box of side sqrt(1 - lam) of each side, centred anywhere, clipped to the image
        side = torch.sqrt(1 - lam)
        cy, cx = u[2] * h, u[3] * w
        y0, y1 = (cy - side * h / 2).round().clamp(0, h), (cy + side * h / 2).round().clamp(0, h)
        x0, x1 = (cx - side * w / 2).round().clamp(0, w), (cx + side * w / 2).round().clamp(0, w)
        rows = torch.arange(h, device=device).view(1, h, 1)
        cols = torch.arange(w, device=device).view(1, 1, w)
        box = ((rows >= y0.view(n, 1, 1)) & (rows < y1.view(n, 1, 1)) &
               (cols >= x0.view(n, 1, 1)) & (cols < x1.view(n, 1, 1)))
        cut_lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the image's own pixels left
        lam = torch.where(mixed, torch.where(use_cut, cut_lam, lam), torch.ones_like(lam))
        blend = lam.view(n, 1, 1, 1).to(x.dtype)
        pasted = (mixed & use_cut).view(n, 1, 1, 1) & box.unsqueeze(1)
        blended = torch.where((mixed & ~use_cut).view(n, 1, 1, 1), x * blend + partner * (1 - blend), x)
        out = torch.where(pasted, partner, blended)
        return out, Mixed(labels, labels.flip(0), lam)
