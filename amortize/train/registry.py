"""Named registries: the only way a recipe reaches code is by a registered name.

>>> r = Registry("widget")
>>> r.register("plain", dict)
>>> r.build("plain", a=1)
{'a': 1}
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to constructors, with errors that name the valid choices.

    Args:
        kind: what the registry holds, used in messages (``"optimizer"``, ``"dataset"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str, ctor: Callable[..., T]) -> None:
        """Register ``ctor`` under ``name``.

        Raises:
            ValueError: if ``name`` is taken.
        """
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = ctor

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered under ``name``.

        Raises:
            ValueError: for an unknown name, listing the valid ones.
        """
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Call the constructor registered under ``name``."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
