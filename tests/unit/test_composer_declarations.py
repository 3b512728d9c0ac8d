"""Composer's loggers, callbacks and algorithms are bound at load against Composer-free declarations
(:mod:`amortize.train.composer_options`), and Composer's classes are imported when built (issue 28).

The declarations restate Composer's signatures, so the first test reads the installed Composer's and
fails when a Composer release changes a parameter's name, kind or default.
"""

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amortize.registry import RecipeError, Registry
from amortize.train.composer_options import OPTIONS, declared
from amortize.train.integrations import ALGORITHMS, CALLBACKS, LOGGERS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
DEFAULT = str(ROOT / "recipes" / "default.yaml")


def _class(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _shape(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("target", sorted(OPTIONS))
def test_each_declaration_matches_the_installed_composer_signature(target):
    from composer.core import Callback

    cls = _class(target)
    expected = [] if cls.__init__ is Callback.__init__ else _shape(inspect.signature(cls))  # the stub ignores its args
    assert _shape(declared(target)) == expected


SCRIPT = """
import json, sys
from amortize.train.config import RecipeError, load_recipe
from amortize.train.integrations import ALGORITHMS, CALLBACKS, LOGGERS
recipes, default = json.loads(sys.argv[1]), sys.argv[2]
out = {"loaded": {}}
for path in recipes:
    load_recipe(path)
    out["loaded"][path] = "composer" in sys.modules
try:
    load_recipe(default, ["callbacks=[lr_monitor, {name: speed_monitor, window_sise: 10}]"])
except RecipeError as e:
    out["typo"] = str(e)
for registry in (LOGGERS, CALLBACKS, ALGORITHMS):
    for name in registry:
        if name != "estimator_monitor":  # ours, not Composer's
            try:
                registry.bind(name, "entry")
            except RecipeError:  # a required option unset, a package not installed: refused without Composer
                pass
out["bound"] = "composer" in sys.modules
sys.modules["tensorboard"] = None  # as if not installed
try:
    load_recipe(default, ["loggers=[tensorboard]"])
except RecipeError as e:
    out["missing"] = str(e)
out["composer"] = "composer" in sys.modules
print(json.dumps(out))
"""


def test_loading_every_recipe_as_written_imports_no_composer():
    named = [p for p in RECIPES if any((yaml.safe_load(Path(p).read_text()) or {}).get(k)
                                       for k in ("loggers", "callbacks", "algorithms"))]
    assert DEFAULT in named  # lr_monitor, speed_monitor: Composer's own
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(RECIPES), DEFAULT], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == {p: False for p in RECIPES}
    assert "callbacks[1].window_sise: unknown option of callback 'speed_monitor' (did you mean 'window_size'?)" \
        in out["typo"]
    assert not out["bound"]  # every Composer entry of the registries is declared
    assert ("loggers[0]: logger 'tensorboard' needs the package 'tensorboard', which is not installed: "
            "pip install 'amortize[tensorboard]'") in out["missing"]
    assert not out["composer"]


@pytest.mark.parametrize("registry, section, attribute, value", [
    (CALLBACKS, "lr_monitor", None, None),
    (CALLBACKS, {"name": "speed_monitor", "window_size": 3}, "history_samples", 3 + 1),
    (CALLBACKS, {"name": "early_stopper", "monitor": "loss", "dataloader_label": "eval"}, "monitor", "loss"),
    (ALGORITHMS, {"name": "ema", "half_life": "2ba"}, "half_life", "2ba"),
    (LOGGERS, "in_memory", None, None),
], ids=["lr_monitor", "speed_monitor", "early_stopper", "ema", "in_memory"])
def test_building_a_bound_entry_returns_the_composer_class(registry, section, attribute, value):
    built = registry.bind(section, "entry").build()
    name = section if isinstance(section, str) else section["name"]
    assert type(built) is registry.get(name)
    assert type(built).__module__.startswith("composer.")
    if attribute == "history_samples":
        assert built.history_samples.maxlen == value
    elif attribute is not None:
        assert getattr(built, attribute) == value


def test_a_declared_import_is_imported_only_when_built(tmp_path, monkeypatch):
    (tmp_path / "declared_widget.py").write_text("class Widget:\n    def __init__(self, size: int = 1):\n"
                                                  "        self.size = size\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "declared_widget", raising=False)
    r = Registry("widget")
    r.register_import("widget", "declared_widget:Widget", options=lambda size=1: None)
    bound = r.bind({"name": "widget", "size": 3}, "w")
    assert "declared_widget" not in sys.modules
    with pytest.raises(RecipeError, match=r"w.sise: unknown option of widget 'widget' \(did you mean 'size'\?\)"):
        r.bind({"name": "widget", "sise": 3}, "w")
    assert bound.build().size == 3
    assert "declared_widget" in sys.modules
