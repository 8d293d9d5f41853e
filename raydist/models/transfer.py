"""Transfer learning: start a model from pretrained weights, fit it to a new data set, freeze and unfreeze it.

    source = pretrained_source("resnet18_imagenet")            # torchvision's weights API ($TORCH_HOME cache)
    source = read_weights_file("runs/a/model_final.pt")        # or a file (state dict, safetensors, raydist)
    net = build_model("resnet18_imagenet", num_classes=5, grey_input="sum", source=source)
    units = transfer_units(net, new_stem=False)                # [head, layer4, layer3, layer2, layer1, stem]
    set_trainable(units, unfrozen=1)                           # head and layer4 train, the rest is frozen

The backbone loads strictly: every tensor of the source must fit the model, except the head (always new,
initialised as in the Ray Tune transfer-learning notebook) and the first conv where it is adapted to grey
input. Nothing here imports Ray: it runs the same on the driver (checks before a cluster starts) and on
every worker.
"""

from __future__ import annotations

import copy
import io
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from raydist.errors import WeightsError
from raydist.models.registry import MODELS, create_model
from raydist.models.timm_models import head_names as timm_heads
from raydist.models.timm_models import fit_positions, hub_cache_dir, is_timm, is_timm_net, published_state, timm_stages
from raydist.storage import filesystem, is_uri

HEAD = "fc"  # every built-in model's classifier; a timm model's is the one its config names
GREY_INPUTS = ("replicate", "sum", "reinit")
FINETUNE_MODES = ("full", "linear", "gradual", "lp-ft")
DOWNLOAD_TIMEOUT_S = 30  # a cluster node without internet fails at once or hangs; never for minutes


@dataclass
class Source:
    """Pretrained tensors and where they came from (for messages)."""
    state: dict[str, torch.Tensor]
    origin: str  # "--weights runs/a/model_final.pt (raydist resnet8)", "--pretrained (.../resnet18-f37072fd.pth)"
    model_name: Optional[str] = None  # the raydist model the file was trained as, when it says


# ---- where the weights come from ------------------------------------------------------------------------


def head_names(net: nn.Module) -> list[str]:
    """The classifier module(s): `fc` for the built-in models, the one(s) its config names for a timm model."""
    if is_timm_net(net):
        return timm_heads(net)
    return [HEAD]


def _weights_enum(model: str):
    import torchvision

    return torchvision.models.get_weight(MODELS[model].pretrained_weights)


def pretrained_cache_file(model: str) -> str:
    """Where torchvision's weights API (timm: the Hugging Face cache) keeps and looks for the model's
    published weights; "" when there is no such place."""
    if is_timm(model):
        return hub_cache_dir(model) or ""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(_weights_enum(model).url))


def pretrained_source(model: str, *, where: str = "", model_args: Optional[dict] = None) -> Source:
    """The model's published weights through torchvision's weights API: from the cache under $TORCH_HOME,
    downloaded into it once if missing. `where` ("on node ...") goes into the error message."""
    cached = pretrained_cache_file(model)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        if is_timm(model):
            state = published_state(model, model_args)  # timm's own loader: the cache, else the hub
        else:
            state = _weights_enum(model).get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a corrupt file: all end in the same advice
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(
            f"--pretrained: {model}'s weights are not in the cache{where} ({cached}) and could not be "
            f"downloaded ({type(exc).__name__}: {reason}); download them once on a machine with internet and "
            f"copy them to that folder (or set {'HF_HOME' if is_timm(model) else 'TORCH_HOME'}), or pass "
            f"--weights FILE on storage every node reads"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return Source(state, f"--pretrained ({cached})", model)


def read_weights_file(path: str) -> Source:
    """Tensors from a file: a plain state dict, a torchvision weights file, or a raydist checkpoint.pt,
    model_final.pt or best_model.pt. A local path or a URI (s3://...). Loaded with weights_only=True: a
    file that would run code when unpickled is refused, not executed. A .safetensors file (the Hugging Face
    hub's format, timm's published weights) is read as one."""
    try:
        if is_uri(path):
            fs, inner = filesystem(path)
            with fs.open_input_stream(inner) as fh:
                data = io.BytesIO(fh.read())
        else:
            data = os.path.expanduser(path)
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load as load_safetensors
            except ImportError:
                raise WeightsError(f"--weights {path}: reading .safetensors needs the safetensors package (pip "
                                   f"install safetensors; timm brings it)") from None

            if not isinstance(data, io.BytesIO):
                with open(data, "rb") as fh:
                    data = io.BytesIO(fh.read())
            loaded = load_safetensors(data.getvalue())
        else:
            loaded = torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"--weights {path}: no such file") from None
    except IsADirectoryError:
        raise WeightsError(f"--weights {path} is a folder; name the file in it (checkpoint.pt, model_final.pt, "
                           f"best_model.pt or a .pth state dict)") from None
    except Exception as exc:  # noqa: BLE001 - unreadable, not a torch file, or pickled code
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(f"--weights {path}: not a readable PyTorch weights file ({reason})") from None
    model_name = None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):  # a raydist file
        config = loaded.get("config") if isinstance(loaded.get("config"), dict) else {}
        model_name = loaded.get("model_name") or config.get("model")
        loaded = loaded["model"]
    if not (isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise WeightsError(f"--weights {path}: holds no state dict (a mapping of tensor names to tensors), nor a "
                           f"raydist checkpoint.pt / model_final.pt / best_model.pt")
    # Saved from a DDP or compiled wrapper: the same tensors under a prefix.
    state = {_strip_prefixes(k): v for k, v in loaded.items()}
    origin = f"--weights {path}" + (f" (raydist {model_name})" if model_name else "")
    return Source(state, origin, model_name)


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


# ---- fitting a source to the model ----------------------------------------------------------------------


def build_model(name: str, *, num_classes: int, grey_input: str = "replicate",
                source: Optional[Source] = None, model_args: Optional[dict] = None) -> nn.Module:
    """The model for a run: freshly initialised, or the source's backbone with a new head; with grey input
    fed as one channel, its first conv adapted (`sum`: the RGB filters summed; `reinit`: a new conv).
    `model_args`: the builder's own arguments (--model-arg)."""
    net = create_model(name, num_classes=num_classes, **(model_args or {}))
    stem_name, stem = first_conv(net)
    heads = head_names(net)
    if source is not None:
        state = {k: v for k, v in source.state.items() if not _is_head(k, heads)}
        src_stem = state.get(f"{stem_name}.weight") if stem is not None else None
        if src_stem is not None and src_stem.ndim == 4 and src_stem.shape[1] == 1 and stem.in_channels == 3:
            # The source was itself trained on grey images fed as one channel.
            if grey_input == "replicate":  # a third of the filter on each identical channel: the same output
                state[f"{stem_name}.weight"] = src_stem.repeat(1, 3, 1, 1) / 3
            else:
                _replace_stem(net, in_channels=1)
        state = fit_positions(net, state)  # a ViT source at another image size: its position table resampled
        check_fits(net, state, source, name)
        net.load_state_dict(state, strict=False)  # check_fits has proven it strict but for the head
        for head in heads:
            init_head(net.get_submodule(head))
    stem_name, stem = first_conv(net)
    if grey_input != "replicate" and stem is None:
        raise WeightsError(f"--grey-input {grey_input}: --model {name} has no convolution that reads the image; "
                           f"use --grey-input replicate")
    if grey_input == "sum" and stem.in_channels == 3:
        summed = _replace_stem(net, in_channels=1)
        with torch.no_grad():
            summed.weight.copy_(stem.weight.sum(1, keepdim=True))
    elif grey_input == "reinit":
        _replace_stem(net, in_channels=1)
    return net


def check_fits(net: nn.Module, state: dict[str, torch.Tensor], source: Source, model: str) -> None:
    """Every backbone tensor of the model must be in the source with its shape, and nothing else may be."""
    expected = {k: v.shape for k, v in net.state_dict().items() if not _is_head(k, head_names(net))}
    # BatchNorm's step counter is absent from many published files (older torchvision ones among them);
    # PyTorch fills it in itself, and nothing is computed from it unless momentum is None.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(expected[k])}"
                  for k in expected if k in state and state[k].shape != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if mismatched:
        problems.append("shapes differ: " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, first {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, first {', '.join(unexpected[:3])}")
    known = source.model_name in MODELS or is_timm(source.model_name)
    hint = (f"; the file holds a {source.model_name}: use --model {source.model_name}"
            if known and source.model_name != model else "")
    raise WeightsError(f"{source.origin} does not fit --model {model}: {'; '.join(problems)}{hint}")


def _is_head(key: str, heads: list[str]) -> bool:
    return any(key.startswith(head + ".") for head in heads)


def init_head(head: nn.Module) -> None:
    """As the Ray Tune transfer-learning notebook does: Xavier-uniform weights, bias U(-1/sqrt(n), 1/sqrt(n))
    for n inputs. A head that is not one linear layer (a timm model's conv or identity head) keeps timm's."""
    if not isinstance(head, nn.Linear) or head.bias is None:
        return
    nn.init.xavier_uniform_(head.weight)
    bound = 1 / math.sqrt(head.in_features)
    nn.init.uniform_(head.bias, -bound, bound)


def first_conv(net: nn.Module) -> tuple[str, Optional[nn.Conv2d]]:
    """The stem's (first) convolution, by name: the layer that reads the image's channels; ("", None) for a
    model without one (some timm ViTs embed patches with a linear layer)."""
    return next(((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), ("", None))


def _replace_stem(net: nn.Module, *, in_channels: int) -> nn.Conv2d:
    """The first conv, reading `in_channels` channels, freshly initialised. A copy of the old one, not a
    plain nn.Conv2d: timm's stems are subclasses (StdConv2d standardises its weights, Conv2dSame pads as
    TensorFlow does) whose forward must stay theirs."""
    name, old = first_conv(net)
    new = copy.deepcopy(old)
    new.in_channels = in_channels
    new.weight = nn.Parameter(old.weight.new_empty(old.out_channels, in_channels, *old.kernel_size))
    new.reset_parameters()
    if isinstance(getattr(old, "scale", None), float):  # timm's ScaledStdConv2d: gamma / sqrt(fan-in), fixed at init
        new.scale = old.scale * math.sqrt(old.in_channels / in_channels)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)
    return new


# ---- freezing and unfreezing ----------------------------------------------------------------------------


def backbone_stages(net: nn.Module) -> list[tuple[str, list[nn.Parameter], list[nn.Module]]]:
    """The backbone's units from input to output, each (name, parameters, BatchNorm layers): the stem, then
    each stage (a timm model's: timm's own coarse grouping)."""
    import torchvision

    if is_timm_net(net):
        return timm_stages(net, heads=head_names(net))
    if isinstance(net, torchvision.models.ResNet):
        stages = [("stem", [net.conv1, net.bn1])] + [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in range(1, 5)]
    else:
        stages = net.transfer_stages()
    return [(name, [p for m in modules for p in m.parameters()],
             [n for m in modules for n in m.modules() if isinstance(n, _BatchNorm)]) for name, modules in stages]


@dataclass
class Unit:
    """Parameters that are frozen or trained together, with their BatchNorm layers."""
    name: str
    params: list[nn.Parameter]
    norms: list[nn.Module] = field(default_factory=list)
    new: bool = False  # the head (and a re-initialised stem): always trains, at the head's LR


def transfer_units(net: nn.Module, *, new_stem: bool) -> list[Unit]:
    """[the new part (head, plus the stem when re-initialised), then the backbone's stages from output to
    input]: the order in which gradual unfreezing wakes them. Every parameter is in exactly one unit."""
    stages = backbone_stages(net)
    claimed: set[int] = set()

    def unit(name: str, params: list[nn.Parameter], norms: list[nn.Module], new: bool = False) -> Unit:
        params = [p for p in params if id(p) not in claimed]
        claimed.update(id(p) for p in params)
        return Unit(name, params, norms, new)

    heads = head_names(net)
    head_params = [p for h in heads for p in net.get_submodule(h).parameters()]
    _, stem_params, stem_norms = stages[0]
    units = [unit("+".join(heads) + ("+stem" if new_stem else ""), head_params + (stem_params if new_stem else []),
                  stem_norms if new_stem else [], new=True)]
    units += [unit(*stage) for stage in reversed(stages[1:] if new_stem else stages)]
    loose = [name for name, p in net.named_parameters() if id(p) not in claimed]
    if loose:  # a model whose transfer_stages() misses layers: they would train (or freeze) by accident
        raise ValueError(f"{type(net).__name__}.transfer_stages() leaves out {', '.join(loose[:3])}")
    return units


def unfrozen_stages(finetune: str, epoch: int, *, stages: int, unfreeze_every: int, freeze_epochs: int) -> int:
    """How many backbone units (counted from the output) train in `epoch` (0-based)."""
    if finetune == "linear":
        return 0
    if finetune == "gradual":
        return min(stages, epoch // unfreeze_every)
    if finetune == "lp-ft":
        return 0 if epoch < freeze_epochs else stages
    return stages


def set_trainable(units: list[Unit], unfrozen: int) -> None:
    """The new units and the first `unfrozen` backbone units train; every other parameter is frozen."""
    backbone = [u for u in units if not u.new]
    for i, u in enumerate(backbone):
        for p in u.params:
            p.requires_grad_(i < unfrozen)


def freeze_norms(units: list[Unit], unfrozen: int) -> None:
    """After model.train(): the BatchNorm layers of frozen units go back to eval mode, so their running
    statistics stay the pretrained ones. (Dropout in a frozen unit stays active, as in a full run: it
    changes no weight, and regularises what trains on top of it.)"""
    for u in [u for u in units if not u.new][unfrozen:]:
        for norm in u.norms:
            norm.eval()


def load_trained_model(saved) -> nn.Module:
    """A raydist model_final.pt or best_model.pt's content (raydist.runs.checkpoints.read_model_file)
    rebuilt as the model that was trained (architecture, class count, grey stem), in eval mode."""
    config = saved.get("config") or {}
    # Files written before model arguments existed hold none: their models took none.
    model_args = saved.get("model_args", config.get("model_args"))
    net = build_model(saved["model_name"], num_classes=saved["num_classes"],
                      grey_input=config.get("grey_input", "replicate"), model_args=model_args)
    net.load_state_dict(saved["model"])
    return net.eval()
