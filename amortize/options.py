"""Option values: the check of a value against a type annotation, and the ranges declared beside it.

The recipe loader checks a section's values against its constructor's annotations
(:func:`conform`), so ``lr: fast`` is refused as ``optimizer.lr: expected float, got str 'fast'``
before anything is built. A range belongs next to the option it bounds, as ``typing.Annotated``
metadata of the parameter (``lr: Annotated[float, POSITIVE] = 1e-3``) or of a recipe field.

>>> conform(-1.0, Annotated[float, POSITIVE], "optimizer.lr")
Traceback (most recent call last):
...
amortize.options.RecipeError: optimizer.lr: must be > 0, got -1.0
>>> conform(3, Optional[float], "x", convert=True)
3.0

This module imports neither Composer nor torch.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Literal, Optional, Union

__all__ = ["RecipeError", "Options", "keyed", "Range", "TimeString", "POSITIVE", "NONNEGATIVE", "UNIT", "AT_LEAST_ONE", "conform",
           "conform_section", "type_name", "did_you_mean"]


class RecipeError(ValueError):
    """A recipe key or value is invalid; the message starts with its dotted key.

    The one place a message gets its key: ``RecipeError("must be > 0, got -1", key="optimizer.lr")``
    reads ``optimizer.lr: must be > 0, got -1``. :func:`keyed` puts an error raised inside a
    constructor under the section's key.

    Attributes:
        key: the dotted recipe key (None: the message names what is wrong by itself).
        reason: the message without the key.
    """

    def __init__(self, reason: str, key: Optional[str] = None):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}" if key else reason)


class Options(dict):
    """A resolved section (plain ``dict``) whose keys also read as attributes: ``recipe.data.batch_size``.

    A nested mapping reads as :class:`Options` too (``recipe.model.lock_image.unlocked_groups``).
    """

    def __getattr__(self, key: str) -> Any:
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(f"the section has no option {key!r}; it has {', '.join(self) or 'none'}") from None
        return Options(value) if isinstance(value, dict) else value

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __deepcopy__(self, memo: dict) -> "Options":
        return Options(copy.deepcopy(dict(self), memo))


def keyed(key: str, error: Exception) -> RecipeError:
    """``error`` (raised while checking or building the section at ``key``) as a :class:`RecipeError` under ``key``.

    An error that already names ``key`` or a key below it is returned as it is; one that names a
    key relative to the section (a nested ``amortizer`` section) gets the full dotted key.
    """
    if isinstance(error, RecipeError) and error.key is not None:
        if error.key == key or error.key.startswith((key + ".", key + "[")):
            return error
        return RecipeError(error.reason, key=f"{key}.{error.key}")
    return RecipeError(str(error), key=key)


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric option, declared next to the option.

    ``lo``/``hi`` are bounds (None: unbounded); ``open_lo``/``open_hi`` exclude them. A list value
    (``optimizer.betas``) is checked element by element, and ``length`` fixes its length.

    >>> Range(lo=0, open_lo=True).check(-1.0, "optimizer.lr")
    Traceback (most recent call last):
    ...
    amortize.options.RecipeError: optimizer.lr: must be > 0, got -1.0
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    open_lo: bool = False
    open_hi: bool = False
    length: Optional[int] = None

    def describe(self) -> str:
        """``> 0``, ``>= 0``, ``in [0, 1)`` ..."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        if self.lo is not None:
            return f"{'>' if self.open_lo else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.open_hi else '<='} {self.hi:g}"
        return "any number"

    def _ok(self, v: float) -> bool:
        if v != v:  # NaN
            return False
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.open_hi else v > self.hi))

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`RecipeError` naming ``key`` when ``value`` (not None) is outside the range."""
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                raise RecipeError(f"expected {self.length} values, got {len(value)}: {list(value)!r}", key=key)
            for i, v in enumerate(value):
                self.check(v, f"{key}[{i}]")
            return
        if not self._ok(float(value)):
            raise RecipeError(f"must be {self.describe()}, got {value!r}", key=key)


POSITIVE = Range(lo=0, open_lo=True)
"""``> 0`` (a learning rate, an epsilon)."""
NONNEGATIVE = Range(lo=0)
"""``>= 0`` (a weight decay, a count)."""
UNIT = Range(lo=0, hi=1)
"""``in [0, 1]`` (a fraction)."""
AT_LEAST_ONE = Range(lo=1)
"""``>= 1`` (a count of rows), for a recipe's key and a function's argument alike."""

_TIME_UNITS = {"ep": "epochs", "ba": "batches", "sp": "samples", "dur": "fraction of the run"}


@dataclass(frozen=True)
class TimeString:
    """A Composer time string option (``30ep``, ``20ba``): its allowed units and whether 0 is allowed.

    Checked here without importing Composer, so ``--dry-run`` refuses ``banana`` or ``-5ep``.
    """

    units: tuple[str, ...] = ("ep", "ba", "sp")
    positive: bool = True

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`RecipeError` naming ``key`` when ``value`` is not a valid time string."""
        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z]+)\s*", str(value))
        example = " or ".join(f"10{u}" for u in self.units)
        if not m or m.group(2) not in self.units:
            raise RecipeError(f"{value!r} is not a time string; write a number and a unit "
                              f"({', '.join(f'{u} = {_TIME_UNITS[u]}' for u in self.units)}), e.g. {example}",
                              key=key)
        number, unit = float(m.group(1)), m.group(2)
        if unit in ("ep", "ba", "sp") and number != int(number):
            raise RecipeError(f"{value!r} must be a whole number of {_TIME_UNITS[unit]}", key=key)
        if number < 0 or (self.positive and number == 0):
            raise RecipeError(f"must be {'> 0' if self.positive else '>= 0'}, got {value!r}", key=key)


class _Unknown(Exception):
    """The annotation is not one this module reads (a value is then accepted as it is)."""


def type_name(tp: Any) -> str:
    """How an annotation reads in a message: ``float``, ``list of float``, ``null or int``, ``mapping``."""
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Annotated:
        return type_name(typing.get_args(tp)[0])
    if dataclasses.is_dataclass(tp) or typing.is_typeddict(tp):
        return "mapping"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        return f"list of {type_name(args[0])}"
    if tp is dict or origin in (dict, collections.abc.Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean 'lr'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _bad(value: Any, tp: Any, key: str) -> RecipeError:
    return RecipeError(f"expected {type_name(tp)}, got {type(value).__name__} {value!r}", key=key)


def _conform(value: Any, tp: Any, key: str, convert: bool) -> Any:
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        value = _conform(value, base, key, convert)
        for m in meta:
            check = getattr(m, "check", None)
            if check is not None:
                check(value, key)
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        unknown = False
        for arg in args:
            if arg is type(None):
                continue
            if isinstance(value, dict) and typing.is_typeddict(arg):  # a nested mapping: its own keys' errors
                return _conform(value, arg, key, convert)
            try:
                return _conform(value, arg, key, convert)
            except RecipeError:
                continue
            except _Unknown:
                unknown = True
        if unknown:
            raise _Unknown
        raise _bad(value, tp, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise RecipeError(f"{value!r} is not one of {', '.join(map(str, choices))}", key=key)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _bad(value, tp, key)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        out = [_conform(v, args[0] if len(args) == 1 else args[min(i, len(args) - 1)], f"{key}[{i}]", convert)
               for i, v in enumerate(value)]
        return out if convert else value
    if typing.is_typeddict(tp):  # a nested mapping of typed keys (model.lock_image)
        if not isinstance(value, dict):
            raise _bad(value, tp, key)
        hints = typing.get_type_hints(tp, include_extras=True)
        for k, v in value.items():
            if k not in hints:
                raise RecipeError(f"unknown key {f'{key}.{k}'!r}{did_you_mean(k, hints)}; valid keys of {key}: "
                                  f"{', '.join(hints)}")
            _conform(v, hints[k], f"{key}.{k}", convert)
        return dict(value) if convert else value
    if tp is dict or origin in (dict, collections.abc.Mapping) or tp is collections.abc.Mapping:
        if not isinstance(value, dict):
            raise _bad(value, tp, key)
        return dict(value) if convert else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(value, tp, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(value, tp, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if convert else value
        if isinstance(value, str) and convert:  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(value, tp, key)
    if isinstance(tp, type) and origin is None:
        if isinstance(value, tp):
            return value
        raise _bad(value, tp, key)
    raise _Unknown


def conform(value: Any, tp: Any, key: str, *, convert: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp`` and its ``Annotated`` ranges.

    Args:
        value: plain data from a recipe.
        tp: an annotation: ``int``, ``float``, ``str``, ``bool``, ``Optional[...]``, ``Union``,
            ``Literal``, ``list[...]``, ``Mapping``, a class, ``Annotated[..., Range(...)]``.
            Annotations this module does not read (``Callable``, a ``TypeVar`` ...) accept any value.
        key: the dotted recipe key, for messages.
        convert: return the value converted (``int`` -> ``float``, a list copied); False returns
            it unchanged (a constructor gets what the recipe wrote).

    Raises:
        RecipeError: naming ``key``, the expected type and what it got, or the violated range.
    """
    try:
        return _conform(value, tp, key, convert)
    except _Unknown:
        return value


def conform_section(items: Iterable[tuple[Any, Any, str]], checks: Iterable[tuple[Any, Any, str]] = (), *,
                    convert: bool = False) -> list[Any]:
    """:func:`conform` every value of one section, then run its declared checks: one call a section.

    Args:
        items: ``(value, annotation, dotted key)`` of each option the section sets.
        checks: ``(checker, value, dotted key)`` of each option with a check declared beside it
            (a :class:`Range` or :class:`TimeString` whose ``check(value, key)`` raises).
        convert: as :func:`conform`.

    Returns:
        The values of ``items``, in order, as :func:`conform` returns them.

    Raises:
        RecipeError: for the first value that does not conform or check, naming its key.
    """
    out = [conform(v, tp, key, convert=convert) for v, tp, key in items]
    for checker, value, key in checks:
        checker.check(value, key)
    return out
