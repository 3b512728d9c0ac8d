"""One registry type for every kind of component, and the one binding step that checks and builds a section.

Objectives, estimators, amortizer networks, schedules, Stage I objectives, layouts, optimisers,
learning-rate schedulers, models, datasets, loggers, callbacks and algorithms each have a
:class:`Registry`. A recipe names a component with a *section*: either a plain string (shorthand
for ``{"name": ...}``) or a mapping ``{"name": ..., <constructor keyword arguments>}``.

:meth:`Registry.bind` (or :func:`bind` for one constructor) is the binding step: it checks a
section once against the constructor's signature (names, types and ``Annotated`` ranges of its
options, what is required) carrying the section's dotted key, and returns a :class:`Bound` whose
:meth:`Bound.build` calls the constructor once. Values the caller knows (the embedding width
``dim``, the dataset size ``num_samples``) are offered only to constructors that name them.
Every error is a :class:`~amortize.options.RecipeError` whose message starts with the key.
Defaults live only in the constructors.

>>> r = Registry("widget")
>>> def box(width: int, depth: int = 2): return (width, depth)
>>> r.register("box", box)
>>> r.bind({"name": "box", "depth": 3}, "shape", known=("width",)).build(width=1)
(1, 3)
>>> r.bind({"name": "box", "dpeth": 3}, "shape", known=("width",))
Traceback (most recent call last):
...
amortize.options.RecipeError: shape.dpeth: unknown option of widget 'box' (did you mean 'depth'?); valid: width, depth
>>> r.bind({"name": "box", "depth": "deep"}, "shape")
Traceback (most recent call last):
...
amortize.options.RecipeError: shape.depth: expected int, got str 'deep'
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import sys
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, Optional, TypeVar, Union

from amortize.options import RecipeError, conform_section, did_you_mean, keyed

__all__ = ["Registry", "RecipeError", "SectionError", "Section", "Bound", "Part", "OneOf", "Deferred", "bind",
           "section_name", "part_of", "one_spelling"]

T = TypeVar("T")

Section = Union[str, Mapping[str, Any]]
"""A component choice: ``"name"`` or ``{"name": "name", **constructor_kwargs}``."""

SectionError = RecipeError
"""The 0.2 name of :class:`~amortize.options.RecipeError` (the same class)."""


def section_name(section: Section, key: str = "section") -> tuple[str, dict[str, Any]]:
    """Split a section into its name and its keyword arguments.

    Args:
        section: ``"name"`` or ``{"name": ..., **kwargs}``.
        key: the dotted recipe key, for messages.

    Returns:
        ``(name, kwargs)``.

    Raises:
        RecipeError: if the section is neither a string nor a mapping with a string ``name``.
    """
    if isinstance(section, str):
        return section, {}
    if isinstance(section, Mapping):
        kwargs = dict(section)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f"a component section needs a 'name' (a string), got {dict(section)!r}", key=key)
        return name, kwargs
    raise RecipeError(f"expected a name or a mapping with 'name', got {type(section).__name__} {section!r}", key=key)


def _signature(ctor: Callable) -> Optional[inspect.Signature]:
    """The constructor's signature with its annotations evaluated (None: it has none to read)."""
    for eval_str in (True, False):
        try:
            return inspect.signature(ctor, eval_str=eval_str)
        except (TypeError, ValueError):  # builtins without a signature
            return None
        except Exception:  # an annotation that does not evaluate: read the signature without types
            continue
    return None


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class Bound(Generic[T]):
    """A section checked against its constructor, ready to be built once.

    Attributes:
        key: the section's dotted recipe key (``loss.estimator``).
        name: the registered name (or the constructor's name).
        what: how messages name the component (``estimator 'amortized'``).
        ctor: the constructor.
        options: the section's keyword arguments, as the recipe wrote them.
        passed: the parameters the caller always passes itself.
        known: the caller-known values the constructor names (offered when the section does not set them).
        needs: of those, the ones the constructor requires and the section does not set.
        source: the section as given (a name or a mapping), to tell whether a recipe changed it.
        shared: the options of the registry's shared signature (``data.batch_size``,
            ``optimizer.logit_scale_lr``), the section's values with that signature's defaults for
            the rest; not passed to the constructor (the caller uses them).
        resolved: every option the section may set, as the recipe wrote it or else the default
            of the signature that declares it (plain data: lists, mappings, scalars), ``name``
            first for a registry's section; a part's value is the part's own :attr:`stored`
            (recursively), written in one spelling where the constructor declares aliases
            (``option_aliases``, see :func:`bind`); what a resolved recipe stores.
        parts: the options annotated as a :class:`Part` (a nested section: an estimator's
            ``network``, its ``fit`` and the fit's ``optimizer``), each bound with this section
            under its own dotted key (``loss.estimator.fit.optimizer``), the default included;
            :meth:`build` hands them to the constructor as bound sections, which it builds
            (once, or at every re-initialisation).
    """

    key: str
    name: str
    what: str
    ctor: Callable[..., T]
    options: Mapping[str, Any]
    passed: tuple[str, ...] = ()
    known: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    source: Any = field(default=None, compare=False)
    shared: Mapping[str, Any] = field(default_factory=dict)
    resolved: Mapping[str, Any] = field(default_factory=dict, compare=False)
    parts: Mapping[str, "Bound"] = field(default_factory=dict, compare=False)

    @property
    def stored(self) -> Any:
        """What a resolved recipe stores for this section: a copy of :attr:`resolved`, or the
        section's name alone where it has no other option (``normalizer: online``), the spelling
        every owner of a section accepts."""
        if set(self.resolved) == {"name"}:
            return self.resolved["name"]
        return copy.deepcopy(dict(self.resolved))

    def takes(self, param: str) -> bool:
        """Whether the constructor names the caller-known value ``param`` (``num_samples``)."""
        return param in self.known

    def with_parts(self, **built: Any) -> "Bound[T]":
        """This section with the values of some options replaced by the components built from them.

        For a section whose options are sections bound on their own (``loss.objective`` inside
        ``loss``): the caller builds those once and :meth:`build` hands the constructor the built
        components instead of their sections.
        """
        return replace(self, options={**self.options, **built})

    def with_option(self, path: str, value: Any) -> "Bound[T]":
        """This section with the option at ``path`` (``optimizer.lr``, through its parts) set to ``value``.

        For a preset's flat alias (``lr`` of ``amortized`` is ``fit.optimizer.lr``): the value was
        checked against the alias's annotation (the target's) when the alias was bound.
        :attr:`resolved` says the new value too.
        """
        head, _, rest = path.partition(".")
        if rest:
            part = self.parts[head].with_option(rest, value)
            return replace(self, parts={**self.parts, head: part}, resolved=self._resolved_with(head, part.stored))
        if head in self.parts:  # a whole nested section: the value is its Bound
            return replace(self, parts={**self.parts, head: value}, resolved=self._resolved_with(head, value.stored))
        return replace(self, options={**self.options, head: value}, resolved=self._resolved_with(head, _plain(value)))

    def _resolved_with(self, name: str, value: Any) -> dict[str, Any]:
        """A copy of :attr:`resolved` with option ``name`` set to ``value`` (left out: not plain data)."""
        out = dict(self.resolved)
        if value is _NOT_PLAIN:
            out.pop(name, None)
        else:
            out[name] = value
        return out

    def without(self, *names: str) -> "Bound[T]":
        """This section without the options ``names``, which the caller then passes itself at
        every :meth:`build` (a fit's inner optimiser gets its ``lr`` scaled by the world size)."""
        return replace(self, options={k: v for k, v in self.options.items() if k not in names},
                       passed=tuple(dict.fromkeys((*self.passed, *names))))

    def option(self, name: str, default: Any = None) -> Any:
        """The value of option ``name``: the section's, else the constructor's default, else ``default``."""
        if name in self.options:
            return self.options[name]
        sig = _signature(self.ctor)
        p = None if sig is None else sig.parameters.get(name)
        return default if p is None or p.default is p.empty else p.default

    def build(self, *args: Any, **values: Any) -> T:
        """Call the constructor once: ``ctor(*args, **passed, **known values it names, **options, **parts)``.

        Args:
            *args: positional arguments the caller always passes (parameter groups, a model).
            **values: the ``passed`` arguments, and the caller-known values: each of those goes only
                to a constructor that names it, and only where the section does not set it; None
                counts as unknown.

        Raises:
            RecipeError: under this section's key, for a required known value that is None or a
                constructor's own ``TypeError``/``ValueError``.
        """
        given = {k: v for k, v in values.items() if k in self.passed
                 or (k in self.known and k not in self.options and v is not None)}
        for param in self.needs:
            if param not in given:
                raise RecipeError(f"{self.what} needs {param!r}, which is not known here: set {self.key}.{param}",
                                  key=self.key)
        try:
            return self.ctor(*args, **given, **self.options, **self.parts)
        except (TypeError, ValueError) as e:
            raise keyed(self.key, e) from None


@dataclass(frozen=True)
class Part:
    """``Annotated`` metadata of a constructor option whose value is a section of its own.

    ``network: Annotated[Section, Part("amortize.amortizers:AMORTIZERS", passed=("dim",), rebuilt=True)]``:
    the binding step binds the option's section (the recipe's, else the default) under its dotted
    key (``loss.estimator.network``) with its owner, so a typo inside it fails at load, and
    :meth:`Bound.build` hands the owner the :class:`Bound`; the owner builds it with :meth:`take`.

    Attributes:
        registry: the :class:`Registry` (or ``"module:NAME"``, imported when first bound) the
            section names a component of; or None with ``ctor``.
        ctor: the one constructor the option's mapping holds the options of (an estimator's
            ``fit``: :class:`~amortize.estimators.normalizer.fit.Fit`); None stands for ``{}``.
        passed: what the owner passes itself when it builds the part (``dim``, ``params``).
        known: values the owner offers to a part that names them (an inner estimator's ``dim``).
        rebuilt: the owner builds the part more than once (networks at every re-initialisation,
            the inner optimiser): :meth:`take` returns the :class:`Bound`, not a component.
        base: the section a given one merges into (a preset's): ``{inner_steps: 5}`` keeps the
            preset's other fit options; a section naming another component replaces it.
    """

    registry: Any = None
    ctor: Any = None
    passed: tuple[str, ...] = ()
    known: tuple[str, ...] = ()
    rebuilt: bool = False
    base: Any = None

    def __repr__(self) -> str:
        what = (getattr(self.registry, "kind", self.registry) if self.ctor is None
                else getattr(self.ctor, "__name__", self.ctor))
        return f"Part({what}{', rebuilt' if self.rebuilt else ''})"

    def _registry(self) -> "Registry":
        return _load(self.registry) if isinstance(self.registry, str) else self.registry

    def is_section(self, value: Any) -> bool:
        """Whether ``value`` is a section this part binds (not a number, nor a component already built)."""
        return isinstance(value, (str, Mapping)) or (value is None and self.ctor is not None)

    def bind(self, value: Any, key: str) -> "Bound":
        """The binding step for the part's section ``value`` (merged into :attr:`base`) under ``key``."""
        if self.base is not None:
            value = merge_section(self.base, value)
        if self.ctor is not None:
            if value is not None and not isinstance(value, Mapping):
                raise RecipeError(f"expected a mapping of options, got {type(value).__name__} {value!r}", key=key)
            return bind(self.ctor, dict(value or {}), key, what=key, passed=self.passed, known=self.known,
                        source=value)
        return self._registry().bind(value, key, passed=self.passed, known=self.known)

    def take(self, value: Any, key: str, **given: Any) -> Any:
        """What the owner keeps of its option ``value``: a :class:`Bound` built (or, if
        :attr:`rebuilt`, kept as it is); a section bound first (the Python face: a constructor
        called without a recipe); anything else (a number, a built component) as it is.

        Args:
            given: the values the part is built with (``passed``, and ``known`` ones it names).
        """
        if not isinstance(value, Bound):
            if not self.is_section(value):
                return value
            value = self.bind(value, key)
        if self.rebuilt:
            return value
        return value.build(**{k: v for k, v in given.items() if k in self.passed or k in self.known})


@dataclass(frozen=True)
class OneOf:
    """``Annotated`` metadata of a string option that names a component of a registry without
    options (a fit's Stage I ``objective``): the name is looked up when the section is bound."""

    registry: Any

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`RecipeError` naming ``key`` for a name the registry does not hold."""
        registry = _load(self.registry) if isinstance(self.registry, str) else self.registry
        try:
            registry.get(value)
        except RecipeError as e:
            raise keyed(key, e) from None


def part_of(annotation: Any) -> Optional[Part]:
    """The :class:`Part` an option's annotation declares (None: a plain option)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Part)), None)
    return None


def merge_section(base: Any, override: Any) -> Any:
    """``override`` on top of the section ``base``: mappings merge key by key, a nested section too;
    an override naming another component replaces it; ``None`` keeps ``base``."""
    if override is None:
        return copy.deepcopy(base)
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        if "name" in override and override.get("name") != base.get("name"):
            return dict(override)
        out = dict(base)
        for k, v in override.items():
            out[k] = merge_section(base[k], v) if k in base and base[k] is not None else v
        return out
    if isinstance(base, Mapping) and isinstance(override, str) and "name" in base:
        return {"name": override} if override != base["name"] else dict(base)
    return override


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Deferred:
    """A constructor imported when it is called: binding a section reads its declared options
    (``__signature__``), so a recipe loads without importing the module the constructor lives in.

    Args:
        target: where the constructor lives, ``"module:NAME"``: its name, and what it equals.
        signature: the constructor's options, declared where importing is cheap (Composer-free).
        load: imports the constructor (at every call; Python caches the module).
    """

    def __init__(self, target: str, signature: inspect.Signature, load: Callable[[], Callable]):
        self.target = target
        self.__name__ = target.rpartition(":")[2].rpartition(".")[2]
        self.__signature__ = signature
        self._load = load

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Deferred) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)

    def __repr__(self) -> str:
        return f"Deferred({self.target!r})"


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """A default as plain recipe data (tuples as lists), or ``_NOT_PLAIN`` for an object a recipe cannot hold."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, Mapping):
        items = {str(k): _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


def _set_path(options: Any, path: list[str], value: Any) -> dict[str, Any]:
    """A copy of the mapping ``options`` with ``value`` at ``path`` (through nested mappings).

    Raises:
        KeyError: naming the step of ``path`` that is not an option there.
    """
    head, *rest = path
    if not isinstance(options, Mapping) or head not in options:
        raise KeyError(head)
    out = dict(options)
    out[head] = _set_path(options[head], rest, value) if rest else value
    return out


def one_spelling(resolved: Mapping[str, Any], aliases: Mapping[str, str], given: Iterable[str],
                 key: str) -> dict[str, Any]:
    """Resolved options whose aliases stand for other options, written in one spelling.

    An alias whose path starts at an option ``resolved`` holds (``neuclip``'s ``num_prototypes``,
    ``network.num_prototypes``) is stored at that path only: its value goes there where the
    section set it (an alias set wins over its path, as the constructor applies them), and it is
    dropped where not (the path holds the value built). An alias whose path starts at an option
    the signature hides (``amortized``'s ``lr``: its ``fit`` is not offered) is that value's one
    spelling, kept. Binding the result builds what binding the section builds.

    Args:
        resolved: the section's resolved options, each part's resolved options as its value.
        aliases: flat option -> the dotted path of the option it stands for.
        given: the options the section set.
        key: the section's dotted key, for messages.

    Returns:
        A new mapping (``resolved`` is not written to).

    Raises:
        RecipeError: naming ``key.alias`` set where its path is no option of the section's part
            (``restart_every`` with ``restart: none``).
    """
    given = set(given)
    out = copy.deepcopy(dict(resolved))
    for alias, path in aliases.items():
        head = path.split(".")[0]
        if head not in out or alias not in out:  # the path hidden: the alias is the one spelling
            continue
        value = out.pop(alias)
        if alias in given:
            try:
                out = _set_path(out, path.split("."), value)
            except KeyError:
                raise RecipeError(f"stands for {path}, an option {key}.{head} does not have "
                                  f"({key}.{head}: {out[head]!r})", key=f"{key}.{alias}") from None
    return out


def _named(sig: Optional[inspect.Signature]) -> dict[str, inspect.Parameter]:
    return {} if sig is None else {n: p for n, p in sig.parameters.items() if p.kind in _NAMED}


def bind(ctor: Callable[..., T], options: Mapping[str, Any], key: str, *, name: Optional[str] = None,
         what: Optional[str] = None, passed: Iterable[str] = (), known: Iterable[str] = (), source: Any = None,
         shared: Optional[Callable] = None, annotations: Optional[Mapping[str, Any]] = None) -> Bound[T]:
    """The binding step: check ``options`` against ``ctor``'s signature once and return the :class:`Bound`.

    Args:
        ctor: the constructor.
        options: the section's keyword arguments.
        key: the section's dotted recipe key, for messages.
        name: the registered name (default: the constructor's name).
        what: how messages name the component (default: ``name``).
        passed: parameters the caller always passes itself (positional ones included); a section
            may not set them.
        known: values the caller knows (``dim``, ``num_samples``); offered to the constructor only
            if it names them, and a section may set them instead.
        source: the section as written (kept on the result).
        shared: a function whose signature declares options every constructor of a registry takes
            beside its own (the data loader's ``batch_size``): the section's options it names are
            checked against it, with its defaults, and kept in :attr:`Bound.shared`.
        annotations: types and ranges by option name that replace the constructor's own
            annotations (a registry of third-party classes declares its ranges here, in one place).

    The result's :attr:`Bound.resolved` holds each part's :attr:`Bound.stored` as the part's
    value. A constructor whose options have two spellings (a preset's flat alias beside the path
    it stands for: ``neuclip``'s ``lr`` is ``fit.optimizer.lr``) declares them as
    ``ctor.option_aliases`` (``{alias: "dotted.path"}``): its resolved options are written in one
    spelling by :func:`one_spelling`.

    Raises:
        RecipeError: naming ``key.option`` of an unknown option (with a did-you-mean hint), a
            value of the wrong type or outside its ``Annotated`` range, or ``key`` for a required
            option that neither the section nor the caller gives.
    """
    name = name or getattr(ctor, "__name__", repr(ctor))
    what = what or name
    sig = _signature(ctor)
    options = dict(options)
    common = _named(_signature(shared)) if shared is not None else {}
    if sig is None and not common:
        return Bound(key, name, what, ctor, options, tuple(passed), source=source, resolved=dict(options))
    params = _named(sig)  # a shared option may share a name with one the caller passes or knows (data.batch_size)
    open_kwargs = sig is not None and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    passed = tuple(passed)
    settable = [*common, *(n for n in params if n not in passed and n not in common)]
    types = dict(annotations or {})
    mine = {k: v for k, v in options.items() if k not in common}  # the constructor's own; the rest is shared
    typed = []
    for k, v in options.items():
        p = common.get(k) or params.get(k)
        if (k in mine and k in passed) or (p is None and not open_kwargs):
            raise RecipeError(f"unknown option of {what}{did_you_mean(k, settable)}; valid: "
                              f"{', '.join(settable) or '(none)'}", key=f"{key}.{k}")
        if p is not None:
            typed.append((v, types.get(k, p.annotation), f"{key}.{k}"))
    # the shared defaults hold for every value (a range beside an option)
    typed += [(p.default, types.get(n, p.annotation), f"{key}.{n}") for n, p in common.items()
              if n not in options and p.default is not p.empty]
    if typed:  # a section without options (a name) has nothing to conform
        conform_section(typed)
    takes = tuple(k for k in known if k in params)
    unset = [n for n, p in params.items() if p.default is p.empty and n not in mine and n not in passed]
    missing = [n for n in [*unset, *(n for n, p in common.items() if p.default is p.empty and n not in options)]
               if n not in takes]
    if missing:
        raise RecipeError(f"{what} needs {', '.join(map(repr, missing))}: set "
                          f"{', '.join(f'{key}.{n}' for n in missing)}", key=key)
    needs = [n for n in unset if n in takes]
    own = {n: p for n, p in params.items() if n not in common and n not in passed and (n not in takes or n in mine)}
    resolved: dict[str, Any] = {}
    for n, p in {**common, **own}.items():
        value = _plain(options[n] if n in options else p.default)
        if value is not _NOT_PLAIN and value is not inspect.Parameter.empty:
            resolved[n] = value
    resolved.update({k: v for k, v in mine.items() if k not in params})  # through **kwargs
    parts: dict[str, Bound] = {}
    for n, p in params.items():  # nested sections: bound here, under their own keys, the default included
        part = part_of(types.get(n, p.annotation))
        value = mine[n] if n in mine else p.default
        if part is not None and n not in passed and (n in mine or p.default is not p.empty) and part.is_section(value):
            parts[n] = part.bind(value, f"{key}.{n}")
    for n, b in parts.items():  # a part stored as its own resolved options, nested parts included
        if n in resolved:
            resolved[n] = b.stored
    aliases = getattr(ctor, "option_aliases", None)
    if isinstance(aliases, Mapping):
        resolved = one_spelling(resolved, aliases, tuple(mine), key)
    mine = {k: v for k, v in mine.items() if k not in parts}
    return Bound(key, name, what, ctor, mine, passed, takes, tuple(needs), source=source,
                 shared={n: options.get(n, p.default) for n, p in common.items()}, resolved=resolved, parts=parts)


def _not_installed(what: str, package: str, install: Optional[str]) -> RecipeError:
    how = f": {install}" if install else ""
    return RecipeError(f"{what} needs the package {package!r}, which is not installed{how}")


def _installed(package: str) -> bool:
    """Whether the top-level package of ``package`` can be imported, found without importing it."""
    top = package.partition(".")[0]
    if top in sys.modules:
        return sys.modules[top] is not None  # None: marked missing
    return importlib.util.find_spec(top) is not None


@dataclass(frozen=True)
class _Import:
    """A constructor registered by where it lives, imported when first asked for.

    With ``options`` (its declared signature) a section naming it is bound without importing it:
    the packages it needs are looked for, not imported, and it is imported when built.
    """

    target: str
    needs: Optional[str] = None
    install: Optional[str] = None
    options: Optional[inspect.Signature] = None

    def load(self, what: str) -> Callable:
        """Import the constructor.

        Raises:
            RecipeError: naming ``what``, the missing package and the command that installs it.
        """
        module, _, attr = self.target.partition(":")
        for package in (self.needs, module):
            if package is None:
                continue
            try:
                found = importlib.import_module(package)
            except ImportError as e:
                raise _not_installed(what, e.name or package, self.install) from None
        return getattr(found, attr)

    def deferred(self, what: str) -> Deferred:
        """The constructor as :class:`Deferred` (its declared options), imported when built.

        Raises:
            RecipeError: as :meth:`load`, for a package that is not installed (its top-level name).
        """
        for package in (self.needs, self.target.partition(":")[0]):
            if package is not None and not _installed(package):
                raise _not_installed(what, package.partition(".")[0], self.install)
        return Deferred(self.target, self.options, functools.partial(self.load, what))


class Registry(Generic[T]):
    """A mapping from names to constructors, with errors that name the valid choices.

    Args:
        kind: what the registry holds, used in messages (``"objective"``, ``"estimator"``).
        shared: a function whose signature declares the options every entry takes beside its
            own, with their defaults and ranges (the data loader's ``batch_size``); see :func:`bind`.
        annotations: types and ranges by option name for entries whose constructors are not
            ours (torch's optimisers): they replace the constructor's annotations when a section
            is bound, so each range is declared once, beside the registry.
        name_alias: a key a section may say instead of ``name`` (schedules: ``kind``, their
            spelling before 0.2).
    """

    def __init__(self, kind: str, *, shared: Optional[Callable] = None,
                 annotations: Optional[Mapping[str, Any]] = None, name_alias: Optional[str] = None):
        self.kind = kind
        self.shared = shared
        self.annotations = dict(annotations or {})
        self.name_alias = name_alias
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

    def register_import(self, name: str, target: str, *, needs: Optional[str] = None,
                        install: Optional[str] = None, options: Any = None) -> None:
        """Register a constructor imported when first asked for: ``target`` is ``"module:attribute"``.

        Args:
            name: the registered name.
            target: where the constructor lives (``"composer.loggers:TensorboardLogger"``).
            needs: a package it needs beyond its module (``"tensorboard"``), checked when it is asked for.
            install: the command that installs what is missing, for the message.
            options: the constructor's options, declared without importing it (an
                :class:`inspect.Signature`, or a callable whose signature they are): :meth:`bind`
                checks a section against them and finds its packages without importing them; the
                constructor is imported when the bound section is built. None: :meth:`bind` imports it.
        """
        if options is not None and not isinstance(options, inspect.Signature):
            options = inspect.signature(options, eval_str=True)
        self.register(name, _Import(target, needs, install, options))

    def renamed(self, old: str, new: str) -> None:
        """Record that ``old`` was renamed ``new``, so that the error for ``old`` says so."""
        self._renamed[old] = new

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered under ``name``.

        Raises:
            ValueError: for an unknown name, listing the valid ones.
        """
        ctor = self._entry(name)
        if isinstance(ctor, _Import):  # imported modules are cached by Python; a missing package shows each time
            ctor = ctor.load(f"{self.kind} {name!r}")
        return ctor

    def _entry(self, name: str) -> Any:
        """What is registered under ``name`` (an :class:`_Import` not imported), or the :meth:`get` error."""
        if name not in self._items:
            if name in self._renamed:
                raise RecipeError(f"{self.kind} {name!r} was renamed {self._renamed[name]!r}")
            raise RecipeError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; valid: {', '.join(self.names())}"
            )
        return self._items[name]

    def _unbuilt(self, name: str) -> Callable[..., T]:
        """The constructor of ``name`` as binding reads it: :meth:`get`'s, or a :class:`Deferred`
        for one registered by import with its declared ``options``."""
        entry = self._entry(name)
        if isinstance(entry, _Import) and entry.options is not None:
            return entry.deferred(f"{self.kind} {name!r}")
        return self.get(name)

    __getitem__ = get

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Call the constructor registered under ``name``."""
        return self.get(name)(*args, **kwargs)

    def bind(self, section: Section, key: str = "section", *, passed: Iterable[str] = (),
             known: Iterable[str] = (), name_key: Optional[str] = None) -> Bound[T]:
        """The binding step for a section naming one of this registry's components (see :func:`bind`).

        Args:
            name_key: the key an unknown name is reported under (default ``key``; ``data.name``).

        Raises:
            RecipeError: naming ``key`` for an unknown name (valid ones listed, did-you-mean hint),
                or ``key.option`` for a bad option.
        """
        alias = self.name_alias
        if alias and isinstance(section, Mapping) and alias in section and "name" not in section:
            section = {("name" if k == alias else k): v for k, v in section.items()}
        name, options = section_name(section, key)
        try:
            ctor = self._unbuilt(name)
        except RecipeError as e:
            raise keyed(name_key or key, e) from None
        bound = bind(ctor, options, key, name=name, what=f"{self.kind} {name!r}", passed=passed, known=known,
                     source=section, shared=self.shared, annotations=self.annotations)
        return replace(bound, resolved={"name": name, **bound.resolved})

    def accepts(self, name: str, param: str) -> bool:
        """Whether the constructor of ``name`` names a keyword parameter ``param`` in its signature.

        A constructor that only takes ``**kwargs`` (``nn.Module.__init__`` of a class without its
        own ``__init__``) does not accept ``param``: caller-known values such as ``dim`` are offered
        only to constructors that ask for them by name.
        """
        sig = _signature(self._unbuilt(name))
        p = None if sig is None else sig.parameters.get(param)
        return p is not None and p.kind in _NAMED

    def build_section(self, section: Section, *args: Any, key: str = "section", **given: Any) -> T:
        """Bind a section and build it at once: ``ctor(*args, **given, **section_options)``.

        For a component built without a recipe (:func:`amortize.amortizers.build_amortizer`); the
        recipe loader binds at load, nested sections included (:class:`Part`), and builds later.
        ``given`` may not be set by the section.
        """
        return self.bind(section, key, passed=given).build(*args, **given)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
