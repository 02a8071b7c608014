"""Type checks shared by the policy config dataclasses."""
from __future__ import annotations

import dataclasses
from typing import Any

_NUMBER_TYPES = ("int", "float", "float | None")


def check_scalar_fields(config: Any) -> None:
    """Raise ValueError naming ``Class.field`` when a bool, int, float or str field holds another kind of value.

    Config values arrive from command lines and JSON files, where ``true`` or ``"0.1"`` can come through as text:
    a str in a bool field would read as True, whatever it says. Numbers accept int or float, never bool;
    ``X | None`` fields accept None. Other field types (tuples, nested configs) are left to the class.
    """
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), str(field.type)
        if value is None and kind.endswith("| None"):
            continue
        if kind == "bool":
            ok, expected = isinstance(value, bool), "a bool (true or false)"
        elif kind in _NUMBER_TYPES:
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = is_number and (kind.startswith("float") or isinstance(value, int))
            expected = "an int" if kind.startswith("int") else "a number"
        elif kind == "str":
            ok, expected = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"{type(config).__name__}.{field.name} must be {expected}, got {value!r}")
