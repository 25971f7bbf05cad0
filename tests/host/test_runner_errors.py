"""The runner's bad-input paths against a real ComfyUI: clear messages naming the node, no server left.

(Start failures: crash, port in use, hang, pack import failure are in tests/unit/test_runner_server.py,
with fake ComfyUI folders.) The mid-run failure uses the session server; the CLI test starts its own.
"""
import json

import pytest

from atelier.runner import run
from atelier.runner.run import RunError
from atelier.runner.server import port_in_use

pytestmark = pytest.mark.host

FAILING_API_PROMPT = {
    # EmptyImage is RGB; asking ImageToMask for the alpha channel fails inside the node (IndexError),
    # after validation passed: a mid-run failure with no model file needed.
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
    "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fail"}},
}


def test_workflow_error_mid_run_names_the_node(comfy_server):
    with pytest.raises(RunError) as info:
        comfy_server.run_api(FAILING_API_PROMPT, timeout=300)
    err = info.value
    assert err.node_id == "2" and err.node_type == "ImageToMask"
    assert "node 2 (ImageToMask) failed" in str(err) and "IndexError" in str(err)
    assert "traceback" in str(err)
    # the server survives a failed prompt and runs the next one
    ok = dict(FAILING_API_PROMPT)
    ok["2"] = {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "red"}}
    assert comfy_server.run_api(ok, timeout=300).status == "success"


def test_validation_error_names_node_and_input(comfy_server):
    bad = json.loads(json.dumps(FAILING_API_PROMPT))
    bad["1"]["inputs"]["width"] = 0  # below EmptyImage's minimum of 1
    with pytest.raises(RunError) as info:
        comfy_server.run_api(bad, timeout=60)
    assert "node 1 (EmptyImage)" in str(info.value) and "width" in str(info.value)


def test_cli_mid_run_failure_exits_1_and_stops_server(comfy_server, tmp_path, capsys):
    workflow = tmp_path / "failing_api.json"
    workflow.write_text(json.dumps(FAILING_API_PROMPT))
    code = run.main([str(workflow), "--comfyui", str(comfy_server.comfyui_path), "--no-install", "--cpu",
                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "node 2 (ImageToMask) failed" in err
    port = int(err.split("http://127.0.0.1:")[1].split()[0])
    assert not port_in_use(port), "the CLI left ComfyUI running"
