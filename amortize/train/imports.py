"""A recipe's ``imports:``: the user's Python files or modules, imported so that their registrations are visible."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional

from amortize.options import RecipeError

__all__ = ["run_imports"]


def run_imports(imports: list, base: Optional[Path] = None) -> list[str]:
    """Import a recipe's ``imports:`` so that their registrations are visible; return them resolved.

    Args:
        imports: Python files (``.py``, relative to ``base``) or module names.
        base: the recipe file's folder (None: the working directory).

    Returns:
        The entries with files made absolute (what the stored recipe keeps).

    Raises:
        RecipeError: naming an entry that is not a string, a missing file, or an import that failed.
    """
    resolved = []
    for i, entry in enumerate(imports or []):
        key = f"imports[{i}]"
        if not isinstance(entry, str) or not entry:
            raise RecipeError(f"expected a Python file or a module name, got {entry!r}", key=key)
        if entry.endswith(".py") or "/" in entry or "\\" in entry:
            path = Path(entry).expanduser()
            if not path.is_absolute():
                path = (base or Path.cwd()) / path
            path = path.resolve()
            if not path.is_file():
                raise RecipeError(f"{entry!r} does not exist (looked for {path})", key=key)
            name = f"amortize_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as e:
                    del sys.modules[name]
                    raise RecipeError(f"importing {path} failed: {type(e).__name__}: {e}", key=key) from None
            resolved.append(str(path))
        else:
            try:
                importlib.import_module(entry)
            except Exception as e:
                raise RecipeError(f"importing module {entry!r} failed: {type(e).__name__}: {e}", key=key) from None
            resolved.append(entry)
    return resolved
