"""The recipe error, in a module of its own so that the recipe schema (:mod:`amortize.train.config`)
and the checks beside it (:mod:`amortize.train.validate`) share it without importing each other.
``amortize.train.config.RecipeError`` is the same class."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe key or value is invalid; the message names the dotted key."""
