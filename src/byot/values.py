"""Typed option values: one conversion of a value from a file or a flag to an option's type, used by the
run configuration (``byot.config``) and the model families' specs (``byot.models.registry``)."""

from __future__ import annotations

from typing import Any

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def convert(kind: str, value: Any) -> Any:
    """``value`` as ``kind`` ("bool", "int", "float" or "str"); a value of another kind (a list for a name, a
    word for a number, true for a width) raises TypeError/ValueError rather than being converted the way
    Python happens to."""
    if kind == "bool":
        if isinstance(value, str) and value.lower() in (*TRUE, *FALSE):
            return value.lower() in TRUE
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ValueError
    if isinstance(value, (bool, list, dict)):  # YAML's yes/no, or a structure: never a number or a name
        raise TypeError
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():  # also NaN and inf
            raise ValueError
        if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
            raise ValueError
        return int(value)
    return float(value) if kind == "float" else str(value)
