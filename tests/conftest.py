"""Shared test helpers.

The pack is imported as the package ``atelier`` (the pack folder's ``atelier.py``, through ``pythonpath = ..``
in pytest.ini): ``from atelier.retrieval import db``, ``from atelier.nodes import artist``. ComfyUI itself
imports the pack by its folder's ``__init__.py``; tests/static/test_packaging.py checks that entry point.
Test fixtures (tiny random models, generated data) live in ``tests/fixtures/``, imported as
``atelier.tests.fixtures`` (a bare ``tests`` package name is taken by some libraries, e.g. torch-fidelity).
"""
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_pack():
    """The pack's node tables (``atelier.nodes``: NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)."""
    return importlib.import_module("atelier.nodes")


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
