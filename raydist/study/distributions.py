"""A study file's searched distributions (uniform, loguniform, quniform, qloguniform, randint, qrandint,
choice): read and checked, with their grids and extremes, and the condition under which a field applies:

    backbone_lr_mult: {loguniform: [0.01, 1.0], when: {finetune: [full, lp-ft]}}

(raydist.study.study_file checks that the condition names a searched choice and values it can take.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raydist.config.fields import coerce_value
from raydist.config.values import is_model_arg_key
from raydist.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "qrandint", "choice")


GRID_KINDS = ("randint", "qrandint", "quniform")  # sampled as a choice of their values


MAX_GRID = 1000  # values an integer range or q-grid may have (each one is a category for HyperOpt)


_GRID_TOLERANCE = 1e-9  # relative to q: how far a float may sit from a multiple of q and still be on the grid


@dataclass(frozen=True)
class Distribution:
    """One searched dimension: `kind` is one of DISTRIBUTIONS; `args` are already coerced to the field's type."""
    kind: str
    args: tuple
    when: tuple = ()  # (field, (values...)): sampled only in trials where that searched choice took one of them

    def applies(self, values: dict) -> bool:
        """Does this field apply to a trial with these (applying) values?"""
        if not self.when:
            return True
        parent, allowed = self.when
        return parent in values and any(_same(values[parent], v) for v in allowed)

    def grid(self) -> list:
        """Every value of a randint / qrandint / quniform, low to high."""
        if self.kind == "randint":
            return list(range(self.args[0], self.args[1] + 1))
        low, high, q = self.args
        return [self._at(k) for k in range(round(low / q), round(high / q) + 1)]

    def extremes(self) -> list:
        """Values that bound what a sample can be: both ends, or every choice."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]

    def describe(self) -> str:
        text = f"{self.kind}({', '.join(map(str, self.args))})"
        if self.when:
            text += f" when {self.when[0]} in {'/'.join(map(str, self.when[1]))}"
        return text

    def accepts(self) -> str:
        """What a value of this dimension can be, in words."""
        a = self.args
        if self.kind == "choice":
            return f"one of {', '.join(map(repr, a))}"
        if self.kind == "randint":
            return f"an integer from {a[0]} to {a[1]}"
        if self.kind.startswith("q"):
            return f"a multiple of {a[2]} from {a[0]} to {a[1]}"
        return f"a number from {a[0]} to {a[1]}"

    def snap(self, value: Any) -> Any:
        """`value` exactly as this dimension samples it (the choice, the grid value); ValueError if it is none."""
        if self.kind == "choice":
            for choice in self.args:
                if _same(choice, value):
                    return choice
            raise ValueError(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(value)
        low, high = self.args[0], self.args[1]
        if self.kind in ("uniform", "loguniform"):
            if not low <= value <= high:
                raise ValueError(value)
            return float(value)
        q = self.args[2] if self.kind.startswith("q") else 1
        k = round(value / q)
        if abs(value / q - k) > _GRID_TOLERANCE or not round(low / q) <= k <= round(high / q):
            raise ValueError(value)
        return self._at(k)

    def _at(self, k: int):
        """The k-th multiple of q, written as the bounds are (ints stay ints; floats without noise)."""
        low, high = self.args[0], self.args[1]
        q = self.args[2] if self.kind.startswith("q") else 1
        if self.kind in ("randint", "qrandint"):
            return k * q
        return low if k == round(low / q) else high if k == round(high / q) else _clean(k * q)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 64 and 64.0 are, True and 1 are not."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return a == b if number(a) and number(b) else type(a) is type(b) and a == b


def _clean(x: float) -> float:
    """k * q without the float noise (3 * 0.1 is 0.30000000000000004): what a user would write."""
    return float(f"{x:.12g}")


def read_distribution(path: str, name: str, spec: Any, field_type: type) -> Distribution:
    where = f"{path}: searched.{name}"
    if isinstance(spec, dict) and "when" in spec:
        condition = _read_condition(where, spec["when"])
        dist = read_distribution(path, name, {k: v for k, v in spec.items() if k != "when"}, field_type)
        return Distribution(dist.kind, dist.args, condition)
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"{where} must be one distribution, e.g. {{loguniform: [0.01, 1.0]}}; "
                          f"known: {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a list, e.g. {kind}: {_EXAMPLES[kind]}")
    if kind == "choice":
        if is_model_arg_key(name):  # the model's builder checks the values (every one, at the corners)
            return Distribution(kind, tuple(float(v) if field_type is float and isinstance(v, int) else v
                                            for v in args))
        return Distribution(kind, tuple(coerce_value(name, v, where) for v in args))

    arity = 3 if kind.startswith("q") else 2
    if len(args) != arity:
        raise ConfigError(f"{where}: {kind} takes {arity} numbers, e.g. {kind}: {_EXAMPLES[kind]}; got {args!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args):
        raise ConfigError(f"{where}: {kind} bounds must be finite numbers, got {args!r}")
    if field_type not in (int, float):
        raise ConfigError(f"{where}: {kind} needs a numeric field; {name} is {field_type.__name__} (use choice)")
    integer = kind in ("randint", "qrandint")
    if integer and not all(float(v).is_integer() for v in args):
        raise ConfigError(f"{where}: {kind} bounds must be integers, got {args!r}")
    if field_type is int and not integer:
        raise ConfigError(f"{where}: {name} is an integer; use randint, qrandint or choice, not {kind}")
    low, high = args[0], args[1]
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise ConfigError(f"{where}: {kind} needs low > 0, got {low}")
    if arity == 3 and not args[2] > 0:
        raise ConfigError(f"{where}: the step q must be positive, got {args[2]}")
    cast = int if integer else float
    dist = Distribution(kind, tuple(cast(v) for v in args))
    if arity == 3:
        q = dist.args[2]
        if not all(abs(v / q - round(v / q)) <= _GRID_TOLERANCE for v in (low, high)):
            inner = (math.ceil(low / q - _GRID_TOLERANCE) * q, math.floor(high / q + _GRID_TOLERANCE) * q)
            hint = (f"e.g. [{_number(inner[0])}, {_number(inner[1])}, {_number(q)}]" if inner[0] < inner[1]
                    else f"no two multiples of {_number(q)} lie between them")
            raise ConfigError(f"{where}: {kind} samples the multiples of q = {_number(q)}, so both bounds must be "
                              f"multiples of it (then both are sampled); got {args!r}: {hint}")
    step = dist.args[2] if arity == 3 else 1
    if kind in GRID_KINDS and round(high / step) - round(low / step) + 1 > MAX_GRID:
        raise ConfigError(f"{where}: {kind} {args!r} has more than {MAX_GRID} values; use a coarser step "
                          f"(qrandint / quniform) or a continuous distribution")
    return dist


def _read_condition(where: str, when: Any) -> tuple:
    """`when: {field: value}` or `{field: [values...]}`: one field (a searched choice, checked with the whole
    study) and the values under which this one applies."""
    if not (isinstance(when, dict) and len(when) == 1):
        raise ConfigError(f"{where}.when must name one searched choice and its values, e.g. "
                          f"when: {{finetune: [full, lp-ft]}}; got {when!r}")
    (parent, values), = when.items()
    values = tuple(values) if isinstance(values, list) else (values,)
    if not values:
        raise ConfigError(f"{where}.when.{parent} lists no value; give the values under which the field applies")
    return (str(parent), values)


def _number(x: float):
    """A bound for a message: 32 rather than 32.0 for integers."""
    return int(x) if float(x).is_integer() else _clean(x)


_EXAMPLES = {"uniform": "[0.0, 0.3]", "loguniform": "[0.01, 1.0]", "quniform": "[0.0, 0.3, 0.05]",
             "qloguniform": "[0.01, 1.0, 0.01]", "randint": "[3, 10]", "qrandint": "[32, 256, 32]",
             "choice": "[32, 64, 128]"}
