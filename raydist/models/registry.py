"""Model registry: every model is built by name through `create_model` (raydist.models imports every
model module, which registers its models here with @register_model).

    net = create_model("resnet8", num_classes=10)
    net = create_model("tune_cnn", num_classes=10, l1=64, l2=16)   # a model's own arguments (--model-arg)

Models take 3-channel images (digits and Fashion-MNIST are stored at 3 x 32 x 32 by raydist.data;
raydist.models.transfer adapts the first conv for 1-channel input) and know nothing about DDP or Ray.
Every model's head is `fc`, and each names its backbone's stages (`transfer_stages`) for fine-tuning.
`timm:NAME` names any timm architecture (raydist.models.timm_models): `model_spec` finds both kinds.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from raydist.errors import ModelArgError
from raydist.models.timm_models import is_timm, timm_builder


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    pretrained_weights: Optional[str] = None  # torchvision weights, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    input_sides: Optional[tuple[int, int]] = None  # the image sides (px) the network accepts, when fixed

    def arguments(self) -> dict[str, inspect.Parameter]:
        """The builder's own keyword arguments (--model-arg NAME=VALUE), beside num_classes."""
        params = inspect.signature(self.builder).parameters
        return {n: p for n, p in params.items() if n != "num_classes"}

    def argument_type(self, name: str) -> type:
        """The annotated type of an argument (the builders' modules use postponed annotations: resolved here),
        else its default's."""
        hint = typing.get_type_hints(self.builder).get(name)
        return hint if isinstance(hint, type) else type(self.arguments()[name].default)

    def arguments_text(self) -> str:
        args = self.arguments()
        if not args:
            return f"{self.name} takes no --model-arg"
        return f"{self.name} takes " + ", ".join(
            f"{n} ({self.argument_type(n).__name__}, default {p.default!r})" for n, p in args.items())


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, description: str, pretrained_weights: Optional[str] = None,
                   input_sides: Optional[tuple[int, int]] = None):
    def wrap(builder):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = ModelSpec(name, builder, description, pretrained_weights, input_sides)
        return builder
    return wrap


def model_spec(name: str) -> ModelSpec:
    """A built-in model's spec, or a timm architecture's (`timm:NAME`); ValueError in one line naming the
    unknown model and what is known."""
    if is_timm(name):
        build, published = timm_builder(name)
        return ModelSpec(name, build, f"timm's {build.__name__}", pretrained_weights=name if published else None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}, or timm:NAME for any timm "
                         f"model")
    return MODELS[name]


def check_model_args(name: str, args: Optional[dict]) -> dict[str, Any]:
    """`args` checked against the builder's signature and converted to its annotated types (an int for a
    float argument becomes a float); raises ModelArgError naming the bad argument and what is accepted."""
    spec = model_spec(name)
    known = spec.arguments()
    out = {}
    for key, value in (args or {}).items():
        if key not in known:
            raise ModelArgError(f"--model-arg {key}={value}: {spec.arguments_text()}")
        kind = spec.argument_type(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ModelArgError(f"--model-arg {key}={value!r} is not a valid {kind.__name__}: {spec.arguments_text()}")
        out[key] = value
    return out


def sync_batchnorm(net: nn.Module) -> nn.Module:
    """Every BatchNorm layer as a SyncBatchNorm (statistics over every rank's batch). A timm model's through
    timm's own converter: torch's turns timm's BatchNormAct2d (a norm with its activation inside) into a
    plain SyncBatchNorm that never calls the activation."""
    from raydist.models.timm_models import is_timm_net

    if is_timm_net(net):
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(net)
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


def create_model(name: str, *, num_classes: int, **model_args) -> nn.Module:
    """A freshly initialised model; raydist.models.transfer starts one from pretrained weights. `model_args`
    are the builder's own arguments (a run's --model-arg, saved in its checkpoints and final model)."""
    return model_spec(name).builder(num_classes=num_classes, **check_model_args(name, model_args))
