"""Loading a recipe does not import Composer (issue 28).

The ``divergence`` and ``eval`` sections are checked against Composer-free declarations of their
constructors' options (:class:`amortize.train.guard_options.DivergenceOptions`,
:class:`amortize.eval.callback_options.EvalOptions`); the guard and the callback are imported when
built. A recipe that names one of Composer's own loggers, callbacks or algorithms imports Composer
to check that entry's options against its signature, so those lists are emptied here.

The weights export's module (:mod:`amortize.weights_export`), which every reader of the export and
the command line's parser import, imports neither Composer nor torch.
"""

import json
import subprocess
import sys
from pathlib import Path

from amortize.eval.callback import EvalCallback
from amortize.eval.callback_options import EvalOptions
from amortize.train.guard_options import DivergenceOptions
from amortize.train.algorithms import DivergenceGuard

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
COMPOSER_LISTS = ("loggers", "callbacks", "algorithms")

SCRIPT = """
import json, sys
import yaml
from amortize.train.config import load_recipe
out = {}
for path in json.loads(sys.argv[1]):
    with open(path, encoding="utf-8") as f:
        top = yaml.safe_load(f) or {}
    load_recipe(path, [f"{k}=[]" for k in %r if top.get(k)])
    out[path] = "composer" in sys.modules
print(json.dumps(out))
""" % (COMPOSER_LISTS,)


def test_loading_every_recipe_imports_no_composer():
    assert RECIPES
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(RECIPES)], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == {p: False for p in RECIPES}


def test_the_components_take_their_declared_options():
    assert DivergenceGuard.__init__ is DivergenceOptions.__init__
    assert EvalCallback.__init__ is EvalOptions.__init__


def test_the_weights_export_module_imports_neither_composer_nor_torch():
    code = "import sys, amortize.weights_export; print(sorted(m for m in ('composer', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
