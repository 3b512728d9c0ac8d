"""Loading a recipe: YAML in, the schema checked, the user's imports run, every component section bound once.

A recipe is YAML read with a safe loader (:func:`~amortize.textfiles.read_yaml`: no Python
objects can be named, and ``2e-3`` is a float as in YAML 1.2) and checked against
:class:`~amortize.train.schema.Recipe` at load time: an unknown key fails with its dotted name
and the valid keys, a mistyped value with its name, the expected type and what it got.

This module imports neither Composer nor open_clip.

>>> r = load_recipe_dict({"max_duration": "20ba", "loss": {"objective": "infonce"}})
>>> r.max_duration, r.loss.objective
('20ba', 'infonce')

The component sections choose components by name with their constructor options, as in
llm-foundry: ``loss.objective: {name: linearized, pos_weight: 0.001}``, ``loss.estimator: {name:
amortized, lr: 0.001, amortizer: {name: residual_mlp, width_factor: 0.5}}``, ``callbacks:
[lr_monitor]``; ``loss`` itself holds the options of
:meth:`amortize.losses.ContrastiveLoss.from_sections`. Each is bound once at load (:mod:`amortize.train.sections`): its name looked up,
its options checked against the constructor's signature (names, types, ranges) under its dotted
key. Nothing is built at load: the constructors' own checks of their values run when the run (or
``--dry-run``) builds each component, once, and their errors carry the same key. A recipe's
top-level ``imports:`` lists Python files (relative to the recipe) or modules imported before the
sections are bound, so that their registrations are visible.

The stages, in data-flow order, one file each, called once each by :func:`load_recipe_dict`:
text in (:mod:`amortize.textfiles`: UTF-8, YAML, overrides, every number finite), the binding
(:mod:`~amortize.train.sections`: the typed top level of :class:`~amortize.train.schema.Recipe`
and every component section bound once, with :mod:`amortize.registry` and the types and ranges of
:mod:`amortize.options`), the checks across top-level keys (:mod:`~amortize.train.schema`). Beside
them: :mod:`~amortize.train.imports` (``imports:``, run before binding) and
:mod:`~amortize.train.migration` (the 0.2 key moves, read when a key is unknown).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from amortize.options import Range, RecipeError, TimeString
from amortize.train.imports import run_imports
from amortize.train.schema import Recipe, check_across_keys
from amortize.train.sections import bind_recipe
from amortize.textfiles import apply_overrides, check_unique_overrides, read_recipe, read_yaml, recipe_data

__all__ = [
    "RecipeError",
    "Range",
    "TimeString",
    "Recipe",
    "load_recipe",
    "load_recipe_dict",
    "apply_overrides",
    "check_unique_overrides",
    "recipe_to_dict",
    "recipe_to_yaml",
    "run_imports",
    "read_yaml",
]

def load_recipe_dict(data: Optional[dict], base: Optional[Path] = None, *, bind: bool = True) -> Recipe:
    """Check a parsed recipe against the schema, run its ``imports`` and bind its component sections.

    Args:
        data: the mapping (e.g. ``yaml.safe_load`` output); None is the all-defaults recipe.
        base: the folder relative file ``imports`` are read from (None: the working directory).
        bind: False checks the schema only: no ``imports`` are run and no section is bound
            (``amortize eval`` rebuilding the towers of a stored, already resolved recipe).

    Returns:
        The typed :class:`Recipe`; its bound sections travel with it to the builders.

    Raises:
        RecipeError: naming the offending dotted key, with the valid keys or the expected type.
    """
    data = recipe_data(data)  # a mapping, every number finite (amortize.textfiles)
    if bind and "imports" in data:
        if not isinstance(data["imports"], list):
            raise RecipeError(f"expected a list of files or modules, got {data['imports']!r}", key="imports")
        data["imports"] = run_imports(data["imports"], base)
    # the typed top level and every section bound once, nested parts and each section's checks across
    # its options included; the recipe made again from them (amortize.train.sections)
    recipe = bind_recipe(data, bind=bind)
    check_across_keys(recipe)  # the checks across top-level keys (amortize.train.schema)
    return recipe


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe safely, apply overrides and check it.

    Args:
        path: the ``.yaml`` file.
        overrides: ``key.sub=value`` strings.

    Returns:
        The typed :class:`Recipe`.

    Raises:
        FileNotFoundError: if the file does not exist.
        RecipeError: for an invalid key or value (named), or invalid YAML.
    """
    path = Path(path)
    data = read_recipe(path, list(overrides or []))  # names the file in its own messages
    try:
        return load_recipe_dict(data, base=path.parent)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):  # an Options section included
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain Python (dicts, lists, str, int, float, bool, None)."""
    return _plain(dataclasses.asdict(recipe))


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (round-trips through :func:`load_recipe_dict`)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
