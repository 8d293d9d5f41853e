"""Model registry: every model is built by name through `create_model`.

    from raydist.models import create_model, MODELS
    net = create_model("resnet8", num_classes=10)

Models take 3-channel images (digits and Fashion-MNIST are brought to 3 x 32 x 32 by raydist.data;
raydist.models.transfer adapts the first conv for 1-channel input) and know nothing about DDP or Ray.
Every model's head is `fc`, and each names its backbone's stages (`transfer_stages`) for fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    pretrained_weights: Optional[str] = None  # torchvision weights, e.g. "ResNet18_Weights.IMAGENET1K_V1"


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, description: str, pretrained_weights: Optional[str] = None):
    def wrap(builder):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = ModelSpec(name, builder, description, pretrained_weights)
        return builder
    return wrap


def create_model(name: str, *, num_classes: int) -> nn.Module:
    """A freshly initialised model; raydist.models.transfer starts one from pretrained weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name].builder(num_classes=num_classes)


# Importing the modules registers their models.
from raydist.models import resnet, wide_resnet  # noqa: E402,F401
