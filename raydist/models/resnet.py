"""ResNets: the CIFAR variants (3x3 stem, no max-pool), a small resnet8, and torchvision's ImageNet ResNet18."""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem conv, no max-pool, stages at strides 1, 2, 2(, 2)."""

    def __init__(self, block, blocks_per_stage: list[int], widths: list[int], num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_planes = [], widths[0]
        for i, (n, planes) in enumerate(zip(blocks_per_stage, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.blocks_per_stage = list(blocks_per_stage)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))

    def transfer_stages(self) -> list[tuple[str, list[nn.Module]]]:
        """The backbone from input to output, in the units that transfer learning freezes and unfreezes."""
        units, start = [("stem", [self.stem])], 0
        for i, n in enumerate(self.blocks_per_stage):
            units.append((f"stage{i + 1}", list(self.stages[start:start + n])))
            start += n
        return units

    def pipeline_units(self) -> list[tuple[str, nn.Module]]:
        """The forward as a chain of units for model parallelism (raydist.parallel.pipeline): the stem, each
        residual block (stageS.B), and the head (pooling and the classifier, which the pool feeds a vector)."""
        units, start = [("stem", self.stem)], 0
        for i, n in enumerate(self.blocks_per_stage):
            units += [(f"stage{i + 1}.{j}", self.stages[start + j]) for j in range(n)]
            start += n
        return units + [("head", nn.Sequential(self.pool, nn.Flatten(1), self.fc))]


@register_model("resnet8", "small CIFAR ResNet (3 stages of one basic block, 16/32/64 channels, 78k parameters)")
def resnet8(num_classes: int) -> nn.Module:
    return CifarResNet(BasicBlock, [1, 1, 1], [16, 32, 64], num_classes)


@register_model("resnet18", "CIFAR ResNet-18 for 32x32 input (3x3 stem, no max-pool; 11M parameters; at 224x224 "
                "use resnet18_imagenet)")
def resnet18(num_classes: int) -> nn.Module:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes)


@register_model("resnet50", "CIFAR ResNet-50 for 32x32 input (bottleneck blocks, 3x3 stem, no max-pool; 24M "
                "parameters; at 224x224 use resnet50_imagenet)")
def resnet50(num_classes: int) -> nn.Module:
    return CifarResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes)


@register_model("resnet18_imagenet", "torchvision's ImageNet ResNet-18 (7x7 stem, max-pool); --pretrained loads "
                "its published ImageNet weights", pretrained_weights="ResNet18_Weights.IMAGENET1K_V1")
def resnet18_imagenet(num_classes: int) -> nn.Module:
    import torchvision

    # Published weights are loaded by raydist.models.transfer (a new head, an adapted stem where asked).
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


@register_model("resnet50_imagenet", "torchvision's ImageNet ResNet-50 for 224x224 input (7x7 stem, max-pool; 8.2 "
                "GFLOP per image forward, a 16th of the CIFAR resnet50 at that size); --pretrained loads its "
                "published ImageNet weights (V2)",
                pretrained_weights="ResNet50_Weights.IMAGENET1K_V2")
def resnet50_imagenet(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)

