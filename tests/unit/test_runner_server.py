"""runner.server / runner.run without ComfyUI: fake ComfyUI folders whose main.py crashes, hangs, cannot
bind, or serves a minimal HTTP API, so the start/stop logic and the messages are tested on any machine."""
import io
import json
import os
import pathlib
import socket
import sys
import textwrap

import pytest

from atelier.runner import run, server
from atelier.runner.server import ComfyNotFound, ComfyServer, PackImportFailed, PortInUse, ServerStartError

FAKE_HTTP_MAIN = """
import http.server, json, sys
argv = sys.argv
port = int(argv[argv.index("--port") + 1])
base = argv[argv.index("--base-directory") + 1]
pack = base + "/custom_nodes/atelier"
MODE = {mode!r}
if MODE == "broken":
    print("Traceback (most recent call last):")
    print("ModuleNotFoundError: No module named 'open_clip'")
    print(f"Cannot import {{pack}} module for custom nodes: No module named 'open_clip'")
print("Import times for custom nodes:")
print(f"   0.0 seconds{{' (IMPORT FAILED)' if MODE == 'broken' else ''}}: {{pack}}")
print("   0.0 seconds (IMPORT FAILED): " + base + "/custom_nodes/someone_elses_pack")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/system_stats":
            body = {{"system": {{"argv": sys.argv}}}}
        else:
            body = {{"AtelierDemo": {{"python_module": "custom_nodes.atelier"}},
                     "KSampler": {{"python_module": "nodes"}}}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass

httpd = http.server.HTTPServer(("127.0.0.1", port), Handler)
print(f"To see the GUI go to: http://127.0.0.1:{{port}}", flush=True)
httpd.serve_forever()
"""


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


def make_server(root, **kwargs):
    kwargs.setdefault("startup_timeout", 60)
    kwargs.setdefault("expected_nodes", ["AtelierDemo"])  # what the fake server lists
    return ComfyServer(root, python=sys.executable, cpu=True, **kwargs)


def test_fake_server_starts_lists_pack_nodes_and_stops(tmp_path):
    root = fake_comfyui(tmp_path, FAKE_HTTP_MAIN.format(mode="ok"))
    srv = make_server(root)
    with srv:
        assert srv.running and srv.pack_link.resolve() == server.PACK_ROOT
        assert srv.pack_nodes() == ["AtelierDemo"]
        assert srv.import_failures() == []  # another pack's failure is not ours
        pid, base = srv_pid(srv), srv.base_dir
        cmd = srv.command()
        assert ["--listen", "127.0.0.1"] == cmd[2:4] and "--cpu" in cmd and "--disable-api-nodes" in cmd
    assert not pid_alive(pid)
    assert not base.exists(), "the temporary base directory is removed at stop"
    assert "To see the GUI" in srv.log_text()  # the log stays readable after stop


def srv_pid(srv):
    return srv.proc.pid


def test_pack_import_failure_is_reported_with_its_traceback(tmp_path):
    root = fake_comfyui(tmp_path, FAKE_HTTP_MAIN.format(mode="broken"))
    srv = make_server(root)
    with pytest.raises(PackImportFailed) as info:
        srv.start()
    text = str(info.value)
    assert "could not import the Atelier pack" in text and "No module named 'open_clip'" in text
    assert "someone_elses_pack" not in text
    assert not srv.running


def test_port_in_use_is_refused_before_start(tmp_path):
    root = fake_comfyui(tmp_path, FAKE_HTTP_MAIN.format(mode="ok"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        srv = make_server(root, port=port)
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            srv.start()
        assert srv.proc is None


def test_crash_at_start_reports_the_log_tail(tmp_path):
    root = fake_comfyui(tmp_path, """
        print("loading things")
        raise SystemExit("boom: torch is broken in this venv")
    """)
    srv = make_server(root)
    with pytest.raises(ServerStartError) as info:
        srv.start()
    assert "exited with code 1" in str(info.value) and "boom: torch is broken" in str(info.value)
    assert not srv.running


def test_failing_to_bind_is_reported_as_port_in_use(tmp_path):
    root = fake_comfyui(tmp_path, """
        import sys
        print("OSError: [Errno 98] error while attempting to bind on address: address already in use")
        sys.exit(1)
    """)
    with pytest.raises(PortInUse, match="already in use"):
        make_server(root).start()


def test_never_ready_times_out_and_the_process_is_killed(tmp_path):
    root = fake_comfyui(tmp_path, """
        import time
        print("starting forever", flush=True)
        time.sleep(600)
    """)
    srv = make_server(root, startup_timeout=1.5)
    seen = []
    original = srv._wait_ready
    srv._wait_ready = lambda: (seen.append(srv.proc.pid), original())[1]
    with pytest.raises(ServerStartError, match="did not become ready within 2 s"):
        srv.start()
    assert seen and not pid_alive(seen[0])


def test_find_comfyui_messages(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ComfyNotFound, match="No ComfyUI found. Set COMFYUI_PATH"):
        server.find_comfyui()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(ComfyNotFound, match=f"COMFYUI_PATH points at {tmp_path}, which is not a ComfyUI"):
        server.find_comfyui()
    root = fake_comfyui(tmp_path, "")
    monkeypatch.setenv("COMFYUI_PATH", str(root))
    assert server.find_comfyui() == root.resolve()


def test_find_python_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PYTHON", raising=False)
    assert server.find_python(tmp_path) == sys.executable
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert server.find_python(tmp_path) == str(venv_python)
    dot = tmp_path / ".venv" / "bin" / "python"
    dot.parent.mkdir(parents=True)
    dot.write_text("")
    assert server.find_python(tmp_path) == str(dot)
    monkeypatch.setenv("COMFYUI_PYTHON", "/opt/py")
    assert server.find_python(tmp_path) == "/opt/py"


def test_user_models_yaml_maps_existing_folders(tmp_path):
    for folder in ("checkpoints", "loras", "atelier_style_db"):
        (tmp_path / "models" / folder).mkdir(parents=True)
    text = server.user_models_yaml(tmp_path, tmp_path / "x.yaml").read_text()
    assert f'base_path: "{tmp_path / "models"}"' in text
    assert "  checkpoints: checkpoints" in text and "  loras: loras" in text
    assert '  atelier_style_db: "atelier_style_db"' in text
    assert "vae:" not in text


def test_free_port_is_free():
    port = server.free_port()
    assert not server.port_in_use(port)


def test_cli_without_comfyui_exits_2_with_instructions(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    err = io.StringIO()
    assert run.main(["--no-install"], err=err) == 2
    assert "No ComfyUI found" in err.getvalue() and "COMFYUI_PATH" in err.getvalue()


def test_cli_bad_workflow_file_exits_2(tmp_path, monkeypatch):
    root = fake_comfyui(tmp_path, "")
    bad = tmp_path / "w.json"
    bad.write_text("{not json")
    err = io.StringIO()
    assert run.main([str(bad), "--comfyui", str(root), "--no-install"], err=err) == 2
    assert "w.json is not valid JSON" in err.getvalue()


# --------------------------------------------------------------------------------------------------
# run.py helpers


OBJECT_INFO = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["mine.safetensors"], {}]}}},
               "UpscaleModelLoader": {"input": {"required": {"model_name": [[], {}]}}}}


def test_missing_models_say_file_folder_and_source():
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
              "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mine.safetensors"}},
              "6": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "2x_SwinIR-M.pth"}}}
    problems = run.missing_models(prompt, OBJECT_INFO, pathlib.Path("/x/ComfyUI"))
    assert len(problems) == 2
    assert "node 4 (CheckpointLoaderSimple) needs the model file 'v1-5-pruned-emaonly.safetensors'" in problems[0]
    assert "put it in: /x/ComfyUI/models/checkpoints/" in problems[0]
    assert "huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive" in problems[0]
    assert "put it in: /x/ComfyUI/models/upscale_models/" in problems[1]


def test_validation_error_text_names_nodes_and_inputs():
    payload = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
               "node_errors": {"3": {"class_type": "KSampler", "errors": [
                   {"type": "value_not_in_list", "message": "Value not in list",
                    "details": "sampler_name: 'foo' not in [...]", "extra_info": {"input_name": "sampler_name"}}]}}}
    text, first = run.format_validation_error(payload, {"3": {"_meta": {"title": "Main"}}})
    assert first == ("3", "KSampler")
    assert "Prompt outputs failed validation" in text
    assert 'node 3 (KSampler "Main"): Value not in list [sampler_name]: sampler_name: \'foo\'' in text


def test_execution_error_text_has_traceback_tail():
    data = {"node_id": "7", "node_type": "VAEDecode", "exception_type": "RuntimeError",
            "exception_message": "out of memory\n", "traceback": [f"frame {i}\n" for i in range(10)]}
    text, node_id, node_type = run.format_execution_error(data, {})
    assert (node_id, node_type) == ("7", "VAEDecode")
    assert text.startswith("node 7 (VAEDecode) failed: RuntimeError: out of memory")
    assert "frame 9" in text and "frame 3" not in text


def test_collect_files_maps_types_to_folders(tmp_path):
    class Srv:
        output_dir = None
        input_dir = None
        base_dir = tmp_path
    outputs = {"9": {"images": [{"filename": "a.png", "subfolder": "atelier", "type": "output"},
                                {"filename": "b.png", "subfolder": "", "type": "temp"}]},
               "10": {"text": ["not a file"]}}
    assert run.collect_files(Srv, outputs) == [tmp_path / "output" / "atelier" / "a.png", tmp_path / "temp" / "b.png"]


def test_missing_requirements_checks_names_and_versions(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\npytest\npytest>=999\natelier-surely-not-installed-pkg>=1\n")
    assert run.missing_requirements(sys.executable, reqs) == ["pytest>=999", "atelier-surely-not-installed-pkg>=1"]


def test_parse_override_values_are_json_or_text():
    from atelier.runner.convert import parse_override
    assert parse_override("3.steps=4") == ("3", "steps", 4)
    assert parse_override("Positive prompt.text=a red fox") == ("Positive prompt", "text", "a red fox")
    assert parse_override('KSampler.cfg=7.5') == ("KSampler", "cfg", 7.5)
    assert json.dumps(parse_override("9.flag=true")[2]) == "true"


def test_comfyui_found_from_the_custom_nodes_folder_the_pack_is_linked_into(tmp_path):
    import subprocess

    root = fake_comfyui(tmp_path, "")
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "atelier").symlink_to(server.PACK_ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["PYTHONPATH"] = str(root / "custom_nodes" / "atelier")
    out = subprocess.run([sys.executable, "-c", "from atelier.runner.server import find_comfyui; print(find_comfyui())"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(root.resolve())


def test_missing_pack_nodes_in_object_info_stop_the_start(tmp_path):
    root = fake_comfyui(tmp_path, FAKE_HTTP_MAIN.format(mode="ok"))
    srv = make_server(root, expected_nodes=["AtelierDemo", "AtelierOther"])
    with pytest.raises(PackImportFailed, match="lacks these Atelier nodes: AtelierOther"):
        srv.start()
    assert not srv.running
    with make_server(root, expected_nodes=["AtelierDemo"]) as ok:
        assert ok.running


def test_declared_pack_nodes_reads_mapping_literals(tmp_path):
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "a.py").write_text("class A: pass\nNODE_CLASS_MAPPINGS = {'AtelierA': A, 'AtelierB': A}\n")
    (nodes / "b.py").write_text("NODE_CLASS_MAPPINGS: dict = {\"AtelierC\": object}\n")
    (nodes / "_private.py").write_text("NODE_CLASS_MAPPINGS = {'Hidden': 1}\n")
    (nodes / "broken.py").write_text("def (:\n")
    assert server.declared_pack_nodes(tmp_path) == ["AtelierA", "AtelierB", "AtelierC"]


def test_declared_pack_nodes_agree_with_the_imported_pack(pack):
    """Every id the runner expects is really registered (a mapping built in code is just not expected)."""
    assert set(server.declared_pack_nodes(server.PACK_ROOT)) <= set(pack.NODE_CLASS_MAPPINGS)


FAKE_QUEUE_MAIN = """
import http.server, json, sys
argv = sys.argv
port = int(argv[argv.index("--port") + 1])
out_dir = argv[argv.index("--output-directory") + 1] if "--output-directory" in argv else None
INFO = {info}
for node_id in {pack_ids}:
    INFO[node_id] = {{"python_module": "custom_nodes.atelier", "input": {{}}, "output": []}}
HISTORY = {{}}

class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/system_stats":
            return self.reply(200, {{"system": {{"argv": sys.argv}}}})
        if self.path.startswith("/history/"):
            pid = self.path.split("/")[-1]
            return self.reply(200, {{pid: HISTORY[pid]}} if pid in HISTORY else {{}})
        return self.reply(200, INFO)
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        if prompt["1"]["inputs"].get("prefix") == "reject":
            return self.reply(400, {{"error": {{"message": "Prompt outputs failed validation"}},
                                    "node_errors": {{"1": {{"class_type": "Save", "errors": [
                                        {{"message": "Value not in list", "details": "prefix: reject"}}]}}}}}})
        pid = "p1"
        if prompt["1"]["inputs"].get("prefix") == "crash":
            HISTORY[pid] = {{"status": {{"status_str": "error", "completed": False, "messages": [
                ["execution_error", {{"node_id": "1", "node_type": "Save", "exception_type": "ValueError",
                                      "exception_message": "bad pixels", "traceback": ["  File x, line 1\\n"]}}]]}},
                            "outputs": {{}}}}
        else:
            HISTORY[pid] = {{"status": {{"status_str": "success", "completed": True, "messages": []}},
                            "outputs": {{"1": {{"images": [{{"filename": "img_00001_.png", "subfolder": "s",
                                                             "type": "output"}}]}}}}}}
        return self.reply(200, {{"prompt_id": pid, "number": 1, "node_errors": {{}}}})
    def log_message(self, *args):
        pass

httpd = http.server.HTTPServer(("127.0.0.1", port), Handler)
print(f"To see the GUI go to: http://127.0.0.1:{{port}}", flush=True)
httpd.serve_forever()
"""
SAVE_INFO = {"Save": {"input": {"required": {"prefix": ["STRING", {}]}}, "input_order": {"required": ["prefix"]},
                      "output": [], "output_node": True, "python_module": "nodes"}}


def queue_comfyui(tmp_path):
    source = FAKE_QUEUE_MAIN.format(info=repr(SAVE_INFO), pack_ids=repr(server.declared_pack_nodes()))
    return fake_comfyui(tmp_path, source)


def save_workflow(tmp_path, prefix):
    """A UI-format workflow with one output node, as the frontend saves it."""
    path = tmp_path / f"{prefix}.json"
    path.write_text(json.dumps({"last_node_id": 1, "last_link_id": 0, "links": [], "version": 0.4, "nodes": [
        {"id": 1, "type": "Save", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [prefix]}]}))
    return path


def cli(tmp_path, prefix, *extra):
    out, err = io.StringIO(), io.StringIO()
    code = run.main([str(save_workflow(tmp_path, prefix)), "--comfyui", str(queue_comfyui(tmp_path)),
                     "--python", sys.executable, "--no-install", "--cpu", "--output-dir", str(tmp_path / "out"),
                     *extra], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_runs_a_ui_workflow_and_prints_the_files(tmp_path):
    code, out, err = cli(tmp_path, "ok", "--set", "1.prefix=ok")
    assert code == 0, err
    assert str(tmp_path / "out" / "s" / "img_00001_.png") in out
    port = int(err.split("http://127.0.0.1:")[1].split()[0])
    assert not server.port_in_use(port), "the server is stopped after the run"


def test_cli_reports_validation_errors_by_node(tmp_path):
    code, _, err = cli(tmp_path, "reject")
    assert code == 1
    assert "ComfyUI rejected the workflow: Prompt outputs failed validation" in err
    assert "node 1 (Save): Value not in list: prefix: reject" in err


def test_cli_reports_a_node_failing_mid_run(tmp_path):
    code, _, err = cli(tmp_path, "crash")
    assert code == 1
    assert "node 1 (Save) failed: ValueError: bad pixels" in err and "File x, line 1" in err


def test_cli_print_api(tmp_path):
    code, out, _ = cli(tmp_path, "ok", "--print-api")
    assert code == 0
    assert json.loads(out) == {"1": {"class_type": "Save", "inputs": {"prefix": "ok"}, "_meta": {"title": "Save"}}}


def test_cli_bad_override_is_a_setup_error(tmp_path):
    code, _, err = cli(tmp_path, "ok", "--set", "1.nope=3")
    assert code == 2 and "node 1 (Save) has no input 'nope'" in err


def test_command_passes_model_paths_and_folders(tmp_path, monkeypatch):
    root = fake_comfyui(tmp_path, "")
    (root / "models" / "checkpoints").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    srv = make_server(root, base_dir=tmp_path / "base", user_models=True, extra_model_paths=["mine.yaml"],
                      output_dir="out", input_dir=root / "input")
    srv.port = 1234
    cmd = srv.command()
    yamls = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--extra-model-paths-config"]
    assert yamls == [str(tmp_path / "mine.yaml"), str(tmp_path / "base" / "user_models.yaml")]
    assert "checkpoints: checkpoints" in (tmp_path / "base" / "user_models.yaml").read_text()
    assert cmd[cmd.index("--output-directory") + 1] == str(tmp_path / "out")
    assert cmd[cmd.index("--input-directory") + 1] == str(root / "input")
    assert cmd[cmd.index("--base-directory") + 1] == str(tmp_path / "base")
    assert cmd[cmd.index("--database-url") + 1] == "sqlite:///" + str(tmp_path / "base" / "user" / "comfyui.db")


def test_server_ends_when_its_parent_is_killed(tmp_path):
    """A test run or runner killed with SIGKILL (no cleanup runs) must not leave an orphan ComfyUI."""
    import signal
    import subprocess
    import time

    root = fake_comfyui(tmp_path, FAKE_HTTP_MAIN.format(mode="ok"))
    pid_file = tmp_path / "server.pid"
    parent_source = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(server.PACK_ROOT)!r})
        from atelier.runner.server import ComfyServer
        srv = ComfyServer({str(root)!r}, python=sys.executable, cpu=True, startup_timeout=60,
                          expected_nodes=["AtelierDemo"]).start()
        open({str(pid_file)!r}, "w").write(str(srv.proc.pid))
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_source])
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and parent.poll() is None, "the parent did not start the fake server"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert pid_alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while pid_alive(child) and time.time() < deadline:
        time.sleep(0.1)
    alive = pid_alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the server outlived its killed parent"
