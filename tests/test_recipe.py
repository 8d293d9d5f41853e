"""The recipe pieces of issue 33, each under 2-worker DDP with augmentation on, and resumed exactly.

--ema: the average is what is evaluated, reported, kept and saved; the live weights train on and are in the
checkpoint for a resumed run, which reproduces the uninterrupted one bit for bit on the CPU
(tests/test_ddp_exact.py's resume test, its resnet8-ema case).

--precise-bn (on by default, so every resume case there re-estimates too): the statistics evaluated and saved
are those of the weights evaluated, measured again from a few training batches; training is untouched.

--mixup/--cutmix, --augment randaugment/trivialaugment and --random-erase: each piece's own behaviour is
tested in tests/test_mixing.py and tests/test_policies.py; here they train under 2-worker DDP, and
tests/test_ddp_exact.py resumes them bit for bit (its resnet8-mix and resnet8-policy cases).
"""

import pytest
import torch
from conftest import digits_val_accuracy
from local_ddp import run_ddp
from torch import nn

from raydist.cli import parse_cli
from raydist.config.fields import TrainConfig
from raydist.data.sources import TensorSource
from raydist.loop.batchnorm import reestimate_statistics
from raydist.loop.ema import WeightAverage
from raydist.preflight import validate
from raydist.runs.checkpoints import CHECKPOINT_FILE, FINAL_MODEL_FILE, load_checkpoint_file

TWO_WORKERS = dict(num_workers=2, cpus_per_worker=1.0, batch_size=64, lr=0.8, warmup_epochs=0.5)


def test_the_average_follows_the_ramped_decay_and_copies_integer_buffers():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(net, decay=0.9)
    start = net[0].weight.detach().clone()
    expected = start.clone()
    with torch.no_grad():
        for n in range(1, 40):
            net[0].weight.add_(1.0)
            net[1].num_batches_tracked += 1
            decay = min(0.9, (1 + n) / (10 + n))  # 2/11 at the first update: the start fades fast
            expected = decay * expected + (1 - decay) * net[0].weight
            average.update()
    weights = average.weights()
    assert torch.allclose(weights["0.weight"], expected, atol=1e-5)
    assert not torch.allclose(weights["0.weight"], net[0].weight)  # an average, not a copy
    assert weights["1.num_batches_tracked"].item() == 39


def test_the_swapped_in_average_is_evaluated_and_the_live_weights_come_back():
    net = nn.Linear(2, 1, bias=False)
    average = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(4.0)
    live = net.weight.detach().clone()
    with average.swapped_in():
        assert torch.equal(net.weight, average.weights()["weight"])
    assert torch.equal(net.weight, live)


def test_under_two_worker_ddp_the_reported_accuracy_is_the_saved_averages(tmp_path):
    cfg = validate(TrainConfig(epochs=4, checkpoint_every=2, ema=0.9, **TWO_WORKERS))
    history = run_ddp(cfg, tmp_path)
    assert history[-1]["val_acc"] > 0.8  # it learned (chance: 0.1)
    state = load_checkpoint_file(str(tmp_path / "checkpoint_epoch_0002" / CHECKPOINT_FILE))
    assert state["ema"]["updates"] == 2 * 11  # 2 epochs of 11 updates (2 ranks x 11 batches of 64)
    assert any(not torch.equal(state["model"][k], state["live_model"][k]) for k in state["model"])
    # what every reader of "model" gets (predict, --weights, a study's best trial) is what was reported
    assert digits_val_accuracy(state) == pytest.approx(history[1]["val_acc"], abs=1e-6)
    live = {**state, "model": state["live_model"]}
    assert digits_val_accuracy(live) != pytest.approx(history[1]["val_acc"], abs=1e-6)
    final = load_checkpoint_file(str(tmp_path / FINAL_MODEL_FILE))
    assert digits_val_accuracy(final) == pytest.approx(history[-1]["val_acc"], abs=1e-6)


# ---- --precise-bn: BatchNorm statistics of the weights evaluated ---------------------------------------------


def _scaled(images, train):
    return images.float() / 255


@torch.no_grad()
def test_precise_bn_averages_the_batches_statistics_keeps_frozen_norms_and_restores_the_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    net.train()
    net[4].eval()  # a frozen unit's norm (fine-tuning): its statistics are the pretrained ones
    frozen = net[4].running_mean.clone(), net[4].running_var.clone()
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    source = TensorSource(images, torch.zeros(40))
    features = net[0](_scaled(images, True))  # what the first norm normalises, all 40 images

    def reestimate(batches, batch_size):
        return reestimate_statistics(net, source, batches=batches, batch_size=batch_size, augment=_scaled,
                                     epoch=3, seed=1, rank=0, world=1, device=torch.device("cpu"),
                                     channels_last=False)

    assert reestimate(batches=1, batch_size=40) == 1  # one batch of every image: its mean and unbiased variance
    assert torch.allclose(net[1].running_mean, features.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(net[1].running_var, features.var((0, 2, 3), unbiased=True), atol=1e-5)
    assert reestimate(batches=100, batch_size=8) == 5  # the 5 batches there are; their means average to the mean
    assert torch.allclose(net[1].running_mean, features.mean((0, 2, 3)), atol=1e-6)
    assert reestimate(batches=2, batch_size=8) == 2  # 16 of the 40 images: another mean
    assert not torch.allclose(net[1].running_mean, features.mean((0, 2, 3)), atol=1e-3)
    assert net[1].momentum == 0.1 and net[4].momentum == 0.1
    assert torch.equal(net[4].running_mean, frozen[0]) and torch.equal(net[4].running_var, frozen[1])

    class Halves(nn.Module):  # a model split into 2 micro-batches (--micro-batches): each norm runs twice a batch
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.cat([self.inner(x[:20]), self.inner(x[20:])])

    reestimate_statistics(Halves(net), source, batches=1, batch_size=40, augment=_scaled, epoch=3, seed=1,
                          rank=0, world=1, device=torch.device("cpu"), channels_last=False)
    assert torch.allclose(net[1].running_mean, features.mean((0, 2, 3)), atol=1e-6)  # both halves, averaged


def test_under_two_worker_ddp_precise_bn_ends_the_lag_of_the_default_runs_first_epochs(tmp_path):
    # The first 3 of the 30 epochs of `python -m raydist.train` (resnet8 on digits, 2 workers x 64, LR 0.4
    # per 256, 16 px crops), where the running averages lagged: validation at 9-26% as training passed 85%.
    cfg = parse_cli(["--epochs", "3", "--schedule-epochs", "30", "--checkpoint-every", "1"])[0]
    assert cfg.precise_bn == 4 and cfg.num_workers == 2  # the default
    precise = run_ddp(cfg, tmp_path / "precise")
    lagging = run_ddp(validate(TrainConfig.from_dict({**cfg.to_dict(), "precise_bn": 0})), tmp_path / "lagging")
    # training is untouched: the same losses, epoch by epoch; only what is evaluated differs
    assert [m["train_loss"] for m in precise] == [m["train_loss"] for m in lagging]
    assert precise[1]["val_acc"] > 0.75 and precise[2]["val_acc"] > 0.9  # it learned, and the metric shows it
    assert precise[2]["val_acc"] > lagging[2]["val_acc"] + 0.2  # 96% against 26% here (torch 2.15, CPU)
    for epoch, metrics in enumerate(precise, start=1):  # what is saved is what was reported, every epoch
        saved = load_checkpoint_file(str(tmp_path / "precise" / f"checkpoint_epoch_{epoch:04d}" / CHECKPOINT_FILE))
        assert digits_val_accuracy(saved) == pytest.approx(metrics["val_acc"], abs=1e-6)


# ---- per-data-set defaults that fit the data ----------------------------------------------------------------


def test_auto_augmentation_never_mirrors_digits_and_crop_shifts_without_mirroring():
    from raydist.data.augment import Augmenter, augment_kind

    assert augment_kind("auto", "digits") == "crop"  # a mirrored 2 is no digit
    assert augment_kind("auto", "cifar10") == "crop_flip" and augment_kind("auto", "folder") == "resized_crop"
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    images[..., :16] = 255  # bright left half
    for kind, mirrored in (("crop", 0), ("crop_flip", None)):
        x = Augmenter(kind, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)(images, train=True)
        flipped = int((x[..., :12].mean((1, 2, 3)) < x[..., -12:].mean((1, 2, 3))).sum())
        if mirrored is None:
            assert 16 < flipped < 48  # about half (the check can fail)
        else:
            assert flipped == mirrored
        assert not torch.equal(x[0], x[1]) or not torch.equal(x[1], x[2])  # shifted per image


@pytest.mark.parametrize("setting, side", [
    (dict(), 16),  # resnet8 from scratch: the 8x8 scans at 16 px
    (dict(weights="model_final.pt"), 16),  # a saved resnet8, trained here at 16
    (dict(model="resnet18"), 16),  # the CIFAR ResNet-18
    (dict(model="resnet18_imagenet", pretrained=True), 32),  # ImageNet architectures keep the stored side,
    (dict(model="resnet18_imagenet", weights="resnet18-f37072fd.pth"), 32),  # their weights from a file too
    (dict(model="tune_cnn"), 32),  # reads 32-35 px only
    (dict(input_size=24), 24),
    (dict(dataset="cifar10"), 32),
])
def test_the_side_a_model_reads_is_the_data_sets_own_choice_unless_the_model_or_the_user_says(setting, side):
    from raydist.data.sizes import input_side

    assert input_side(TrainConfig(**setting)) == side


def test_digits_trains_30_epochs_from_the_command_line_unless_a_preset_file_or_flag_says(tmp_path):
    assert TrainConfig().epochs == 15  # a config built in Python keeps the dataclass's default
    assert parse_cli([])[0].epochs == 30
    assert parse_cli(["--dataset", "cifar10"])[0].epochs == 15
    assert parse_cli(["--epochs", "7"])[0].epochs == 7
    (tmp_path / "c.yaml").write_text("epochs: 12\n")
    assert parse_cli(["--config", str(tmp_path / "c.yaml")])[0].epochs == 12
    assert parse_cli(["--preset", "dli"])[0].epochs == 40


@pytest.mark.parametrize("saved, pinned", [
    ({"dataset": "digits", "augment": "auto"}, {"input_size": 32, "augment": "crop_flip"}),  # before issue 33
    ({"dataset": "digits", "augment": "none", "input_size": 24}, {"input_size": 24, "augment": "none"}),
    ({"dataset": "digits", "augment": "auto", "ema": 0.0}, {"input_size": None, "augment": "auto"}),  # today's
    ({"dataset": "cifar10", "augment": "auto"}, {"input_size": None, "augment": "auto"}),
])
def test_a_config_saved_before_digits_had_its_own_side_is_read_as_that_run_trained(saved, pinned):
    from raydist.data.augment import augment_kind
    from raydist.data.sizes import input_side

    cfg = TrainConfig.from_saved(saved)
    assert (cfg.input_size, cfg.augment) == (pinned["input_size"], pinned["augment"])
    if "ema" not in saved and saved["dataset"] == "digits" and saved["augment"] == "auto":
        assert input_side(cfg) == 32 and augment_kind(cfg.augment, cfg.dataset) == "crop_flip"


# ---- --clip-grad-norm ---------------------------------------------------------------------------------------


def test_clipping_takes_the_fp16_scale_off_first_clips_the_global_norm_and_skips_an_overflowed_step():
    from raydist.loop.recipe import clip_gradients

    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # fp16's loss scale, on the CPU
    scaler.scale((net(torch.randn(8, 4)) ** 2).sum()).backward()
    true_norm = torch.cat([p.grad.flatten() for p in net.parameters()]).norm() / 1024
    assert true_norm > 0.5
    before = [p.detach().clone() for p in net.parameters()]
    norm = clip_gradients(scaler, optimizer, max_norm=0.5)
    assert norm.item() == pytest.approx(true_norm.item(), rel=1e-5)  # the norm before clipping, unscaled
    clipped = [p.grad.clone() for p in net.parameters()]
    assert torch.cat([g.flatten() for g in clipped]).norm().item() == pytest.approx(0.5, rel=1e-4)
    scaler.step(optimizer)  # not unscaled a second time: the step is the clipped gradient
    assert all(torch.allclose(p, b - g) for p, b, g in zip(net.parameters(), before, clipped))
    scaler.update()

    optimizer.zero_grad()
    scaler.scale(net(torch.randn(8, 4)).sum()).backward()
    net.weight.grad[0, 0] = float("inf")  # an overflowed fp16 step
    after_first = [p.detach().clone() for p in net.parameters()]
    assert clip_gradients(scaler, optimizer, max_norm=0.5).item() == 0.0  # counted as 0, not inf
    scaler.step(optimizer)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), after_first))  # skipped, as without clipping


def test_under_two_worker_ddp_no_update_moves_the_weights_further_than_the_lr_times_the_clip(tmp_path):
    # plain SGD (no momentum, no weight decay): an update moves the weights by LR x the clipped gradient, so
    # an epoch moves them by at most its LRs' sum x the clip, whatever the unclipped gradients were
    clip = 0.05
    cfg = validate(TrainConfig(epochs=2, checkpoint_every=1, clip_grad_norm=clip, momentum=0.0, weight_decay=0.0,
                               **TWO_WORKERS))
    history = run_ddp(cfg, tmp_path)
    assert all(m["grad_norm"] > clip for m in history)  # every epoch's updates were clipped on average
    first, second = (load_checkpoint_file(str(tmp_path / f"checkpoint_epoch_{e:04d}" / CHECKPOINT_FILE))["model"]
                     for e in (1, 2))
    names = [n for n, p in first.items() if p.is_floating_point() and "running" not in n]  # the parameters
    moved = torch.cat([(second[n] - first[n]).flatten() for n in names]).norm().item()
    updates = 11  # 2 ranks x 11 batches of 64
    assert 0 < moved <= history[1]["lr"] * updates * clip * 1.001

    learned = run_ddp(validate(TrainConfig(epochs=4, clip_grad_norm=1.0, **TWO_WORKERS)), tmp_path / "learned")
    assert learned[-1]["val_acc"] > 0.9  # a clip near the gradients' own norm still trains (chance: 0.1)


# ---- mixing and the photo policies under 2-worker DDP -----------------------------------------------------


def test_under_two_worker_ddp_mixing_and_the_photo_policies_train_on_harder_inputs_and_still_learn(tmp_path):
    settings = dict(num_workers=2, cpus_per_worker=1.0, epochs=6, label_smoothing=0.1)
    plain = run_ddp(validate(TrainConfig(**settings)), tmp_path / "plain")
    mixed = run_ddp(validate(TrainConfig(mixup=0.2, cutmix=1.0, **settings)), tmp_path / "mixed")
    policy = run_ddp(validate(TrainConfig(augment="randaugment", random_erase=0.25, **settings)), tmp_path / "policy")
    assert plain[-1]["train_acc"] > 0.95
    # they learn (chance: 0.1; 97% mixed, 92-95% under RandAugment and erasing here, 99% plain) ...
    assert mixed[-1]["val_acc"] > 0.9 and policy[-1]["val_acc"] > 0.85
    # ... from training inputs that are harder to fit than the plain run's: the mixed run's accuracy is the
    # credit against its mixed targets (at most max(lam, 1 - lam) for a mixed image; 71% here), the policy's
    # images are rotated, sheared, solarized, erased (82% here)
    assert mixed[-1]["train_acc"] < plain[-1]["train_acc"] - 0.05 and mixed[-1]["train_loss"] > plain[-1]["train_loss"]
    assert policy[-1]["train_acc"] < plain[-1]["train_acc"] - 0.05
