"""One registry shape for every pluggable piece of recnorm: cells, norms, tasks, studies and kernels.

A :class:`Registry` maps lowercase snake-case names to entries, and every entry carries its own name as
``entry.name`` (a :class:`~recnorm.nn.cells.CellType` subclass, a :class:`~recnorm.nn.norms.NormSpec`, a
:class:`~recnorm.experiments.tasks.base.Task` subclass, a study, a kernel implementation):

* ``register(entry)`` adds an entry under ``entry.name`` and returns it, so it also works as a class
  decorator; registering the same object twice is a no-op, a second entry under a taken name raises
  ValueError unless ``replace=True``;
* ``get(name)`` returns the entry; an unknown name raises ValueError listing the valid ones;
* ``resolve(spec)`` accepts a name or an entry itself (as timm's ``create_norm`` accepts a string, a class or
  a partial);
* ``names()`` lists the names, sorted; ``items()`` gives ``(name, entry)`` pairs; ``unregister(name)``
  removes one (for tests and plugins that clean up after themselves).

A registry may be given a ``load`` function that imports its built-in entries; it runs once, before the
first lookup (the task registry uses it, so that importing the task interface does not import every task).

Each registry keeps its public helpers (``register_norm``, ``get_cell``, ``list_tasks``, ...) as thin calls
on it. The test suite enrols cells and norms from the registries (``tests/registry_cases.py``), so a
registered piece is tested like the built-in ones.

Example::

    >>> from recnorm.registry import Registry
    >>> class Entry:
    ...     def __init__(self, name):
    ...         self.name = name
    >>> things = Registry("thing")
    >>> first = things.register(Entry("first"))
    >>> things.names(), things.get("first") is first
    (['first'], True)
    >>> things.get("second")
    Traceback (most recent call last):
    ...
    ValueError: unknown thing 'second'; expected one of ['first']
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar, Union, overload

__all__ = ["Registry"]

T = TypeVar("T")
# Lowercase snake case; a leading underscore marks a private entry (a test's, say).
_NAME = re.compile(r"^_?[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Named entries of one kind (``"cell"``, ``"norm"``, ``"task"``, ``"study"``, ``"kernel"``).

    Args:
        kind: what the entries are, for error messages.
        load: called once, before the first lookup, to register the built-in entries (optional).
    """

    def __init__(self, kind: str, load: Optional[Callable[[], None]] = None) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._load = load

    @overload
    def register(self, entry: T, *, replace: bool = False) -> T: ...

    @overload
    def register(self, entry: None = None, *, replace: bool = False) -> Callable[[T], T]: ...

    def register(self, entry: Optional[T] = None, *, replace: bool = False) -> Union[T, Callable[[T], T]]:
        """Add ``entry`` under ``entry.name`` and return it. Without ``entry``, a decorator that does so
        (``@registry.register(replace=True)``); ``@registry.register`` itself decorates a class as well."""
        if entry is None:
            return lambda e: self.register(e, replace=replace)
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"a {self.kind} needs a `name` in lowercase snake case (like 'layer_norm'), "
                             f"got {name!r} on {entry!r}")
        old = self._entries.get(name)
        if old is not None and old is not entry and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(old)}); give the new "
                             f"{self.kind} another name, or pass replace=True")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return an entry."""
        return self._entries.pop(self._check(name))

    def get(self, name: str) -> T:
        """The entry registered under ``name``; an unknown name raises ValueError listing the valid ones."""
        return self._entries[self._check(name)]

    def resolve(self, spec: Union[str, T]) -> T:
        """A registered entry by name, or ``spec`` itself when it is already an entry."""
        return self.get(spec) if isinstance(spec, str) else spec

    def names(self) -> List[str]:
        """The registered names, sorted."""
        self._ensure_loaded()
        return sorted(self._entries)

    def items(self) -> List[Tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]

    def _check(self, name: str) -> str:
        self._ensure_loaded()
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
        return name

    def _ensure_loaded(self) -> None:
        load, self._load = self._load, None  # cleared first: loading registers entries, which must not recurse
        if load is not None:
            try:
                load()
            except BaseException:
                self._load = load
                raise

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _describe(entry: object) -> str:
    return f"by {entry.__qualname__}" if isinstance(entry, type) else f"a {type(entry).__name__}"
