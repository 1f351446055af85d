"""One registry shape for every pluggable piece of recnorm: cells, normalizations and tasks.

A :class:`Registry` maps lowercase snake-case names to entries. ``register`` adds one (directly or as a
decorator), ``get`` resolves a name (an unknown one raises ValueError listing the valid names), ``names``
lists them, and ``resolve`` accepts a name or an entry itself, as timm's ``create_norm`` accepts a string,
a class or a partial. Tests enrol from the registries, so a registered piece is tested like the built-in
ones.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar, Union

__all__ = ["Registry"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Named entries of one kind (``"cell"``, ``"norm"``, ``"task"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str, entry: Optional[T] = None, *, replace: bool = False) -> Union[T, Callable[[T], T]]:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates."""
        if entry is None:
            return lambda e: self.register(name, e, replace=replace)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{self.kind} names are lowercase snake case (like 'layer_norm'), got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return an entry (for tests and plugins that clean up after themselves)."""
        return self._entries.pop(self._check(name))

    def get(self, name: str) -> T:
        return self._entries[self._check(name)]

    def resolve(self, spec: Union[str, T]) -> T:
        """A registered entry by name, or ``spec`` itself when it is already an entry."""
        return self.get(spec) if isinstance(spec, str) else spec

    def names(self) -> List[str]:
        return sorted(self._entries)

    def items(self) -> List[Tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def _check(self, name: str) -> str:
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
