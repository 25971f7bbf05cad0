"""Host layer: tests against a real ComfyUI (``COMFYUI_PATH``, or the ComfyUI this pack sits in; scripts/test.sh
sets it for a ComfyUI source given by ``ATELIER_COMFYUI_SOURCE``).

One ComfyUI server is started per test session (fixture ``comfy_server``) with this pack symlinked into
a temporary base directory and the tiny random SD1.5 checkpoint (built once by the project's
runner/tiny_sd15.py and cached, see runner/tiny.py) placed in ``models/checkpoints/`` under
``tiny_sd15.safetensors`` and under every checkpoint name that the example workflows use. Everything lives
in temp folders on a free port: several sessions can run at once, and the ComfyUI tree is never written to.

Without ComfyUI every test in this folder is skipped with one line saying why; under ``CI=true`` every
skip in this folder (no ComfyUI, no Chromium, ...) is a failure instead.

Model files for example workflows: a file ``tests/host/prepare_<area>.py`` with ``def prepare(server)`` is
called once after the session server started; it writes tiny model files under
``server.base_dir / "models" / "<folder>"`` (and may call ``server.add_checkpoint_names([...])``), and may
return ``{"<workflow file name>": {"<node id, title or class>.<input>": value}}``: overrides that
test_example_workflow_runs applies to that workflow (e.g. fewer steps). ``comfy_server.workflow_overrides``
holds them.

Fixture interface:
    comfy_server.url, .base_dir, .object_info(), .log_text(),
    .run_api(prompt, timeout=...), .run_workflow(ui_json_or_path, overrides=None, timeout=...)
    -> result with .outputs (history outputs per node id), .files (paths written), .status;
    failures raise runner.run.RunError (message names the node) or runner.convert.WorkflowError.
"""
import json
import os
import pathlib

import pytest

from atelier.runner import convert, run
from atelier.runner.run import ensure_requirements, model_references
from atelier.runner.server import ComfyError, ComfyNotFound, ComfyServer, find_comfyui, find_python
from atelier.runner.tiny import ensure_tiny_sd15, place_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
TINY_NAME = "tiny_sd15.safetensors"
# Checkpoint names every session provides even if no workflow names them yet.
DEFAULT_CHECKPOINTS = {TINY_NAME, "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly-fp16.safetensors"}


def _find():
    try:
        return find_comfyui(), None
    except ComfyNotFound as exc:
        return None, str(exc)


COMFY, NOT_FOUND = _find()
SKIP_REASON = ("host layer skipped: no ComfyUI found (set COMFYUI_PATH to a ComfyUI checkout, or "
               "ATELIER_COMFYUI_SOURCE to a ComfyUI source tarball, to run the host tests)") if COMFY is None else None
# In CI a host layer that would be skipped is a failure: CI must prove the pack inside the real host.
REQUIRED = os.environ.get("CI", "").lower() == "true"


def pytest_report_header(config):
    if COMFY is None:
        return [SKIP_REASON]
    return [f"host layer: ComfyUI at {COMFY} (python {find_python(COMFY)})"]


# the pytest.skip line below (0-based, as pytest stores it), for the folded report
_SKIP_LINE = next(i for i, line in enumerate(open(__file__, encoding="utf-8"), start=1) if line.strip() == "pytest.skip(SKIP_REASON)")


@pytest.fixture(autouse=True)
def _needs_comfyui():
    """Skip every host test from one place, so ``-ra`` folds them into one visible line."""
    if COMFY is None:
        pytest.skip(SKIP_REASON)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every "no ComfyUI" skip at this file's location, so ``-ra`` folds them into ONE line; under
    CI=true turn every skip of the host layer (no ComfyUI, no Chromium, ...) into a failure saying why."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail") or not isinstance(rep.longrepr, tuple):
        return
    if REQUIRED:
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: a skipped host test is a failure. It was skipped because: {rep.longrepr[2]}"
    elif COMFY is None and SKIP_REASON in str(rep.longrepr[2]):
        rep.longrepr = (__file__, _SKIP_LINE, rep.longrepr[2])


def pytest_collection_modifyitems(config, items):
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.host)


def checkpoint_names(workflow_paths, object_info):
    """Checkpoint file names that the given UI-format workflows load."""
    names = set()
    for path in workflow_paths:
        try:
            prompt = convert.ui_to_api(convert.load_workflow(path), object_info)
        except convert.WorkflowError:
            continue  # the workflow's own test reports the problem
        names.update(v for _, _, _, folder, v in model_references(prompt) if folder == "checkpoints")
    return names


class HostServer(ComfyServer):
    """ComfyServer plus what the host tests use: running prompts and workflows, tiny checkpoint names."""

    def run_api(self, prompt, timeout=600, progress=None):
        """Queue an API-format prompt and wait: a RunResult (.outputs, .files, .status), or RunError."""
        return run.run_api(self, prompt, timeout=timeout, progress=progress)

    def run_workflow(self, workflow, overrides=None, timeout=600, progress=None):
        """Convert a UI-format workflow (path, JSON text or dict) and run it; see run_api."""
        return run.run_workflow(self, workflow, overrides=overrides, timeout=timeout, progress=progress)

    def add_checkpoint_names(self, names):
        place_checkpoint(self.tiny_checkpoint, self.models_dir / "checkpoints", names)
        self.object_info(refresh=True)


def run_preparers(server):
    """Call ``prepare(server)`` of every tests/host/prepare_*.py; merge the overrides they return."""
    import importlib.util

    overrides = {}
    for path in sorted(pathlib.Path(__file__).parent.glob("prepare_*.py")):
        spec = importlib.util.spec_from_file_location(f"atelier_host_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            extra = module.prepare(server) or {}
        except Exception as exc:  # noqa: BLE001  report which preparer broke, then stop the session
            pytest.fail(f"{path.name}: prepare(server) failed: {type(exc).__name__}: {exc}", pytrace=False)
        for workflow, values in extra.items():
            overrides.setdefault(workflow, {}).update(values)
    return overrides


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    if COMFY is None:
        pytest.skip(SKIP_REASON)
    python = find_python(COMFY)
    try:
        ensure_requirements(python)
        tiny = ensure_tiny_sd15(COMFY, python)
    except ComfyError as exc:
        pytest.fail(f"host layer set-up failed: {exc}", pytrace=False)
    base = tmp_path_factory.mktemp("comfy_base")
    place_checkpoint(tiny, base / "models" / "checkpoints", sorted(DEFAULT_CHECKPOINTS))
    server = HostServer(COMFY, python, base_dir=base,
                        startup_timeout=float(os.environ.get("ATELIER_HOST_STARTUP_TIMEOUT", 300)))
    server.tiny_checkpoint = tiny
    try:
        server.start()
    except ComfyError as exc:
        pytest.fail(f"ComfyUI did not start for the host tests:\n{exc}", pytrace=False)
    try:
        server.add_checkpoint_names(checkpoint_names(WORKFLOWS, server.object_info()) - DEFAULT_CHECKPOINTS)
        server.workflow_overrides = run_preparers(server)
        server.object_info(refresh=True)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pack_node_ids(pack):
    """Node ids the pack defines (NODE_CLASS_MAPPINGS), read by importing the pack as the tests do."""
    return sorted(pack.NODE_CLASS_MAPPINGS)


def load_json(path):
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
