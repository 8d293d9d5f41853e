"""A Ray cluster file (cluster.yaml) read and checked against Ray's own schema before `ray up` meets it:
each problem in one line naming the key, what it holds and what is accepted.
"""

from __future__ import annotations

import logging
import os

from raydist.errors import ConfigError

# What a cluster file needs at least (Ray's schema requires these two; provider needs its type).
CLUSTER_FILE_NEEDS = "a Ray cluster file is a YAML mapping with at least cluster_name and provider (with its type)"


def read_cluster_file(path: str) -> dict:
    """A cluster-launcher YAML as it is written (a mapping), or ConfigError in one line naming the file."""
    import yaml

    try:
        with open(path) as fh:
            config = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read cluster file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); {CLUSTER_FILE_NEEDS}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {problem}{at}") from None
    if config is None:
        raise ConfigError(f"{path}: the file is empty; {CLUSTER_FILE_NEEDS}")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the file holds {_yaml_kind(config)}, not a mapping of keys; {CLUSTER_FILE_NEEDS}")
    return config


def validate_cluster_file(path: str) -> dict:
    """Check a cluster-launcher YAML offline with Ray's own schema (what `ray up` checks before it starts
    anything); returns the config with Ray's defaults filled in."""
    return check_cluster_config(read_cluster_file(path), path)


def check_cluster_config(config: dict, path: str) -> dict:
    """Ray's own preparation and schema check of a cluster config read from `path`; each problem is one
    ConfigError line naming the file and the key path."""
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config  # RAY (internal): what `ray up` runs

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # it logs each default it fills in at INFO
    try:
        prepared = prepare_config(copy.deepcopy(config))
    except Exception as exc:  # noqa: BLE001 - it indexes the raw file and fails on a missing or odd key
        # Ray's schema names the key behind the failure; prepare_config's error alone is "'provider'".
        problem = schema_error(config)
        if problem is not None:
            raise ConfigError(f"{path}: {describe_schema_error(problem)}") from None
        problem = f"{exc.args[0]} missing" if isinstance(exc, KeyError) and exc.args else str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {problem}") from None
    try:
        validate_config(prepared)
    except jsonschema.ValidationError as exc:  # named as the file has it where it can (not a key Ray filled in)
        raise ConfigError(f"{path}: {describe_schema_error(schema_error(config) or exc)}") from None
    except Exception as exc:  # noqa: BLE001 - Ray's own checks beyond the schema raise ValueError and others
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    return prepared


def schema_error(config: dict):
    """The most telling error of Ray's cluster schema for `config` as written, or None."""
    import copy
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import translate_trivial_legacy_config

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as fh:  # RAY: its schema
        schema = json.load(fh)
    config = copy.deepcopy(config)
    translate_trivial_legacy_config(config)  # empty legacy keys Ray drops before its own check
    return jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(config))


def _key_path(parts) -> str:
    """provider.type, available_node_types.head.resources, setup_commands[0]."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


_SCHEMA_KINDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
                 "number": "a number", "boolean": "true or false", "null": "nothing (null)"}


def _yaml_kind(value) -> str:
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value))
    return _SCHEMA_KINDS.get(kind, f"a {type(value).__name__}")


def describe_schema_error(error) -> str:
    """One jsonschema error as 'KEY.PATH: problem'."""
    where = _key_path(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [key for key in error.validator_value if key not in error.instance]
        return ", ".join(_key_path([*error.absolute_path, key]) for key in missing) + " missing"
    if error.validator == "type":
        kinds = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        value = repr(error.instance)
        value = value if len(value) <= 60 else value[:57] + "..."
        return (f"{where or 'the file'} must be {' or '.join(_SCHEMA_KINDS.get(k, k) for k in kinds)}, "
                f"not {_yaml_kind(error.instance)} ({value})")
    return f"{where + ': ' if where else ''}{error.message.splitlines()[0]}"
