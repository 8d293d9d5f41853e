"""A study file's conditional fields: `when` checked against the rest of the study, and the searched fields
ordered so that each comes after the choice it depends on (raydist.study.study_file calls it; the
distributions hold the conditions, raydist.study.study.Study.applying applies them).

    searched = check_conditions("s.yaml", searched, fixed)   # ConfigError in one line for a bad `when`
"""

from __future__ import annotations

import dataclasses

from raydist.config.fields import TrainConfig, coerce_value
from raydist.config.values import is_model_arg_key
from raydist.errors import ConfigError


def check_conditions(path: str, searched: dict, fixed: dict) -> dict:
    """Each `when` checked (it names a searched choice, by values that choice can take; no circle) and the
    fields ordered so that a field comes after the one it depends on. A condition on a field that is not
    searched (fixed by --set) is decided now: the field is searched in every trial, or in none; so is one
    whose choice is itself never searched."""
    ordered = _in_order(path, searched)
    kept: dict = {}
    for name, dist in ordered.items():
        if not dist.when:
            kept[name] = dist
            continue
        parent, allowed = dist.when
        where = f"{path}: searched.{name}.when.{parent}"
        if parent in kept:
            kept[name] = dataclasses.replace(dist, when=(parent, _values_of(where, parent, kept[parent], allowed)))
        elif parent in ordered:
            continue  # its choice is never searched (its own condition cannot hold): nor is it
        elif _holds(where, parent, fixed, allowed):
            kept[name] = dataclasses.replace(dist, when=())
    return kept


def _in_order(path: str, searched: dict) -> dict:
    """The file's order, but for a field moved to just after the searched one it depends on; a condition
    that names itself, a model argument or a circle is refused."""
    for name, dist in searched.items():
        if dist.when and dist.when[0] == name:
            raise ConfigError(f"{path}: searched.{name}.when.{name}: a field cannot depend on itself")
        if dist.when and is_model_arg_key(dist.when[0]):
            raise ConfigError(f"{path}: searched.{name}.when.{dist.when[0]}: a condition names a searched choice of "
                              f"the config, not a model argument")
    ordered: dict = {}
    while len(ordered) < len(searched):
        ready = next((n for n, d in searched.items() if n not in ordered
                      and (not d.when or d.when[0] in ordered or d.when[0] not in searched)), None)
        if ready is None:
            stuck = [n for n in searched if n not in ordered]
            raise ConfigError(f"{path}: searched {', '.join(stuck)} depend on each other in a circle (when)")
        ordered[ready] = searched[ready]
    return ordered


def _values_of(where: str, parent: str, choices, allowed: tuple) -> tuple:
    """The condition's values as the parent choice holds them; each must be one of its choices."""
    if choices.kind != "choice":
        raise ConfigError(f"{where}: a condition names a searched choice, and {parent} is searched as {choices.kind}")
    out = []
    for value in allowed:
        try:
            out.append(choices.snap(coerce_value(parent, value, where)))
        except (ValueError, ConfigError):
            raise ConfigError(f"{where}: {value!r} is not one of {parent}'s choices "
                              f"({', '.join(map(str, choices.args))})") from None
    return tuple(out)


def _holds(where: str, parent: str, fixed: dict, allowed: tuple) -> bool:
    """A condition on a field that is not searched: true or false for the whole study."""
    if parent not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise ConfigError(f"{where}: {parent} is not a config field")
    value = fixed.get(parent, getattr(TrainConfig, parent, None))
    return any(value == coerce_value(parent, v, where) for v in allowed)
