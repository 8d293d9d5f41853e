"""Every registered model: forward and backward on a batch; the registry's errors (transfer learning: test_transfer.py)."""

import pytest
import torch

from raydist.models import MODELS, create_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; known: resnet18, resnet18_imagenet, resnet50, resnet50_imagenet, resnet8"):
        create_model("vgg", num_classes=10)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_sizes_match_their_descriptions():
    assert _params(create_model("resnet8", num_classes=10)) < 100_000  # well under 1M
    assert 11.0e6 < _params(create_model("resnet18", num_classes=10)) < 11.3e6
    assert 23.4e6 < _params(create_model("resnet50", num_classes=10)) < 23.6e6
    assert 2.7e6 < _params(create_model("wrn16_4", num_classes=10)) < 2.8e6
    assert 36.4e6 < _params(create_model("wrn28_10", num_classes=10)) < 36.6e6
    assert _params(create_model("resnet50_imagenet", num_classes=1000)) == 25_557_032  # torchvision's ResNet-50


def test_wrn_dli_has_the_assessment_layout():
    model = create_model("wrn_dli", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs if c.kernel_size == (3, 3)] == [16, 160, 160, 320, 320, 640, 640]
    assert [c.out_channels for c in convs if c.kernel_size == (1, 1)] == [160, 320, 640]  # projections
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.01}
