"""Fast pickling for the frozen, slotted dataclasses a route table is made of.

The control plane pickles every table once and each worker unpickles it. For a slotted frozen
dataclass, Python 3.11's own `__setstate__` looks up `fields()` and loops over them for every
object: a table of 150 routes (about 750 such objects) took 5 ms to unpickle, most of it there,
and each worker pays it before it serves the new table. `fast_state` installs a state of the
field values in definition order, with the field names looked up once per class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def fast_state(cls: type[T]) -> type[T]:
    """Class decorator (above `@dataclass(frozen=True, slots=True)`): a tuple state."""
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    # The slots' own descriptors: setting through them skips the frozen class's __setattr__
    # and the per-name lookup (measured: 1.4 us against 1.9 us for ten fields).
    setters = tuple(cls.__dict__[name].__set__ for name in names)

    def getstate(self: Any) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in names])

    def setstate(self: Any, state: tuple[Any, ...]) -> None:
        for put, value in zip(setters, state, strict=True):
            put(self, value)

    setattr(cls, "__getstate__", getstate)  # noqa: B010 - on a class mypy sees as a method
    setattr(cls, "__setstate__", setstate)  # noqa: B010
    return cls
