"""TODO docstring: raydist.config.values."""

from __future__ import annotations

import re
from typing import Any, Optional

from raydist.errors import ConfigError

MODEL_ARG_PREFIX = "model_args."


def is_model_arg_key(key: Any) -> bool:
    """`model_args.l1`: one of the model's arguments, as a study searches or --set fixes it."""
    return isinstance(key, str) and key.startswith(MODEL_ARG_PREFIX) and len(key) > len(MODEL_ARG_PREFIX)


def fold_model_args(values: dict) -> dict:
    """`model_args.NAME` keys gathered into the model_args mapping, over any that `values` holds."""
    dotted = {k[len(MODEL_ARG_PREFIX):]: v for k, v in values.items() if is_model_arg_key(k)}
    plain = {k: v for k, v in values.items() if not is_model_arg_key(k)}
    return merge_config_values(plain, {"model_args": dotted}) if dotted else plain


def merge_config_values(base: dict, top: dict) -> dict:
    """`top` over `base`, argument by argument for model_args (a flag's l1 keeps a file's l2)."""
    out = {**base, **top}
    if "model_args" in base and "model_args" in top:
        out["model_args"] = {**(base["model_args"] or {}), **(top["model_args"] or {})}
    return out


def is_plain_value(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


WORKER_RANGE_RULE = "give a number of workers, or a range MIN-MAX of whole numbers with 1 <= MIN <= MAX (e.g. 2-8)"


def is_worker_range(value: Any) -> bool:
    return isinstance(value, str) and "-" in value.strip()[1:]


def split_worker_range(values: dict, what: str) -> dict:
    """`num_workers: "2-8"` -> num_workers 8, min_workers 2 (an elastic run); other values unchanged."""
    value = values.get("num_workers")
    if not is_worker_range(value):
        return values
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"{what} {value!r}: {WORKER_RANGE_RULE}")
    if values.get("min_workers") is not None:  # given beside the range in the same place: which one counts?
        other = "--min-workers" if what.startswith("--") else "min_workers"
        raise ConfigError(f"{what} {value!r} with {other} {values['min_workers']}: the range already sets the "
                          f"fewest workers ({match.group(1)}); give the range alone")
    return {**values, "num_workers": int(match.group(2)), "min_workers": int(match.group(1))}


def check_folder_name(name: Any, what: str) -> str:
    """One rule for every name that becomes a folder (a run's, a study's): visible text, no path."""
    if (not isinstance(name, str) or not name.strip() or name != name.strip() or "/" in name or "\\" in name
            or name.startswith(".") or not name.isprintable()):
        raise ConfigError(f"{what} {name!r} must be a plain folder name (visible text without spaces around "
                          f"it, no '/' or '\\', not starting with '.')")
    return name


def host_port(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a 'host:port' cluster address with a port in 1-65535, else None."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_address(address: str, flag: str = "--address") -> str:
    """'auto' or the head's host:port, for a run or a study. Not Ray Client (ray://): the driver writes
    the run's config and reads its results where it runs, so it runs on the cluster (ray job submit)."""
    if "://" in address:
        raise ConfigError(f"{flag} {address}: Ray Client addresses are not supported; run on the head node "
                          f"(ray attach, or ray job submit) with {flag} auto, or give the head's host:port")
    if address != "auto" and host_port(address) is None:
        raise ConfigError(f"{flag} {address!r} is not a cluster address; expected 'auto' or the head node's "
                          f"host:port with a port in 1-65535 (e.g. 10.0.0.10:6379)")
    return address


def require_package(module: str, flag: str) -> None:
    """A flag that needs an optional package: one ConfigError naming how to install it, before any cluster."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} needs the {module} package: pip install {module}")


def metric_mode(metric: str) -> str:
    """Which way a reported metric is better: losses, seconds and parameter counts lower ("min"), accuracies
    and throughput higher ("max")."""
    if metric.endswith("per_s"):
        return "max"
    return "min" if metric.endswith(("loss", "_s", "params")) else "max"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def saved_config_values(values: dict) -> dict:
    """A run's saved config, pinned to what it meant when it was saved. Before issue 33 (configs without
    the `ema` key), digits was fed at its stored 32 px and `--augment auto` mirrored it: a model from then is
    fed 32 px (and a resumed run goes on as it started), not today's 16 px without mirroring."""
    if "ema" in values or values.get("dataset", "digits") != "digits":
        return values
    augment = values.get("augment", "auto")
    return {**values, "input_size": values.get("input_size") or 32,
            "augment": "crop_flip" if augment == "auto" else augment}
