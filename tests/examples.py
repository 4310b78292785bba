"""The scripts under ``examples/`` as modules, for tests that call their functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_path(name: str) -> Path:
    return EXAMPLES / f"{name}.py"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as module ``name`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, example_path(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
