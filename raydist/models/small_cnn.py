"""The small CNN of Ray Tune's CIFAR-10 tutorial, whose study searches the network's shape (`l1`, `l2`)."""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.registry import register_model


class TuneTutorialCNN(nn.Module):
    """Two 5x5 convolutions with 2x2 max-pools (3 -> 6 -> 16 channels), then fully connected layers of
    widths l1 and l2 and the head: the tutorial's `Net`, its last layer named `fc` as every raydist head is."""

    def __init__(self, num_classes: int, l1: int, l2: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 5 * 5, l1)
        self.fc2 = nn.Linear(l1, l2)
        self.fc = nn.Linear(l2, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc(x)

    def transfer_stages(self) -> list[tuple[str, list[nn.Module]]]:
        return [("stem", [self.conv1]), ("conv2", [self.conv2]), ("hidden", [self.fc1, self.fc2])]

    def pipeline_units(self) -> list[tuple[str, nn.Module]]:
        """The forward as a chain of units for model parallelism (raydist.parallel.pipeline); the one
        (stateless) max-pool module serves both conv units, as it does in forward()."""
        return [("conv1", nn.Sequential(self.conv1, nn.ReLU(), self.pool)),
                ("conv2", nn.Sequential(self.conv2, nn.ReLU(), self.pool, nn.Flatten(1))),
                ("fc1", nn.Sequential(self.fc1, nn.ReLU())), ("fc2", nn.Sequential(self.fc2, nn.ReLU())),
                ("head", self.fc)]


@register_model("tune_cnn", "the Ray Tune CIFAR-10 tutorial's small CNN (two 5x5 convs, fully connected layers of "
                "--model-arg l1 and l2 units; 32x32 input only)", input_sides=(32, 35))
def tune_cnn(num_classes: int, l1: int = 120, l2: int = 84) -> nn.Module:
    for name, width in (("l1", l1), ("l2", l2)):
        if width < 1:
            raise ValueError(f"{name} {width} must be 1 or more units")
    return TuneTutorialCNN(num_classes, l1, l2)
