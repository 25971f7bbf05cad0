"""The pack in a real ComfyUI: it loads, lists its nodes, and every example workflow runs.

CPU time: every workflow runs at 64x64 (EmptyLatentImage width/height overridden) with at most 2 sampler
steps (KSampler), on the tiny random checkpoint, plus the overrides a tests/host/prepare_<area>.py returns
for it (see conftest.py); the images are noise, the plumbing is what is tested.
"""
import json
import pathlib
import struct

import pytest

from atelier.runner import convert
from atelier.runner.run import RunError

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

pytestmark = pytest.mark.host

SMALL = 64
MAX_STEPS = 2


def shrink(prompt):
    """Small resolution and few steps for CPU runs; linked inputs are left alone."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] == "EmptyLatentImage":
            for name in ("width", "height"):
                if not isinstance(inputs.get(name), list):
                    inputs[name] = SMALL
            if not isinstance(inputs.get("batch_size"), list):
                inputs["batch_size"] = 1
        if entry["class_type"] == "KSampler" and isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], MAX_STEPS)
    return prompt


def png_size(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_pack_imports_without_failure(comfy_server):
    log = comfy_server.log_text()
    assert comfy_server.import_failures() == []
    loaded = [line for line in log.splitlines() if str(comfy_server.pack_link) in line and "seconds" in line]
    assert loaded, "the pack is missing from ComfyUI's 'Import times for custom nodes' list"
    assert not any("IMPORT FAILED" in line for line in loaded)


def test_all_atelier_nodes_listed(comfy_server, pack_node_ids):
    info = comfy_server.object_info()
    missing = sorted(set(pack_node_ids) - set(info))
    assert not missing, f"Atelier nodes missing from /object_info: {missing}"
    assert comfy_server.pack_nodes(info) == pack_node_ids
    for node_id in pack_node_ids:
        assert info[node_id]["category"].startswith("atelier")


def test_core_nodes_present(comfy_server):
    info = comfy_server.object_info()
    for node in ("CheckpointLoaderSimple", "KSampler", "SaveImage", "VAEDecode"):
        assert node in info


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_example_workflow_runs(comfy_server, workflow):
    info = comfy_server.object_info()
    prompt = shrink(convert.ui_to_api(convert.load_workflow(workflow), info, validate=True))
    convert.apply_overrides(prompt, comfy_server.workflow_overrides.get(workflow.name, {}), info)
    try:
        result, failure = comfy_server.run_api(prompt, timeout=900), None
    except RunError as exc:
        result, failure = None, f"{workflow.name}: {exc}"
        if "Value not in list" in str(exc):
            failure += ("\nA model file this workflow names is not in the test server's models folders: add "
                        "tests/host/prepare_<area>.py with prepare(server) writing a tiny file under "
                        f"{comfy_server.base_dir / 'models'}/<folder>/ (see tests/host/conftest.py).")
    if failure:
        pytest.fail(failure, pytrace=False)
    assert result.status == "success"
    assert result.files, f"{workflow.name} wrote no files"
    for path in result.files:
        assert path.is_file(), path
        if path.suffix == ".png":
            width, height = png_size(path)
            assert width > 0 and height > 0


def test_core_workflow_image_size_follows_override(comfy_server):
    """The UI->API conversion feeds the real server: an override of the latent size shows in the PNG."""
    result = comfy_server.run_workflow(
        ROOT / "workflows" / "txt2img_core.json",
        overrides={"5.width": 64, "5.height": 128, "KSampler.steps": 1},
        timeout=900,
    )
    assert [png_size(p) for p in result.files] == [(64, 128)]
    saved = json.dumps(result.outputs)
    assert "atelier" in saved  # filename_prefix atelier/txt2img -> subfolder atelier
