"""Text in, the first stage of a recipe's load and the reader of every text file a user gives us:
a file's text as UTF-8 (:func:`read_utf8`: recipes, caption CSVs, sidecar captions, naming the
first bad byte), the safe YAML reader (a key given twice, a recursive anchor and a top level that
is not a mapping refused), ``key.sub=value`` command-line overrides and the plain data's own check
(every number finite): a recipe's text stage whole in :func:`read_recipe` (a file) and
:func:`recipe_data` (a mapping).

This module imports neither torch nor Composer.

>>> read_yaml("lr: 2e-3")
{'lr': 0.002}
>>> apply_overrides({"loss": {"estimator": "amortized"}}, ["loss.estimator.lr=0.002"])
{'loss': {'estimator': {'name': 'amortized', 'lr': 0.002}}}
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Union

import yaml

from amortize.options import RecipeError

__all__ = ["NotUTF8", "read_utf8", "RecipeLoader", "read_recipe", "read_recipe_text", "read_yaml", "check_top_level",
           "apply_overrides", "check_unique_overrides", "recipe_data", "check_finite"]


class NotUTF8(ValueError):
    """A file that is not UTF-8 text; the message names it, the first bad byte and its line."""


def read_utf8(path: Union[str, Path], *, bom: bool = False) -> str:
    """The text of ``path`` decoded as UTF-8.

    Args:
        path: the file.
        bom: drop a leading byte-order mark (spreadsheet programs save "CSV UTF-8" with one).

    Raises:
        NotUTF8: ``PATH is not UTF-8 text (byte N, line L: b'\\xff')``.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise NotUTF8(f"{path} is not UTF-8 text (byte {e.start}, line {line}: {data[e.start:e.start + 1]!r})") from None



class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (plain YAML keeps the last one) and
    reads exponent floats without a dot (``2e-3``, ``1e5``) as floats, as YAML 1.2 does.

    >>> yaml.load("a: 1\\na: 2\\n", Loader=RecipeLoader)
    Traceback (most recent call last):
    ...
    yaml.constructor.ConstructorError: key 'a' is given twice (line 1 and line 2); give each key once
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Build the mapping after checking that no key repeats."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class names an unhashable key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (line {seen[key]} and line {line}); give each key once")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file, which must be UTF-8.

    Raises:
        RecipeError: naming the file and the first byte that is not UTF-8.
    """
    try:
        return read_utf8(path)
    except NotUTF8 as e:
        raise RecipeError(f"{e}; save the recipe as UTF-8") from None


def check_top_level(data: Any, path: Path) -> None:
    """Refuse a recipe whose top level is not a mapping (before overrides are applied to it)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys (run_name: ..., model: ...) at the top level, "
                          f"got a {type(data).__name__}")




def read_yaml(text: str) -> Any:
    """Parse YAML safely (plain data only); ``2e-3`` is the float 0.002, as in YAML 1.2.

    Raises:
        yaml.YAMLError: for invalid YAML or a tag that names a Python object.
        RecipeError: for an anchor that refers to itself (``a: &x {b: *x}``), naming the key.
    """
    data = yaml.load(text, Loader=RecipeLoader)
    _refuse_cycles(data, "", set())
    return data


def _refuse_cycles(node: Any, key: str, open_ids: set[int]) -> None:
    """Refuse a mapping or list that contains itself (a recursive YAML alias), naming where."""
    if not isinstance(node, (dict, list)):
        return
    if id(node) in open_ids:
        raise RecipeError(f"a YAML anchor refers to itself at {key or 'the top level'}; a recipe is a tree: "
                          "copy the values instead of aliasing an enclosing section")
    open_ids.add(id(node))
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        _refuse_cycles(v, f"{key}.{k}" if key and isinstance(k, str) else f"{key}[{k}]" if key else str(k), open_ids)
    open_ids.discard(id(node))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: cannot parse the value: {e}") from None
    return key.split("."), value


def check_unique_overrides(overrides: list[str]) -> None:
    """Refuse a key given twice on one command line.

    A shell expands an unquoted brace pattern (``data.shards=/d/{00000..00331}.tar``) into one
    override per shard, and the last would silently win. Programmatic callers may repeat keys
    (later wins); the command line may not.

    Raises:
        RecipeError: naming the repeated key and how to quote the pattern.
    """
    seen: set[str] = set()
    for item in overrides:
        dotted = ".".join(_parse_override(item)[0])
        if dotted in seen:
            raise RecipeError(
                f"override key {dotted!r} is given twice; give each key once (if your shell expanded a brace "
                "pattern, quote it: 'data.shards=/data/cc3m/{00000..00331}.tar')"
            )
        seen.add(dotted)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a recipe mapping.

    Args:
        data: a parsed recipe mapping (not modified).
        overrides: e.g. ``["max_duration=20ba", "loss.estimator.lr=0.002"]``.

    Returns:
        A new mapping; keys are checked later by :func:`amortize.train.config.load_recipe_dict`.
    """
    out = copy.deepcopy(data) if data else {}
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif isinstance(nxt, str):  # a section given by name: `loss.estimator.lr=...` adds an option
                nxt = node[part] = {"name": nxt}
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return out


def check_finite(data: Any, prefix: str = "") -> None:
    """Refuse a NaN or infinite float anywhere in a parsed recipe, naming its dotted key.

    >>> check_finite({"optimizer": {"lr": float("inf")}})
    Traceback (most recent call last):
    ...
    amortize.options.RecipeError: optimizer.lr: must be a finite number, got inf
    """
    if isinstance(data, float) and not math.isfinite(data):
        raise RecipeError(f"{prefix or 'recipe'}: must be a finite number, got {data!r}")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, f"{prefix}[{i}]")


def recipe_data(data: Any) -> dict:
    """A parsed recipe (a mapping; None is the all-defaults recipe) as plain data the schema may read:
    a copy of its top level, every number in it finite (:func:`check_finite`).

    Raises:
        RecipeError: for a top level that is not a mapping, or a NaN or infinite value, naming its key.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(data).__name__}")
    check_finite(data)
    return dict(data)


def read_recipe(path: Path, overrides: list[str]) -> dict:
    """The text of a recipe file read: its UTF-8 text, the safe YAML, a top level that is a non-empty
    mapping, the ``key.sub=value`` overrides applied (then :func:`recipe_data`, as for any mapping);
    messages begin with the file's name.

    Raises:
        FileNotFoundError: if the file does not exist.
        RecipeError: for text that is not UTF-8, invalid YAML, an empty file or a bad override.
    """
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    text = read_recipe_text(path)  # names the file itself
    try:
        data = read_yaml(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    if data is None or data == {}:
        raise RecipeError(f"{path} is empty; a recipe names at least its run (start from a file in recipes/, "
                          "e.g. recipes/default.yaml)")
    check_top_level(data, path)
    try:
        return apply_overrides(data, list(overrides))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
