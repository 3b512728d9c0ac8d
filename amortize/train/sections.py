"""The recipe's component sections: declared once here, each bound once when the recipe loads.

:data:`SECTIONS` lists every recipe key that names a component as ``{name, **options}`` (or, for
``model``, ``loss``, ``divergence`` and ``eval``, the options of one constructor), the registry its name is looked up
in or the constructor it is checked against, and the values the caller knows when it builds the
component (the embedding width ``dim``, the dataset size ``num_samples``). :func:`bind_sections`
runs the binding step (:meth:`amortize.registry.Registry.bind`) on each of them once; the builders
then call :meth:`~amortize.registry.Bound.build` once per component. Nothing is built to be checked.

The options of ``model``, ``loss``, ``data``, ``optimizer``, ``scheduler``, ``divergence`` and
``eval`` are the keyword arguments of their constructors, with the constructors' defaults (and, for
``eval``, its ``tasks``: :func:`amortize.eval.callback_options.eval_tasks`): the recipe
:func:`bind_sections` returns holds each of these sections *resolved* (an :class:`Options`
mapping: what the recipe wrote, the constructor's default for the rest), made once from the bound
sections (the recipe being read is never written to), so ``recipe.optimizer.lr`` reads the
learning rate the run uses, and a checkpoint's stored recipe says every value.

To add a component section: a field on :class:`amortize.train.schema.Recipe` (or one of its
sections) typed :data:`~amortize.train.schema.SectionSpec`, and a :class:`Declared` line here.
A section inside a component's options (an estimator's ``network``, ``fit``, ``fit.optimizer``)
needs neither: its constructor annotates the option with a :class:`~amortize.registry.Part`, and
the binding step binds it with its owner, under its dotted key (``loss.estimator.fit.optimizer``).
A user's ``imports:`` extends any of the registries with :meth:`~amortize.registry.Registry.register`.

This module imports neither Composer nor torch (the registries are imported when bound).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from amortize.options import Options, RecipeError, conform_section, did_you_mean
from amortize.registry import Bound, Deferred, bind
from amortize.train.migration import MOVED, moved
from amortize.train.schema import CHOICES, Recipe

__all__ = ["Declared", "SECTIONS", "Bindings", "build_schema", "bind_recipe", "bind_sections", "bind_section", "bindings"]


def _load(target: str) -> Any:
    module, name = target.split(":")
    found = importlib.import_module(module)
    for part in name.split("."):  # a class's constructor method: "amortize.losses:ContrastiveLoss.from_sections"
        found = getattr(found, part)
    return found


@dataclass(frozen=True)
class Declared:
    """One component section of a recipe.

    Attributes:
        key: its dotted recipe key (``loss.estimator``); a list of sections (``callbacks``) binds
            each entry under ``key[i]``.
        registry: ``"module:NAME"`` of the :class:`~amortize.registry.Registry` its name is looked
            up in, or None with ``ctor``.
        ctor: ``"module:NAME"`` of the one constructor the section's options are checked against
            (``model``: :func:`amortize.models.build_model`; ``loss``:
            ``ContrastiveLoss.from_sections``), instead of a registry.
        known: values the builder knows (offered to constructors that name them).
        passed: arguments the builder always passes itself (no section may set them, unless
            ``shared`` declares them as options of the section's own).
        shared: ``"module:NAME"`` of a signature declaring the options the section holds beside
            its constructor's (with ``ctor``): checked against it with its defaults, and read by
            the builder instead of passed to the constructor (``eval.tasks``).
        many: the key holds a list of sections.
        resolved: the recipe holds the section resolved (:class:`Options`) once bound.
        name_key: where an unknown name is reported (default ``key``).
        preferred: ``(key, options)``: each of ``options`` the section leaves unset (or None)
            takes the value the constructor bound earlier at ``key`` states under that name, where
            it states one (the objective's preferred initial logit scale and bias for the
            ``model``), else the section's own constructor's default: read once, at load, in
            binding order, as the estimator's ``dim`` is handed down by the builder.
        signature: ``"module:NAME"`` of a class without Composer whose ``__init__`` the ``ctor``
            inherits (``DivergenceOptions`` of ``DivergenceGuard``): the section is checked
            against it and ``ctor`` is imported only when built, so a load does not import Composer.
        check: ``"module:function"`` called with the section's resolved options once it is bound:
            the checks across its options (``model.image_size`` against the model's patch size),
            which raise a :class:`~amortize.options.RecipeError` naming the key.
    """

    key: str
    registry: Optional[str] = None
    ctor: Optional[str] = None
    known: tuple[str, ...] = ()
    passed: tuple[str, ...] = ()
    shared: Optional[str] = None
    many: bool = False
    resolved: bool = False
    name_key: Optional[str] = None
    preferred: Optional[tuple[str, tuple[str, ...]]] = None
    signature: Optional[str] = None
    check: Optional[str] = None

    def bind(self, section: Any, key: str) -> Bound:
        """The binding step for this section (its registry or its constructor imported now).

        A section of one constructor given as a string (``model: tiny``) is that constructor's
        ``name`` where it takes one; otherwise it is refused naming the key.
        """
        if self.ctor is not None:
            ctor = (_load(self.ctor) if self.signature is None else
                    Deferred(self.ctor, inspect.signature(_load(self.signature), eval_str=True),
                             functools.partial(_load, self.ctor)))
            options = section
            if isinstance(section, str):
                params = [n for n in inspect.signature(ctor).parameters if n not in self.passed and n != "self"]
                if "name" not in params:
                    raise RecipeError(f"expected a mapping of options ({', '.join(params)}), got the string "
                                      f"{section!r}", key=key)
                options = {"name": section}
            elif not isinstance(section, Mapping):
                raise RecipeError(f"expected a mapping of options, got {type(section).__name__} {section!r}", key=key)
            return bind(ctor, options, key, what=key, passed=self.passed, known=self.known,
                        source=section, shared=None if self.shared is None else _load(self.shared))
        return _load(self.registry).bind(section, key, known=self.known, passed=self.passed, name_key=self.name_key)


SECTIONS: tuple[Declared, ...] = (
    Declared("loss", ctor="amortize.losses:ContrastiveLoss.from_sections", passed=("context",), resolved=True),
    Declared("loss.objective", "amortize.objectives:OBJECTIVES"),
    Declared("loss.estimator", "amortize.estimators:ESTIMATORS", known=("dim", "num_samples")),
    Declared("loss.layout", "amortize.comm:LAYOUTS", passed=("topology",)),  # a process group's, not a recipe's
    Declared("loss.rho", "amortize.schedules:SCHEDULES"),
    Declared("data", "amortize.data:DATASETS", passed=("tokenizer", "image_size"),
             known=("batch_size", "world_size", "seed", "num_workers", "drop_last"), resolved=True, name_key="data.name",
             check="amortize.data:check_data_options"),
    Declared("optimizer", "amortize.train.optim:OPTIMIZERS", passed=("params",), resolved=True),
    Declared("scheduler", "amortize.train.optim:SCHEDULERS", resolved=True),
    Declared("divergence", ctor="amortize.train.algorithms:DivergenceGuard", passed=("save_folder",), resolved=True,
             signature="amortize.train.guard_options:DivergenceOptions"),
    Declared("loggers", "amortize.train.integrations:LOGGERS", many=True),
    Declared("callbacks", "amortize.train.integrations:CALLBACKS", many=True),
    Declared("algorithms", "amortize.train.integrations:ALGORITHMS", many=True),
    Declared("eval", ctor="amortize.eval.callback:EvalCallback", passed=("tokenizer", "tasks", "print_table"),
             shared="amortize.eval.callback_options:eval_tasks", resolved=True, signature="amortize.eval.callback_options:EvalOptions"),
    Declared("eval.tasks", "amortize.eval.user:EVAL_TASKS", passed=("image_size",), many=True),  # a list only
    Declared("model", ctor="amortize.models:build_model", resolved=True,  # last: after the objective
             preferred=("loss.objective", ("init_logit_scale", "init_logit_bias")), check="amortize.models:check_model_options"),
)
"""Every component section of a recipe, in binding order, which is the data's: ``loss`` before the
sections inside it (once bound, its resolved options hold its constructor's defaults, the default
objective and layout among them, and the sections inside are read from them), ``eval`` before
``eval.tasks``, the objective before the ``model`` that takes its preferences."""

_BY_KEY = {d.key: d for d in SECTIONS}


def _get(recipe: Any, key: str, held: Optional[Mapping[str, Any]] = None) -> Any:
    """The value at dotted ``key``: its top-level section from ``held`` (sections already bound and
    resolved, read in binding order) where there, else from the recipe."""
    head, *rest = key.split(".")
    node = held[head] if held is not None and head in held else getattr(recipe, head)
    for part in rest:  # an option a section leaves out (``loss.estimator``) is unset
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
    return node


def _keys(d: Declared, value: Any) -> list[str]:
    """The keys ``d`` binds when its recipe value is ``value`` (none: unset)."""
    if d.many:
        return [f"{d.key}[{i}]" for i in range(len(value if isinstance(value, list) else []))]
    if value is None or (d.key == "loss.rho" and isinstance(value, (int, float))):
        return []  # a number for rho is a constant, not a section
    return [d.key]


def section_keys(recipe: Any) -> list[str]:
    """The keys of every component section ``recipe`` sets, in binding order (``model`` last)."""
    return [k for d in SECTIONS for k in _keys(d, _get(recipe, d.key))]


def _entry(value: Any, key: str) -> Any:
    """The section at ``key`` (``callbacks[0]``: the entry of the list ``value``), copied as plain data."""
    index = key.partition("[")[2]
    if index:
        i = int(index[:-1])
        value = value[i] if value is not None and i < len(value) else None
    return copy.deepcopy(dict(value) if isinstance(value, Options) else value)


def _source(recipe: Any, key: str) -> Any:
    """The section at ``key`` as the recipe holds it now (copied, so that a later change shows)."""
    return _entry(_get(recipe, key.partition("[")[0]), key)


class Bindings:
    """The bound sections of one recipe, by dotted key (``loss.estimator``, ``callbacks[0]``, ``model``).

    :func:`bind_sections` binds every section at load, in binding order. A section asked for
    that is not bound yet (a stored recipe read with ``bind=False``), or whose recipe section
    changed since it was bound (a recipe edited after loading), is bound from the recipe as it is;
    the recipe is never written to.
    """

    def __init__(self, recipe: Any, bound: Optional[Mapping[str, Bound]] = None):
        self._recipe = recipe
        self._bound: dict[str, Bound] = dict(bound or {})

    def get(self, key: str) -> Optional[Bound]:
        """The bound section at ``key`` (None: the recipe leaves it unset)."""
        source = _source(self._recipe, key) if key in section_keys(self._recipe) else None
        if source is None:
            return None
        found = self._bound.get(key)
        if found is None or found.source != source:
            found = _BY_KEY[key.split("[")[0]].bind(source, key)
            self._bound[key] = found
        return found

    def many(self, key: str) -> list[Bound]:
        """The bound entries of a list section (``callbacks``), in order."""
        value = _get(self._recipe, key)
        return [self.get(f"{key}[{i}]") for i in range(len(value if isinstance(value, list) else []))]


def bind_section(key: str, section: Any) -> Bound:
    """The binding step for one section outside a recipe, as the recipe's ``key`` is bound
    (``bind_section("optimizer", {"name": "sgd", "lr": 0.1})``)."""
    return _BY_KEY[key].bind(section, key)


def bindings(recipe: Any) -> Bindings:
    """The recipe's bound sections (those :func:`bind_sections` bound; any other bound when first asked for)."""
    found = recipe.__dict__.get("_bindings")
    if found is None:
        found = Bindings(recipe)
        object.__setattr__(recipe, "_bindings", found)
    return found


def _with_preferred(d: Declared, section: Any, bound: Mapping[str, Bound]) -> Any:
    """``section`` with the options of ``d.preferred`` it leaves unset taken from the section bound there."""
    if d.preferred is None:
        return section
    if isinstance(section, str):  # `model: tiny`, the section's name alone
        section = {"name": section}
    if not isinstance(section, Mapping):
        return section  # the binding step names the key
    at, names = d.preferred
    ctor = bound[at].ctor if at in bound else None
    section = dict(section)
    for n in names:
        if section.get(n) is None:
            value = getattr(ctor, n, None)
            if value is not None:
                section[n] = value
            else:
                section.pop(n, None)  # the section's own constructor's default
    return section


def _with_value(node: Any, path: list[str], value: Any) -> Any:
    """A copy of ``node`` (mappings and lists, as a resolved section holds them) with ``value`` at
    ``path`` (``["estimator"]``, ``["tasks", "0"]``); ``node`` is not written to."""
    if not path:
        return value
    head, *rest = path
    if isinstance(node, list):
        out = list(node)
        out[int(head)] = _with_value(out[int(head)], rest, value)
        return out
    out = dict(node)
    out[head] = _with_value(out[head], rest, value)
    return Options(out) if isinstance(node, Options) else out


def _path(key: str) -> list[str]:
    """``loss.estimator`` -> ``["loss", "estimator"]``; ``eval.tasks[0]`` -> ``["eval", "tasks", "0"]``."""
    return key.replace("[", ".").replace("]", "").split(".")


def _nested_resolved(held: Mapping[str, Options], bound: Mapping[str, Bound]) -> dict[str, Options]:
    """The resolved top-level sections with every section bound inside one (``loss.estimator``,
    ``eval.tasks[0]``) replaced by its own :attr:`~amortize.registry.Bound.stored` (its resolved
    options, its parts' included): new mappings, ``held`` not written to."""
    out = dict(held)
    for key, b in bound.items():  # in binding order: a section before those inside it
        top, *rest = _path(key)
        if rest and top in out:
            out[top] = _with_value(out[top], rest, b.stored)
    return out


def bind_sections(recipe: Any) -> Any:
    """The binding step for every component section of a recipe: each checked once, in binding
    order, nothing built, the recipe not written to.

    A section inside another (``loss.objective``) is read from its parent's resolved options, and
    the ``model`` takes the objective's preferred logit scale and bias where it leaves them unset
    (:attr:`Declared.preferred`), both from sections already bound.

    Args:
        recipe: the checked :class:`~amortize.train.schema.Recipe`.

    Returns:
        The recipe with the sections :data:`SECTIONS` marks ``resolved`` replaced by their
        resolved options (a new object: every option the run uses, what a checkpoint stores),
        each section bound inside one (``loss.estimator``) as its own resolved options, its parts
        (``fit.optimizer``) included, made once from the bound sections, which travel with it
        (:func:`bindings`).

    Raises:
        RecipeError: naming the dotted key of an unknown component, an unknown option (with the
            valid ones), a mistyped value or a required option no one gives.
    """
    bound: dict[str, Bound] = {}
    held: dict[str, Options] = {}  # top-level sections resolved so far
    for d in SECTIONS:
        value = _get(recipe, d.key, held)
        for key in _keys(d, value):
            bound[key] = d.bind(_with_preferred(d, _entry(value, key), bound), key)
            if d.check is not None:
                _load(d.check)(dict(bound[key].resolved))
        if d.resolved and d.key in bound:
            held[d.key] = Options(copy.deepcopy(dict(bound[d.key].resolved)))
    held = _nested_resolved(held, bound)
    out = replace(recipe, **held)
    for key in bound:  # what the resolved recipe holds is what they were bound from
        if _path(key)[0] in held:
            bound[key] = replace(bound[key], source=_source(out, key))
    object.__setattr__(out, "_bindings", Bindings(out, bound))
    return out


def build_schema(cls: type, data: dict, prefix: str = "") -> Any:
    """Check a mapping against a schema dataclass (keys, types, ranges, choices) and build it: the
    recipe's top level (:class:`~amortize.train.schema.Recipe`), bound as a section is against its
    constructor, its values conformed by :func:`~amortize.options.conform_section` in one call.

    Raises:
        RecipeError: naming the dotted key of an unknown key (valid ones listed), a pre-0.2 key
            (where it went), a mistyped value or one outside its range.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs: dict[str, Any] = {}
    typed: list[tuple[Any, Any, str]] = []  # the plain values, conformed together below
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in MOVED:
            raise RecipeError(moved(key))
        if k not in hints or k not in names:
            raise RecipeError(f"unknown key {key!r}{did_you_mean(k, names)}; valid keys{' of ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
        tp = hints[k]
        named = fields[k].default
        if isinstance(v, dict) and isinstance(named, str) and "name" not in v:  # {lr: ...}: the default's options
            v = {"name": named, **v}
        if isinstance(v, dict) and typing.get_origin(tp) is Union:  # Optional[section]: its own keys' errors
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise RecipeError(f"expected a mapping, got {type(v).__name__} {v!r}", key=key)
            kwargs[k] = build_schema(tp, v, key)
            continue
        old = next((f"{key}.{sub}" for sub in (v if isinstance(v, dict) else ()) if f"{key}.{sub}" in MOVED), None)
        if old is not None:  # a section's key of recipes before 0.2
            raise RecipeError(moved(old))
        typed.append((v, tp, key))
        kwargs[k] = v
    for (_, _, key), value in zip(typed, conform_section(typed, convert=True)):
        k = key.rpartition(".")[2]
        if key in CHOICES and value is not None and value not in CHOICES[key]:
            raise RecipeError(f"{value!r} is not one of {', '.join(CHOICES[key])}", key=key)
        kwargs[k] = Options(value) if isinstance(value, dict) else value  # a section: its keys read as attributes too
    obj = cls(**kwargs)
    # defaults included: a range declared next to an option holds for every value
    conform_section((), [(f.metadata["check"], getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
                         for f in fields.values() if f.metadata.get("check") is not None])
    return obj


def bind_recipe(data: dict, *, bind: bool = True) -> Any:
    """The binding stage whole: the typed top level (:func:`build_schema` against
    :class:`~amortize.train.schema.Recipe`), then, with ``bind``, every component section
    (:func:`bind_sections`).

    Args:
        data: the recipe's plain data (text in: :func:`amortize.textfiles.recipe_data`).
        bind: False types the top level only (``amortize eval`` rebuilding the towers of a stored,
            already resolved recipe).

    Raises:
        RecipeError: naming the dotted key.
    """
    recipe = build_schema(Recipe, data)
    return bind_sections(recipe) if bind else recipe
