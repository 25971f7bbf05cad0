"""Shared test helpers.

Pure packages are importable as top-level names (``samplers``, ``retrieval``...) through
``pythonpath = ..``. Node modules use relative imports, so they are reached through the pack imported
as a package under the name ``atelier_pack`` (never as top-level ``nodes``: that is ComfyUI's module).
"""
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK_NAME = "atelier_pack"


def load_pack():
    """Import the pack root as package ``atelier_pack``, the way ComfyUI's loader does (by file path)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
