"""A study file's conditional fields: `when` checked against the rest of the study, and the searched fields
ordered so that each comes after the choice it depends on (raydist.study.study_file calls it; the
distributions hold the conditions, raydist.study.study.Study.applying applies them).

    searched = check_conditions("s.yaml", searched, fixed)   # ConfigError in one line for a bad `when`
"""

from __future__ import annotations

import dataclasses

from raydist.config.fields import TrainConfig, coerce_value
from raydist.errors import ConfigError


def check_conditions(path: str, searched: dict, fixed: dict) -> dict:
    """Each `when` checked (it names a searched choice, by values that choice can take; no circle) and the
    fields ordered so that a field comes after the one it depends on. A condition on a field that is not
    searched (fixed by --set) is decided now: the field is searched in every trial, or in none."""
    for name, dist in list(searched.items()):
        if not dist.when:
            continue
        parent, allowed = dist.when
        where = f"{path}: searched.{name}.when.{parent}"
        if parent == name:
            raise ConfigError(f"{where}: a field cannot depend on itself")
        if parent not in searched:
            if parent not in {f.name for f in dataclasses.fields(TrainConfig)}:
                raise ConfigError(f"{where}: {parent} is not a config field")
            value = fixed.get(parent, getattr(TrainConfig, parent, None))
            if any(value == coerce_value(parent, v, where) for v in allowed):
                searched[name] = dataclasses.replace(dist, when=())
            else:
                del searched[name]
            continue
        choices = searched[parent]
        if choices.kind != "choice":
            raise ConfigError(f"{where}: a condition names a searched choice, and {parent} is searched as "
                              f"{choices.kind}")
        for value in allowed:
            try:
                choices.snap(coerce_value(parent, value, where))
            except (ValueError, ConfigError):
                raise ConfigError(f"{where}: {value!r} is not one of {parent}'s choices "
                                  f"({', '.join(map(str, choices.args))})") from None
        searched[name] = dataclasses.replace(dist, when=(parent, tuple(choices.snap(coerce_value(parent, v, where))
                                                                     for v in allowed)))
    ordered: dict = {}  # the file's order, but for a field moved to just after the one it depends on
    while len(ordered) < len(searched):
        ready = next((n for n, d in searched.items() if n not in ordered and (not d.when or d.when[0] in ordered)),
                     None)
        if ready is None:
            stuck = [n for n in searched if n not in ordered]
            raise ConfigError(f"{path}: searched {', '.join(stuck)} depend on each other in a circle (when)")
        ordered[ready] = searched[ready]
    return ordered
