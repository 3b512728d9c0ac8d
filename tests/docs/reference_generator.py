"""The docs' reference generator (docs/gen_reference.py), loaded once for the docs tests."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    """Import ``docs/gen_reference.py`` as a module (it is a script, not part of the package)."""
    name = "amortize_docs_gen_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "gen_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
