"""One config system for every command: typed dataclasses, strict keys, ``--set`` overrides.

Value checks shared by every config live here so each rule has one home.
"""

from __future__ import annotations

from typing import Any

from bulkfm.errors import ConfigError

__all__ = ["check_int"]


def check_int(name: str, value: Any, low: int) -> int:
    """An integer >= ``low`` (bools rejected: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)
