"""Any timm model by name: `--model timm:NAME` builds `timm.create_model(NAME, num_classes=...)`.

    build, published = timm_builder("timm:resnet10t")        # raydist.models.registry.model_spec wraps it
    net = build(num_classes=10, drop_path_rate=0.1)          # the model's --model-arg (drop_rate, ...)
    stages = timm_stages(net, heads=["fc"])                  # [(name, params, norms)] from input to output

timm is an optional dependency (pip install "raydist[timm]"): nothing here imports it until a timm model is
named. A timm model's classifier is the module its pretrained config names (fc, head, head.fc, classifier);
its fine-tuning stages are timm's own coarse grouping (`group_matcher(coarse=True)`: the stem, then each
stage), which is how timm itself builds layer-wise LR decay. Published weights come through timm's own
loader (the Hugging Face cache), never fetched by raydist. Ray never enters here.
"""

from __future__ import annotations

import difflib
import functools
import sys
from typing import Callable, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

PREFIX = "timm:"
INSTALL = 'pip install "raydist[timm]"'


def is_timm(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def is_timm_net(net: nn.Module) -> bool:
    """A model timm built (every one carries its pretrained config)."""
    return hasattr(net, "pretrained_cfg") and hasattr(net, "default_cfg")


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise ValueError(f"--model {name} needs timm, which is not installed: {INSTALL}") from None
    return timm


@functools.lru_cache(maxsize=None)
def timm_builder(name: str) -> tuple[Callable[..., nn.Module], bool]:
    """The builder of `timm:ARCH` (num_classes and the architecture's --model-arg) and whether timm
    publishes weights for it; ValueError (one line: the unknown name and the closest known ones) when timm
    has no such architecture."""
    timm, arch = _timm(name), name[len(PREFIX):]
    base, _, tag = arch.partition(".")
    if tag and timm.is_model(base) and arch not in timm.list_pretrained(arch):
        tags = ", ".join(timm.list_pretrained(f"{base}.*")[:6]) or "none"
        raise ValueError(f"timm has no weights tagged {tag!r} for {base} (--model {name}); its tags: {tags}")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; close: {', '.join(PREFIX + c for c in close)}" if close else ""
        raise ValueError(f"unknown timm model {arch!r} (--model {name}){hint}; timm.list_models('*{arch[:4]}*') "
                         f"lists the names")

    def build(num_classes: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0, img_size: int = 0) -> nn.Module:
        """timm's model with `num_classes` outputs; img_size 0 keeps the architecture's own (a ViT's
        position table is sized by it)."""
        # Not every architecture takes each of them: passed only when asked for.
        asked = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate, "img_size": img_size}
        return timm.create_model(arch, num_classes=num_classes, **{k: v for k, v in asked.items() if v})

    build.__name__ = arch
    cfg = timm.models.get_pretrained_cfg(arch)
    published = cfg is not None and bool(getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None))
    return build, published


def head_names(net: nn.Module) -> list[str]:
    """The classifier module(s) its pretrained config names (a distilled model has two); [] for a model
    without one (a feature encoder: raydist.preflight refuses it)."""
    classifier = net.pretrained_cfg.get("classifier")
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    return [n for n in names if _has_module(net, n)]


def _has_module(net: nn.Module, name: str) -> bool:
    try:
        net.get_submodule(name)
    except AttributeError:
        return False
    return True


def timm_stages(net: nn.Module, *, heads: list[str]) -> list[tuple[str, list[nn.Parameter], list[nn.Module]]]:
    """The backbone's units from input to output, each (name, parameters, BatchNorm layers): timm's coarse
    grouping, the classifier's parameters left out (they are the new head). A model without a grouping is
    one unit."""
    from timm.models import group_parameters

    params = dict(net.named_parameters())
    in_head = {n for n in params if any(n.startswith(h + ".") for h in heads)}
    norm_of = {f"{name}.weight": m for name, m in net.named_modules() if isinstance(m, _BatchNorm)}
    try:
        groups = group_parameters(net, net.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):  # no grouping: the stem (if a conv makes one) and the rest
        stem, rest = _stem_and_backbone(net, [n for n in params if n not in in_head])
        return [(label, [params[n] for n in names], [norm_of[n] for n in names if n in norm_of])
                for label, names in (("stem", stem), ("backbone", rest)) if names]
    stages, seen = [], {}
    for gid in sorted(groups):
        names = [n for n in groups[gid] if n not in in_head]
        if names:
            label = _stage_name(names, first=not stages)
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:  # densenet's transitions all live in `features`: features, features#2, ...
                label = f"{label}#{seen[label]}"
            stages.append((label, [params[n] for n in names], [norm_of[n] for n in names if n in norm_of]))
    return stages


def _stem_and_backbone(net: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """For a model without timm's grouping (PiT, PoolFormer): the parameters of the module holding the first
    conv (the stem; none without a conv), and the rest."""
    conv = next((name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return [], names
    holder = conv.rpartition(".")[0] or conv  # patch_embed.proj -> patch_embed; a top-level conv: itself
    stem = [n for n in names if n.startswith(holder + ".")]
    return stem, [n for n in names if n not in stem]


def _stage_name(names: list[str], *, first: bool) -> str:
    """`stem`, then `layer1`, `stages.2`, `head.norm`, `blocks.5+norm`: the module the unit's parameters
    share, else the top modules they live in."""
    if first:
        return "stem"
    paths = [name.split(".")[:-1] for name in names]
    shared = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    if shared:
        return ".".join(shared)
    tops: list[str] = []
    for parts in (name.split(".") for name in names):
        top = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if top not in tops:
            tops.append(top)
    return "+".join(tops[:3]) + ("+..." if len(tops) > 3 else "")


def hub_cache_dir(name: str) -> Optional[str]:
    """The Hugging Face cache folder timm's loader reads `timm:ARCH`'s published weights from."""
    import os

    cfg = _timm(name).models.get_pretrained_cfg(name[len(PREFIX):])
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    return os.path.join(HF_HUB_CACHE, "models--" + hub_id.replace("/", "--"))


def fit_positions(net: nn.Module, state: dict) -> dict:
    """A timm model's source tensors as its own loader fits them to the model: a ViT trained at another image
    size gets its position table resampled (the architecture's checkpoint_filter_fn, which timm applies to
    every published file). Only when a tensor's shape differs; any other model's state as it is."""
    if not is_timm_net(net):
        return state
    own = net.state_dict()
    if all(k not in own or own[k].shape == v.shape for k, v in state.items()):
        return state
    adapt = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    return adapt(state, net) if adapt else state


def published_state(name: str, model_args: Optional[dict] = None) -> dict:
    """The architecture's published weights through timm's own loader (Hugging Face cache first), at the
    run's img_size (timm resamples a ViT's position table); raises what timm raises when they are neither
    cached nor downloadable."""
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its per-file retries would print before raydist's one-line reason
    try:
        size = {"img_size": model_args["img_size"]} if (model_args or {}).get("img_size") else {}
        return _timm(name).create_model(name[len(PREFIX):], pretrained=True, **size).state_dict()
    finally:
        hub_log.setLevel(level)
