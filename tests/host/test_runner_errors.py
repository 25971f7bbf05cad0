"""The runner's bad-input paths: each gives a clear message and leaves no server running.

Start failures use fake ComfyUI folders (a main.py that crashes, hangs or cannot bind), so they cost no
ComfyUI start; the mid-run failure uses the session server; the CLI tests start their own server.
"""
import json
import os
import socket
import sys
import textwrap

import pytest

from runner import run
from runner.run import RunError
from runner.server import ComfyServer, PortInUse, ServerStartError, port_in_use

from conftest import COMFY  # noqa: F401  (tests/host/conftest.py: the ComfyUI under test)

pytestmark = pytest.mark.host

FAILING_API_PROMPT = {
    # EmptyImage is RGB; asking ImageToMask for the alpha channel fails inside the node (IndexError),
    # after validation passed: a mid-run failure with no model file needed.
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
    "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fail"}},
}


def fake_comfyui(tmp_path, main_source):
    root = tmp_path / "FakeComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "folder_paths.py").write_text("")
    (root / "main.py").write_text(textwrap.dedent(main_source))
    return root


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_port_in_use_is_refused_before_start(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        server = ComfyServer(COMFY, port=port, cpu=True)
        with pytest.raises(PortInUse, match=f"port {port} .*already in use"):
            server.start()
        assert server.proc is None


def test_comfyui_crashing_at_start_reports_log_tail(tmp_path):
    root = fake_comfyui(tmp_path, """
        import sys
        print("loading things")
        raise SystemExit("boom: torch is broken in this venv")
    """)
    server = ComfyServer(root, python=sys.executable, cpu=True, startup_timeout=60)
    with pytest.raises(ServerStartError) as info:
        server.start()
    text = str(info.value)
    assert "exited with code 1" in text and "boom: torch is broken" in text
    assert not server.running


def test_comfyui_failing_to_bind_is_reported_as_port_in_use(tmp_path):
    root = fake_comfyui(tmp_path, """
        import sys
        print("OSError: [Errno 98] error while attempting to bind on address: address already in use")
        sys.exit(1)
    """)
    server = ComfyServer(root, python=sys.executable, cpu=True, startup_timeout=60)
    with pytest.raises(PortInUse, match="already in use"):
        server.start()


def test_comfyui_never_ready_times_out_and_is_killed(tmp_path):
    root = fake_comfyui(tmp_path, """
        import time
        print("starting forever", flush=True)
        time.sleep(600)
    """)
    server = ComfyServer(root, python=sys.executable, cpu=True, startup_timeout=2)
    server_pid = []
    original = server._wait_ready

    def spy():
        server_pid.append(server.proc.pid)
        return original()

    server._wait_ready = spy
    with pytest.raises(ServerStartError, match="did not become ready within 2 s"):
        server.start()
    assert server_pid and not pid_alive(server_pid[0])


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


def test_cli_mid_run_failure_exits_1_and_stops_server(tmp_path, capsys):
    workflow = tmp_path / "failing_api.json"
    workflow.write_text(json.dumps(FAILING_API_PROMPT))
    code = run.main([str(workflow), "--comfyui", str(COMFY), "--no-install", "--cpu",
                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "node 2 (ImageToMask) failed" in err
    port = int(err.split("http://127.0.0.1:")[1].split()[0])
    assert not port_in_use(port), "the CLI left ComfyUI running"


def test_cli_missing_checkpoint_says_what_and_where(tmp_path, capsys):
    if (COMFY / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").exists():
        pytest.skip("this ComfyUI has the SD1.5 checkpoint; the missing-file message cannot be shown")
    code = run.main([str(run.PACK_ROOT / "workflows" / "txt2img_core.json"), "--comfyui", str(COMFY),
                     "--no-install", "--cpu", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "'v1-5-pruned-emaonly.safetensors'" in err
    assert str(COMFY / "models" / "checkpoints") in err
    assert "huggingface.co" in err
