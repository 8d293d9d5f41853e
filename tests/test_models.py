"""Every registered model: forward and backward on a batch; the registry's errors (transfer learning: test_transfer.py)."""

import pytest
import torch

from raydist.models.registry import MODELS, create_model
from raydist.preflight import validate


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
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; known: resnet18, resnet18_imagenet, resnet50, resnet50_imagenet, resnet8, tune_cnn, wrn"):
        create_model("vgg", num_classes=10)


def _params(model):
    return sum(p.numel() for p in model.parameters())


# Each model's parameter count as published (10 classes; torchvision's ImageNet models with their 1000).
PUBLISHED_PARAMETERS = {
    ("resnet8", 10): 78_042,  # raydist's own small model (projection shortcuts), so no published figure: as built
    ("resnet18", 10): 11_173_962,  # the CIFAR ResNet-18 of kuangliu/pytorch-cifar
    ("resnet50", 10): 23_520_842,
    ("wrn_dli", 10): 17_117_754,  # the NVIDIA DLI assessment's WideResNet
    ("wrn16_4", 10): 2_748_890,  # Zagoruyko & Komodakis 2016, table 1 ("2.7M")
    ("wrn28_10", 10): 36_479_194,  # ibid. ("36.5M")
    ("wrn", 10): 2_748_890,  # its defaults are WRN-16-4
    ("tune_cnn", 10): 62_006,  # Ray Tune's CIFAR-10 tutorial Net at l1=120, l2=84 (PyTorch's 60-minute blitz)
    ("resnet18_imagenet", 1000): 11_689_512,  # torchvision's published figure
    ("resnet50_imagenet", 1000): 25_557_032,
}


def test_every_registered_model_has_its_published_parameter_count():
    assert {name for name, _ in PUBLISHED_PARAMETERS} == set(MODELS)
    for (name, classes), count in PUBLISHED_PARAMETERS.items():
        assert _params(create_model(name, num_classes=classes)) == count, name


def test_model_args_reshape_the_searchable_models():
    assert _params(create_model("wrn", num_classes=10, depth=28, widen=10)) == 36_479_194  # WRN-28-10
    assert _params(create_model("wrn", num_classes=10, depth=10, widen=1)) == 77_850
    small = create_model("tune_cnn", num_classes=10, l1=4, l2=8)
    assert (small.fc1.out_features, small.fc2.out_features) == (4, 8)
    assert create_model("wrn_dli", num_classes=10, dropout=0.2).features[1].body[1].p == 0.2


def test_a_bad_model_argument_is_one_line_naming_what_the_model_takes():
    from raydist.errors import ModelArgError

    with pytest.raises(ModelArgError, match=r"^--model-arg l3=4: tune_cnn takes l1 \(int, default 120\), "
                                            r"l2 \(int, default 84\)$"):
        create_model("tune_cnn", num_classes=10, l3=4)
    with pytest.raises(ModelArgError, match=r"--model-arg depth=16.5 is not a valid int: wrn takes depth"):
        create_model("wrn", num_classes=10, depth=16.5)
    with pytest.raises(ModelArgError, match=r"resnet18 takes no --model-arg"):
        create_model("resnet18", num_classes=10, width=2)
    with pytest.raises(ValueError, match=r"depth 15 is not 6n\+4"):
        create_model("wrn", num_classes=10, depth=15)


# ---- wrn_dli, built a second time from the assessment's description, independently of raydist's code


class _Block(torch.nn.Module):
    """Conv-BN-ReLU, Dropout(0.01), Conv-BN-ReLU, plus the input (a 1x1 conv with bias if channels change)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(cin, cout, 3, padding="same", bias=False), torch.nn.BatchNorm2d(cout)
        self.drop = torch.nn.Dropout(0.01)
        self.c2, self.b2 = torch.nn.Conv2d(cout, cout, 3, padding="same", bias=False), torch.nn.BatchNorm2d(cout)
        self.proj = torch.nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(self.drop(y))))
        return y + (x if self.proj is None else self.proj(x))


class _PublishedDLI(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.c0, self.b0 = torch.nn.Conv2d(3, 16, 3, padding="same", bias=False), torch.nn.BatchNorm2d(16)
        self.r1, self.r2 = _Block(16, 160), _Block(160, 160)
        self.r3, self.r4 = _Block(160, 320), _Block(320, 320)
        self.r5, self.r6 = _Block(320, 640), _Block(640, 640)
        self.head = torch.nn.Linear(640, classes)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.nn.functional.max_pool2d(self.r2(self.r1(x)), 2)
        x = torch.nn.functional.max_pool2d(self.r4(self.r3(x)), 2)
        x = torch.nn.functional.avg_pool2d(self.r6(self.r5(x)), 7)
        return self.head(torch.flatten(x, 1))


def test_wrn_dli_is_the_published_network_it_gives_the_same_logits_as_a_construction_from_the_description():
    torch.manual_seed(0)
    ours, theirs = create_model("wrn_dli", num_classes=10), _PublishedDLI()
    assert _params(theirs) == _params(ours) == 17_117_754
    # The same tensors in the same order: load ours into theirs by position, shape by shape.
    ours_state, theirs_keys = list(ours.state_dict().values()), list(theirs.state_dict())
    assert [t.shape for t in ours_state] == [theirs.state_dict()[k].shape for k in theirs_keys]
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode checks them too
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(dict(zip(theirs_keys, ours.state_dict().values())))
    x = torch.randn(4, 3, 32, 32)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_wrn_dli_costs_what_the_published_network_costs():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        create_model("wrn_dli", num_classes=10).eval()(torch.zeros(1, 3, 32, 32))
    assert round(counter.get_total_flops() / 1e9, 2) == 4.82


def test_fixed_size_models_refuse_another_input_size_before_any_cluster():
    from raydist.errors import ConfigError
    from raydist.config.fields import TrainConfig

    with pytest.raises(ConfigError, match=r"--model wrn_dli reads images of 28 to 55 pixels a side, but this run "
                                          r"feeds it 224: give --input-size 32"):
        validate(TrainConfig(model="wrn_dli", input_size=224))
    validate(TrainConfig(model="wrn_dli"))  # digits, at 32
