"""What every registry of rpat (data sets, models, objectives, evaluation measurements) does when an entry is added:
one name, one entry. Each registry is a plain dict in its own module (rpat/data/registry.py,
rpat/models/registry.py, rpat/objectives/registry.py, rpat/evaluation/measurements.py)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def add(table: dict, name: str, entry: T, kind: str) -> T:
    """``table[name] = entry``; a name registered twice is a bug in the module that registers it."""
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice")
    table[name] = entry
    return entry
