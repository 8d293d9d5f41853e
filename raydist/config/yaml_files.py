"""YAML as raydist reads it: duplicate keys refused, 1e-3 read as a float (PyYAML reads it as a string),
and a file that is not a mapping named in one line (ConfigError).
"""

from __future__ import annotations

import os
import re

import yaml

from raydist.errors import ConfigError


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (YAML itself keeps the last one, silently)."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes for every file and value raydist reads:
    - numbers as YAML 1.2 writes them: `1e-3` is a float (YAML 1.1, which PyYAML follows, wants `1.0e-3` and
      reads `1e-3` as text, so one study file accepted `5e-4` for a fixed value and refused it as a bound);
    - a key given twice in one mapping is an error naming it (YAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges a mapping whose keys this one may override
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    lines = sorted({seen[key] + 1, key_node.start_mark.line + 1})
                    where = f"lines {lines[0]} and {lines[1]}" if len(lines) == 2 else f"line {lines[0]}"
                    raise DuplicateKeyError(f"key {key!r} is given twice ({where}); keep one")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_FLOAT_TAG = "tag:yaml.org,2002:float"
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml_text(text):
    """YAML text (or an open file) read with YamlLoader."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def read_yaml_mapping(path: str, kind: str, holds: str) -> dict:
    """A YAML file holding a mapping ({} when empty); any problem is a one-line ConfigError naming the file."""
    try:
        with open(os.path.expanduser(path)) as fh:
            data = load_yaml_text(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} {path}: {exc.strerror or exc}") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{kind} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{kind} {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path} must hold a mapping of {holds}, got {type(data).__name__}")
    return data
