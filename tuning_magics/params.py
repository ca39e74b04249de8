"""The tuning parameters and their rules, each written once for ``tune()``, the local trainer and ``dataset()``.

A rule takes the parameter's name and value and returns the value in its plain
type (``int`` for whole numbers, ``float`` for numbers, so a NumPy scalar from a
DataFrame is fine), or raises a one-line :class:`~tuning_magics.errors.UserError`
that names the parameter and its range.
"""

from __future__ import annotations

import math
import numbers

from .errors import UserError


def whole_at_least_1(name: str, value) -> int:
    """A whole number of at least 1 (epochs, adapter size, batch size, ...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{name} must be a whole number of at least 1, not {value!r}", field=name)
    return int(value)


def whole(name: str, value) -> int:
    """Any whole number (a seed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be a whole number, not {value!r}", field=name)
    return int(value)


def above_0(name: str, value) -> float:
    """A finite number above 0 (a learning rate or its multiplier)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise UserError(f"{name} must be a finite number above 0, not {value!r}", field=name)
    return float(value)


def from_up_to(low: float, high: float):
    """The rule for a number from ``low`` up to, not including, ``high``."""

    def rule(name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value < high:
            raise UserError(f"{name} must be a number from {low:g} up to (not including) {high:g}, not {value!r}",
                            field=name)
        return float(value)

    return rule


def one_of(*choices: str):
    """The rule for one of a few words."""
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}"

    def rule(name: str, value) -> str:
        if value not in choices:
            raise UserError(f"{name} must be {words}, not {value!r}", field=name)
        return value

    return rule


def flag(name: str, value) -> bool:
    """True or False."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False, not {value!r}", field=name)
    return value


def flag_or_auto(name: str, value) -> bool | None:
    """True, False or None (decided by the machine)."""
    if value is not None and not isinstance(value, bool):
        raise UserError(f"{name} must be True, False or None (automatic), not {value!r}", field=name)
    return value


#: The parameters every backend shares (google-genai's names), and their rules.
RULES = {
    "epochs": whole_at_least_1,
    "learning_rate": above_0,
    "learning_rate_multiplier": above_0,
    "adapter_size": whole_at_least_1,
    "beta": above_0,
}


def check(name: str, value, *, optional: bool = True):
    """``value`` checked by the rule of the tuning parameter ``name``; None (the default) passes when ``optional``."""
    return None if value is None and optional else RULES[name](name, value)
