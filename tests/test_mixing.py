"""--mixup, --cutmix and --mix-prob (raydist.loop.mixing): what each image becomes, the loss against the mixed
targets with label smoothing, the training accuracy under mixing, and a study that searches them. The
2-worker run that learns with them is in tests/test_recipe.py; the resume case (bit-identical to the
uninterrupted run) is tests/test_ddp_exact.py's resnet8-mix."""

import pytest
import torch
import torch.nn.functional as F

from raydist.loop.mixing import BatchMixer, Mixed


def _batch(n=64, side=8, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def test_mixup_blends_each_image_with_its_partner_by_its_own_share():
    x, labels = _batch()
    out, mixed = BatchMixer(torch.Generator().manual_seed(1), mixup=0.4)(x, labels)
    partner = x.flip(0)
    lam = mixed.lam.view(-1, 1, 1, 1)
    assert torch.allclose(out, lam * x + (1 - lam) * partner, atol=1e-6)
    assert torch.equal(mixed.labels, labels) and torch.equal(mixed.partner_labels, labels.flip(0))
    assert ((mixed.lam > 0) & (mixed.lam < 1)).all()
    assert len(set(mixed.lam.tolist())) == len(labels)  # a share per image, not one per batch
    # Beta(0.4, 0.4) piles up near 0 and 1: a third or more of the shares beyond 0.1 of an end
    assert ((mixed.lam < 0.1) | (mixed.lam > 0.9)).float().mean() > 0.3


def test_cutmix_pastes_one_rectangle_of_the_partner_and_its_share_is_the_pixels_left():
    x, labels = _batch(n=128, side=16)
    out, mixed = BatchMixer(torch.Generator().manual_seed(2), cutmix=1.0)(x, labels)
    partner = x.flip(0)
    own_pixel = (out == x).all(1)  # every channel of a pixel comes from one image
    from_partner = (out == partner).all(1)
    assert (own_pixel | from_partner).all()
    pasted = from_partner & ~own_pixel
    for i in range(len(x)):
        if i == len(x) - 1 - i:
            continue
        rows, cols = pasted[i].any(1).nonzero().flatten(), pasted[i].any(0).nonzero().flatten()
        if len(rows):  # one axis-aligned rectangle, and nothing outside it
            box = torch.zeros_like(pasted[i])
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(box, pasted[i])
        assert mixed.lam[i].item() == pytest.approx(1 - pasted[i].float().mean().item(), abs=1e-6)
    assert 0.3 < mixed.lam.mean().item() < 0.7  # Beta(1, 1): half the area on average


def test_mix_prob_leaves_the_rest_unmixed_and_both_on_share_the_images_at_even_odds():
    x, labels = _batch(n=2000, side=8)
    out, mixed = BatchMixer(torch.Generator().manual_seed(3), mixup=1.0, cutmix=1.0, prob=0.5)(x, labels)
    unmixed = mixed.lam == 1
    assert 0.45 < unmixed.float().mean().item() < 0.55
    assert torch.equal(out[unmixed], x[unmixed])
    changed = ~unmixed
    # cutmix keeps each pixel from one image; mixup blends every pixel
    blended = ~((out == x) | (out == x.flip(0))).all(1).flatten(1).all(1)
    share_blended = (blended & changed).sum().item() / changed.sum().item()
    assert 0.42 < share_blended < 0.58


def test_the_loss_is_the_cross_entropy_against_the_mixed_smoothed_target_and_accuracy_credits_both_labels():
    torch.manual_seed(4)
    logits = torch.randn(6, 5)
    labels, partner = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 3, 0, 2, 4])
    lam = torch.tensor([1.0, 0.7, 0.5, 0.2, 0.9, 0.6])
    mixed = Mixed(labels, partner, lam)
    smoothing, classes = 0.1, 5

    def smoothed(target):
        return F.one_hot(target, classes) * (1 - smoothing) + smoothing / classes

    target = lam[:, None] * smoothed(labels) + (1 - lam[:, None]) * smoothed(partner)  # timm's mixed target
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert mixed.loss(logits, smoothing).item() == pytest.approx(expected.item(), rel=1e-6)

    predicted = torch.tensor([0, 1, 3, 3, 0, 4])
    scores = F.one_hot(predicted, classes).float()
    # 1 (own, unmixed) + 1 (both labels the same) + 0.5 (partner's) + 0.2 (own) + 0 + 0.4 (partner's)
    assert mixed.correct(scores).item() == pytest.approx(1 + 1 + 0.5 + 0.2 + 0 + 0.4)


def test_the_draws_come_from_the_augmenters_seeded_generator_so_a_resumed_epoch_mixes_as_the_first_run_did():
    x, labels = _batch()
    gen = torch.Generator()
    mixer = BatchMixer(gen, mixup=0.2, cutmix=1.0, prob=0.8)
    gen.manual_seed(5)
    first, a = mixer(x, labels)
    gen.manual_seed(5)
    torch.manual_seed(123)  # torch's own generator plays no part
    again, b = mixer(x, labels)
    gen.manual_seed(6)
    other, _ = mixer(x, labels)
    assert torch.equal(first, again) and torch.equal(a.lam, b.lam)
    assert not torch.equal(first, other)


def test_a_study_searches_the_recipe_pieces_and_every_sampled_trial_is_a_valid_config(tmp_path):
    from raydist.ray_edge.search import tune_space
    from raydist.study.study_file import load_study

    path = tmp_path / "study.yaml"
    path.write_text("""
num_samples: 4
search: {algorithm: hyperopt, initial_points: 2, seed: 3}
fixed: {dataset: digits, model: resnet8, epochs: 4}
searched:
  mixup: {uniform: [0.0, 0.4]}
  cutmix: {choice: [0.0, 1.0]}
  mix_prob: {quniform: [0.5, 1.0, 0.25]}
  augment: {choice: [auto, randaugment, trivialaugment]}
  random_erase: {quniform: [0.0, 0.5, 0.25]}
""")
    study = load_study(str(path))
    space = tune_space(study)
    samples = [{k: v.sample() for k, v in space.items()} for _ in range(40)]
    configs = [study.trial_config(sample) for sample in samples]
    assert all(0.0 <= c.mixup <= 0.4 and c.cutmix in (0.0, 1.0) and 0.5 <= c.mix_prob <= 1.0 for c in configs)
    assert {c.augment for c in configs} == {"auto", "randaugment", "trivialaugment"}
    assert {c.random_erase for c in configs} == {0.0, 0.25, 0.5}
