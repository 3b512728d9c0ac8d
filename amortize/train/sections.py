"""The recipe's component sections: declared once here, each bound once when the recipe loads.

:data:`SECTIONS` lists every recipe key that names a component as ``{name, **options}``, the
registry its name is looked up in, and the values the caller knows when it builds the component
(the embedding width ``dim``, the dataset size ``num_samples``). :func:`bind_sections` runs the
binding step (:meth:`amortize.registry.Registry.bind`) on each of them once; the builders then
call :meth:`~amortize.registry.Bound.build` once per component. Nothing is built to be checked.

To add a component section: a field on :class:`amortize.train.schema.Recipe` (or one of its
sections) typed :data:`~amortize.train.schema.SectionSpec`, and a :class:`Declared` line here.
A user's ``imports:`` extends any of the registries with :meth:`~amortize.registry.Registry.register`.

This module imports neither Composer nor torch (the registries are imported when bound).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from amortize.registry import Bound, Registry, bind

__all__ = ["Declared", "SECTIONS", "Bindings", "bind_sections", "bindings", "MODEL_BUILDER"]


@dataclass(frozen=True)
class Declared:
    """One component section of a recipe.

    Attributes:
        key: its dotted recipe key (``loss.estimator``); a list of sections (``callbacks``) binds
            each entry under ``key[i]``.
        registry: ``"module:NAME"`` of the :class:`~amortize.registry.Registry` its name is looked up in.
        known: values the builder knows (offered to constructors that name them).
        passed: arguments the builder always passes itself (no section may set them).
        many: the key holds a list of sections.
    """

    key: str
    registry: str
    known: tuple[str, ...] = ()
    passed: tuple[str, ...] = ()
    many: bool = False

    def resolve(self) -> Registry:
        """The registry (importing its module)."""
        module, name = self.registry.split(":")
        return getattr(importlib.import_module(module), name)


SECTIONS: tuple[Declared, ...] = (
    Declared("loss.objective", "amortize.objectives:OBJECTIVES"),
    Declared("loss.estimator", "amortize.estimators:ESTIMATORS", known=("dim", "num_samples")),
    Declared("loss.layout", "amortize.comm:LAYOUTS"),
    Declared("loss.rho", "amortize.schedules:SCHEDULES"),
    Declared("loggers", "amortize.train.integrations:LOGGERS", many=True),
    Declared("callbacks", "amortize.train.integrations:CALLBACKS", many=True),
    Declared("algorithms", "amortize.train.integrations:ALGORITHMS", many=True),
    Declared("eval.tasks", "amortize.eval.user:EVAL_TASKS", passed=("image_size",), many=True),  # a list only
)
"""Every component section of a recipe; the ``model`` section binds against :data:`MODEL_BUILDER`."""

MODEL_BUILDER = "amortize.models:build_model"
"""The constructor the ``model`` section is checked against and built with."""


def _get(recipe: Any, key: str) -> Any:
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _model_options(recipe: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(recipe.model).items() if v is not None}


def section_keys(recipe: Any) -> list[str]:
    """The keys of every component section ``recipe`` sets, in binding order (``model`` last)."""
    keys: list[str] = []
    for d in SECTIONS:
        value = _get(recipe, d.key)
        if d.many:
            keys.extend(f"{d.key}[{i}]" for i in range(len(value if isinstance(value, list) else [])))
        elif value is not None and not (d.key == "loss.rho" and isinstance(value, (int, float))):
            keys.append(d.key)  # a number for rho is a constant, not a section
    keys.append("model")
    return keys


def _source(recipe: Any, key: str) -> Any:
    """The section at ``key`` as the recipe holds it now (copied, so that a later change shows)."""
    if key == "model":
        return _model_options(recipe)
    base, _, index = key.partition("[")
    value = _get(recipe, base)
    if index:
        i = int(index[:-1])
        value = value[i] if value is not None and i < len(value) else None
    return copy.deepcopy(value)


class Bindings:
    """The bound sections of one recipe, by dotted key (``loss.estimator``, ``callbacks[0]``, ``model``).

    A section is bound the first time it is asked for (the loader asks for all of them) and again
    only if the recipe's section changed since (a recipe edited after loading).
    """

    def __init__(self, recipe: Any):
        self._recipe = recipe
        self._bound: dict[str, Bound] = {}

    def get(self, key: str) -> Optional[Bound]:
        """The bound section at ``key`` (None: the recipe leaves it unset)."""
        source = _source(self._recipe, key) if key == "model" or key in section_keys(self._recipe) else None
        if source is None:
            return None
        found = self._bound.get(key)
        if found is None or found.source != source:
            found = self._bound[key] = _bind(key, source)
        return found

    def many(self, key: str) -> list[Bound]:
        """The bound entries of a list section (``callbacks``), in order."""
        value = _get(self._recipe, key)
        return [self.get(f"{key}[{i}]") for i in range(len(value if isinstance(value, list) else []))]


def _bind(key: str, source: Any) -> Bound:
    if key == "model":
        module, name = MODEL_BUILDER.split(":")
        ctor = getattr(importlib.import_module(module), name)
        return bind(ctor, source, "model", what="model", source=source)
    d = {d.key: d for d in SECTIONS}[key.split("[")[0]]
    return d.resolve().bind(source, key, known=d.known, passed=d.passed)


def bindings(recipe: Any) -> Bindings:
    """The recipe's bound sections (each bound when first asked for; the loader asks for all)."""
    found = recipe.__dict__.get("_bindings")
    if found is None:
        found = Bindings(recipe)
        object.__setattr__(recipe, "_bindings", found)
    return found


def bind_sections(recipe: Any, resolve: Optional[Callable[[Any, Bindings], None]] = None) -> Bindings:
    """The binding step for every component section of a recipe: each checked once, nothing built.

    Args:
        recipe: the checked :class:`~amortize.train.schema.Recipe`.
        resolve: called as ``resolve(recipe, bindings)`` after the other sections are bound and
            before the ``model`` section is (the loader fills the model's initial logit scale and
            bias from the bound objective there).

    Raises:
        RecipeError: naming the dotted key of an unknown component, an unknown option (with the
            valid ones), a mistyped value or a required option no one gives.
    """
    b = bindings(recipe)
    for key in section_keys(recipe):
        if key == "model" and resolve is not None:
            resolve(recipe, b)
        b.get(key)
    return b
