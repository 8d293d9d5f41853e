"""Wide ResNets: the DLI assessment's WideResNet (`wrn_dli`) and the standard WRN-d-k for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from raydist.models.registry import register_model

# ---- wrn_dli: the NVIDIA DLI assessment network, as published ----------------------------------
# A Conv-BN-ReLU stem 3 -> 16, then two residual blocks per stage at 160, 320 and 640 channels with a 2x2
# max-pool between the stages, AvgPool2d(7), and a linear head: 17,117,754 parameters with 10 classes.
# A residual block is Conv-BN-ReLU, Dropout(0.01), Conv-BN-ReLU, plus its input (through a 1x1 convolution
# with bias when the block changes the channel count).


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class DLIResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(ConvBNReLU(in_ch, out_ch), nn.Dropout(dropout), ConvBNReLU(out_ch, out_ch))
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)  # with bias, as published

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class DLIWideResNet(nn.Module):
    def __init__(self, num_classes: int, dropout: float = 0.01):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(3, 16),
            DLIResidualBlock(16, 160, dropout), DLIResidualBlock(160, 160, dropout), nn.MaxPool2d(2),
            DLIResidualBlock(160, 320, dropout), DLIResidualBlock(320, 320, dropout), nn.MaxPool2d(2),
            DLIResidualBlock(320, 640, dropout), DLIResidualBlock(640, 640, dropout),
            # The published network's pool: on the 8 x 8 map of a 32 x 32 input, AvgPool2d(7) averages the
            # top-left 7 x 7 window only (one output, stride 7). Kept as published; it is why the model takes
            # inputs of 28 to 55 pixels only (a map of 7 to 13 after the two max-pools).
            nn.AvgPool2d(7), nn.Flatten(),
        )
        self.fc = nn.Linear(640, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

    def transfer_stages(self) -> list[tuple[str, list[nn.Module]]]:
        """The backbone from input to output, in the units that transfer learning freezes and unfreezes."""
        f = self.features
        return [("stem", [f[0]]), ("stage1", [f[1], f[2]]), ("stage2", [f[4], f[5]]), ("stage3", [f[7], f[8]])]

    def pipeline_units(self) -> list[tuple[str, nn.Module]]:
        """The forward as a chain of units for model parallelism (raydist.parallel.pipeline). Each max-pool
        rides with the block before it, so a stage boundary there sends the pooled map, a quarter the size."""
        f = self.features
        return [("stem", f[0]), ("stage1.0", f[1]), ("stage1.1", f[2:4]), ("stage2.0", f[4]), ("stage2.1", f[5:7]),
                ("stage3.0", f[7]), ("stage3.1", f[8]), ("head", nn.Sequential(*f[9:], self.fc))]


@register_model("wrn_dli", "the DLI assessment WideResNet as published (two residual blocks at each of 160/320/640 "
                "channels, dropout 0.01, two max-pools, AvgPool2d(7); 17.1M parameters; 28-55 px input)",
                input_sides=(28, 55))
def wrn_dli(num_classes: int, dropout: float = 0.01) -> nn.Module:
    return DLIWideResNet(num_classes, dropout)


# ---- WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks, widths 16k/32k/64k --------------


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None if (in_ch == out_ch and stride == 1) else nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the reference implementation.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        in_ch = widths[0]
        for stage, out_ch in enumerate(widths[1:]):
            for i in range(n):
                layers.append(PreActBlock(in_ch, out_ch, 2 if (stage > 0 and i == 0) else 1, dropout))
                in_ch = out_ch
        layers += [nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_classes)
        self.blocks_per_stage = n
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.features(x))

    def transfer_stages(self) -> list[tuple[str, list[nn.Module]]]:
        """The backbone from input to output, in the units that transfer learning freezes and unfreezes
        (the final BatchNorm belongs to the last stage)."""
        n, f = self.blocks_per_stage, self.features
        return [("stem", [f[0]]), ("stage1", list(f[1:1 + n])), ("stage2", list(f[1 + n:1 + 2 * n])),
                ("stage3", list(f[1 + 2 * n:]))]

    def pipeline_units(self) -> list[tuple[str, nn.Module]]:
        """The forward as a chain of units for model parallelism (raydist.parallel.pipeline): the stem conv,
        each block (stageS.B), and the head (the final BatchNorm-ReLU, pooling and the classifier)."""
        n, f = self.blocks_per_stage, self.features
        blocks = [(f"stage{i // n + 1}.{i % n}", f[1 + i]) for i in range(3 * n)]
        return [("stem", f[0])] + blocks + [("head", nn.Sequential(*f[1 + 3 * n:], self.fc))]


@register_model("wrn", "WRN-d-k for 32x32 inputs with its shape in --model-arg: depth (6n+4: 10, 16, 22, 28, 40), "
                "widen (k), dropout; default WRN-16-4")
def wrn(num_classes: int, depth: int = 16, widen: int = 4, dropout: float = 0.0) -> nn.Module:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth {depth} is not 6n+4 with n >= 1 (e.g. 10, 16, 22, 28, 40)")
    if widen < 1:
        raise ValueError(f"widen {widen} must be 1 or more")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout {dropout} must be in [0, 1)")
    return WideResNet(depth, widen, num_classes, dropout)


@register_model("wrn16_4", "WRN-16-4 for 32x32 inputs (2.7M parameters)")
def wrn16_4(num_classes: int) -> nn.Module:
    return WideResNet(16, 4, num_classes)


@register_model("wrn28_10", "WRN-28-10 for 32x32 inputs (36M parameters)")
def wrn28_10(num_classes: int) -> nn.Module:
    return WideResNet(28, 10, num_classes)
