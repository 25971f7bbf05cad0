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


# --------------------------------------------------------------------------------------------------
# wall time per layer, printed at the end (tests run one after another, so the sums are wall times)

LAYER_SECONDS = {}


def layer_of(nodeid):
    """unit, static, host or browser: the folder under tests/ (the browser test is its own layer)."""
    parts = nodeid.replace("\\", "/").split("/")
    if "test_browser.py" in nodeid.split("::")[0]:
        return "browser"
    return parts[0] if parts[0] in ("unit", "static", "host") else parts[1] if len(parts) > 1 else "other"


def pytest_runtest_logreport(report):
    layer = layer_of(report.nodeid)
    LAYER_SECONDS[layer] = LAYER_SECONDS.get(layer, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if LAYER_SECONDS:
        order = ["unit", "static", "host", "browser"]
        rows = sorted(LAYER_SECONDS.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
        terminalreporter.write_line("wall time per layer: " + ", ".join(f"{k} {v:.1f} s" for k, v in rows))
