"""Argument checks shared by every public constructor and function.

One place says what "a positive integer" or "a positive finite number" means, so that every
error message reads the same: ``"<name> must be <what>, got <value!r>"``.
"""

from __future__ import annotations

import math
import numbers


def integer(value, name: str, *, minimum: int = 1, allow_none: bool = False, hint: str = ""):
    """``value`` as a Python ``int`` if it is an integer (not a bool; numpy integers too)
    ``>= minimum`` (or None when allowed), else a ValueError naming ``name``. (A numpy integer
    kept as it was broke the JSON records of the layers' options.)"""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        if minimum == 1:
            kind = "a positive integer"
        elif minimum == 0:
            kind = "a non-negative integer"
        else:
            kind = f"an integer >= {minimum}"
        if allow_none:
            kind = f"None or {kind}"
        raise ValueError(f"{name} must be {kind}{hint}, got {value!r}")
    return int(value)


def number(value, name: str, *, lower: float = 0.0, strict: bool = True, hint: str = ""):
    """``value`` if it is a finite real number (not a bool) above ``lower`` (or at it, if not
    strict), else a ValueError naming ``name``."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > lower if strict else value >= lower)
    )
    if not ok:
        kind = (
            "a positive finite number" if strict and lower == 0 else f"a finite number >= {lower}"
        )
        raise ValueError(f"{name} must be {kind}{hint}, got {value!r}")
    return value
