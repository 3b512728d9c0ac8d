"""One registry type for every kind of component, and the ``{name, kwargs}`` sections that build them.

Objectives, estimators, amortizer networks, schedules, Stage I objectives, layouts, optimisers,
learning-rate schedulers, models and datasets each have a :class:`Registry`. A recipe names a component
with a *section*: either a plain string (shorthand for ``{"name": ...}``) or a mapping
``{"name": ..., <constructor keyword arguments>}``. :meth:`Registry.check_section` compares a
section's keys with the constructor's signature (so a recipe is refused at load time, naming the
unknown key with a did-you-mean hint), and :meth:`Registry.build_section` calls the constructor. Defaults live only in the constructors.

>>> r = Registry("widget")
>>> r.register("plain", dict)
>>> r.build("plain", a=1)
{'a': 1}
>>> def box(width: int, depth: int = 2): return (width, depth)
>>> r.register("box", box)
>>> r.build_section({"name": "box", "depth": 3}, 1)
(1, 3)
>>> r.check_section({"name": "box", "dpeth": 3}, "shape", given=("width",))
Traceback (most recent call last):
...
amortize.registry.SectionError: shape.dpeth: unknown option of widget 'box' (did you mean 'depth'?); valid: depth
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar, Union

__all__ = ["Registry", "SectionError", "Section", "section_name"]

T = TypeVar("T")

Section = Union[str, Mapping[str, Any]]
"""A component choice: ``"name"`` or ``{"name": "name", **constructor_kwargs}``."""


class SectionError(ValueError):
    """A component section names an unknown component or an option its constructor does not take."""


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def section_name(section: Section, key: str = "section") -> tuple[str, dict[str, Any]]:
    """Split a section into its name and its keyword arguments.

    Args:
        section: ``"name"`` or ``{"name": ..., **kwargs}``.
        key: the dotted recipe key, for messages.

    Returns:
        ``(name, kwargs)``.

    Raises:
        SectionError: if the section is neither a string nor a mapping with a string ``name``.
    """
    if isinstance(section, str):
        return section, {}
    if isinstance(section, Mapping):
        kwargs = dict(section)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise SectionError(f"{key}: a component section needs a 'name' (a string), got {dict(section)!r}")
        return name, kwargs
    raise SectionError(f"{key}: expected a name or a mapping with 'name', got {type(section).__name__} {section!r}")


class Registry(Generic[T]):
    """A mapping from names to constructors, with errors that name the valid choices.

    Args:
        kind: what the registry holds, used in messages (``"objective"``, ``"estimator"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._renamed: dict[str, str] = {}

    def register(self, name: str, ctor: Callable[..., T]) -> None:
        """Register ``ctor`` under ``name``.

        Raises:
            ValueError: if ``name`` is taken.
        """
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = ctor

    def renamed(self, old: str, new: str) -> None:
        """Record that ``old`` was renamed ``new``, so that the error for ``old`` says so."""
        self._renamed[old] = new

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered under ``name``.

        Raises:
            ValueError: for an unknown name, listing the valid ones.
        """
        if name not in self._items:
            if name in self._renamed:
                raise SectionError(f"{self.kind} {name!r} was renamed {self._renamed[name]!r}")
            raise SectionError(
                f"unknown {self.kind} {name!r}{_did_you_mean(name, self._items)}; valid: {', '.join(self.names())}"
            )
        return self._items[name]

    __getitem__ = get

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Call the constructor registered under ``name``."""
        return self.get(name)(*args, **kwargs)

    def options(self, name: str, given: Iterable[str] = ()) -> list[str] | None:
        """The keyword options a section may set for ``name`` (None: the constructor takes ``**kwargs``).

        Args:
            name: a registered name.
            given: arguments the caller supplies itself (e.g. ``dim``), which a section may not set.
        """
        try:
            sig = inspect.signature(self.get(name))
        except (TypeError, ValueError):  # builtins without a signature
            return None
        params = sig.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        skip = set(given)
        return [p.name for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]

    def accepts(self, name: str, param: str) -> bool:
        """Whether the constructor of ``name`` names a keyword parameter ``param`` in its signature.

        A constructor that only takes ``**kwargs`` (``nn.Module.__init__`` of a class without its
        own ``__init__``) does not accept ``param``: caller-known values such as ``dim`` are offered
        only to constructors that ask for them by name.
        """
        try:
            params = inspect.signature(self.get(name)).parameters
        except (TypeError, ValueError):
            return False
        p = params.get(param)
        return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)

    def required(self, name: str) -> list[str]:
        """Keyword parameters of the constructor of ``name`` that have no default."""
        try:
            params = inspect.signature(self.get(name)).parameters.values()
        except (TypeError, ValueError):
            return []
        return [p.name for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]

    def check_section(self, section: Section, key: str = "section", given: Iterable[str] = ()) -> tuple[str, dict]:
        """Check a section's name and option names against the constructor, without building.

        Args:
            section: ``"name"`` or ``{"name": ..., **kwargs}``.
            key: the dotted recipe key, for messages.
            given: arguments the caller passes itself (not settable from the section).

        Returns:
            ``(name, kwargs)``.

        Raises:
            SectionError: naming the key of an unknown name or option, with a did-you-mean hint.
        """
        name, kwargs = section_name(section, key)
        try:
            self.get(name)
        except SectionError as e:
            raise SectionError(f"{key}: {e}") from None
        valid = self.options(name, given)
        if valid is not None:
            for k in kwargs:
                if k not in valid:
                    raise SectionError(
                        f"{key}.{k}: unknown option of {self.kind} {name!r}{_did_you_mean(k, valid)}; "
                        f"valid: {', '.join(valid) or '(none)'}"
                    )
        return name, kwargs

    def build_section(self, section: Section, *args: Any, key: str = "section", **given: Any) -> T:
        """Build the component a section names: ``ctor(*args, **given, **section_kwargs)``.

        Errors of the constructor itself (a value out of range) are re-raised as
        :class:`SectionError` prefixed with ``key``.
        """
        name, kwargs = self.check_section(section, key, given=given)
        try:
            return self.get(name)(*args, **given, **kwargs)
        except (TypeError, ValueError) as e:
            raise SectionError(f"{key}: {e}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
