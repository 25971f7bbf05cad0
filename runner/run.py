"""Run a workflow headless through a real ComfyUI: queue, stream progress, wait, collect the images.

    python -m runner workflows/txt2img_core.json [--comfyui PATH] [--tiny] [--set 3.steps=4] [--timeout 600]

The server is always stopped (also on Ctrl-C). Exit codes: 0 done, 1 the workflow failed, 2 set-up
problem (no ComfyUI, missing model file, bad workflow file, server did not start).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time
import uuid

from ..common.files import cache_dir, locked
from . import convert
from .errors import ComfyError, ComfyNotFound
from .server import PACK_ROOT, ComfyServer, find_comfyui, find_python

# input name -> ComfyUI model folder, for "missing model file" messages
MODEL_INPUTS = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "vae_name": "vae",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "control_net_name": "controlnet",
    "style_model_name": "style_models",
}
# node class -> (input, folder) where the input name alone is ambiguous
MODEL_INPUTS_BY_CLASS = {"UpscaleModelLoader": ("model_name", "upscale_models")}
KNOWN_SOURCES = {
    "v1-5-pruned-emaonly.safetensors":
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive (file v1-5-pruned-emaonly.safetensors)",
    "v1-5-pruned-emaonly-fp16.safetensors":
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive (file v1-5-pruned-emaonly-fp16.safetensors)",
    "sd_xl_base_1.0.safetensors": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0",
    "2x_SwinIR-M.pth": "https://github.com/JingyunLiang/SwinIR/releases (classical SR x2 model)",
}
FILE_OUTPUT_KEYS = ("images", "gifs", "videos", "audio", "files", "3d")


class RunError(ComfyError):
    """The workflow was rejected or failed while running; the message names the node."""

    def __init__(self, message, node_id=None, node_type=None, details=None):
        super().__init__(message)
        self.node_id, self.node_type, self.details = node_id, node_type, details


class MissingModel(ComfyError):
    pass


class RunResult:
    def __init__(self, prompt_id, outputs, files, status, messages, elapsed):
        self.prompt_id, self.outputs, self.files = prompt_id, outputs, files
        self.status, self.messages, self.elapsed = status, messages, elapsed

    def __repr__(self):
        return f"RunResult(status={self.status!r}, files={[str(f) for f in self.files]})"


# --------------------------------------------------------------------------------------------------
# errors, readably


def format_validation_error(payload, prompt):
    """Text for an HTTP 400 answer of POST /prompt: the top error and every node's errors."""
    lines = []
    error = payload.get("error") or {}
    if isinstance(error, dict):
        lines.append(f"ComfyUI rejected the workflow: {error.get('message', 'error')}"
                     + (f" ({error.get('details')})" if error.get("details") else ""))
    else:
        lines.append(f"ComfyUI rejected the workflow: {error}")
    first = None
    for node_id, entry in (payload.get("node_errors") or {}).items():
        first = first or (node_id, entry.get("class_type"))
        title = (prompt.get(node_id) or {}).get("_meta", {}).get("title")
        head = f"  node {node_id} ({entry.get('class_type')}" + (f' "{title}"' if title and title != entry.get("class_type") else "") + ")"
        for err in entry.get("errors", []):
            info = err.get("extra_info") or {}
            name = info.get("input_name")
            lines.append(f"{head}: {err.get('message')}" + (f" [{name}]" if name else "")
                         + (f": {err.get('details')}" if err.get("details") else ""))
    return "\n".join(lines), first


def format_execution_error(data, prompt):
    node_id, node_type = str(data.get("node_id")), data.get("node_type")
    title = (prompt.get(node_id) or {}).get("_meta", {}).get("title")
    where = f"node {node_id} ({node_type}" + (f' "{title}"' if title and title != node_type else "") + ")"
    text = f"{where} failed: {data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}"
    tb = data.get("traceback") or []
    if tb:
        tail = "".join(tb[-6:]).rstrip()
        text += "\n  traceback (last frames):\n    " + tail.replace("\n", "\n    ")
    return text, node_id, node_type


# --------------------------------------------------------------------------------------------------
# running


def _ws_connect(server, client_id):
    try:
        import websocket  # websocket-client; optional: without it we poll /history
    except ImportError:
        return None
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=2)
    except Exception:  # noqa: BLE001  polling still works
        return None
    return ws


def _print_progress(msg, prompt, out):
    kind, data = msg.get("type"), msg.get("data") or {}
    if kind == "executing" and data.get("node") is not None:
        node = prompt.get(str(data["node"]), {})
        print(f"  running node {data['node']} ({node.get('class_type', '?')})", file=out, flush=True)
    elif kind == "progress":
        value, maximum = data.get("value"), data.get("max")
        if value is not None and maximum:
            end = "\n" if value >= maximum else "\r"
            print(f"    step {value}/{maximum}", end=end, file=out, flush=True)


def run_api(server, prompt, *, timeout=600, workflow=None, progress=None):
    """Queue an API-format prompt, wait for it, return a RunResult; RunError names the failing node."""
    client_id = uuid.uuid4().hex
    ws = _ws_connect(server, client_id)
    try:
        body = {"prompt": prompt, "client_id": client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, payload = server.post_json("/prompt", body)
        if status != 200 or payload.get("node_errors"):
            text, first = format_validation_error(payload, prompt)
            raise RunError(text, *(first or (None, None)), details=payload)
        prompt_id = payload["prompt_id"]
        start = time.monotonic()
        deadline = start + timeout
        entry = None
        while entry is None:
            if not server.running:
                raise RunError(f"ComfyUI stopped while running the workflow.\n--- ComfyUI log (last lines) ---\n"
                               f"{server.log_tail()}")
            if time.monotonic() > deadline:
                server.request("/interrupt", {})
                raise RunError(f"the workflow did not finish within {timeout:.0f} s (interrupted). "
                               "Raise --timeout, or lower steps/resolution.")
            if ws is not None:
                try:
                    raw = ws.recv()
                except Exception:  # noqa: BLE001  timeout or closed socket: check history
                    raw = None
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    if progress is not None:
                        _print_progress(msg, prompt, progress)
                    done = msg.get("type") in ("execution_success", "execution_error", "execution_interrupted") or (
                        msg.get("type") == "executing" and (msg.get("data") or {}).get("node") is None)
                    if not done:
                        continue
            else:
                time.sleep(0.3)
            history = server.get_json(f"/history/{prompt_id}")
            candidate = history.get(prompt_id)
            if candidate and (candidate.get("status") or {}).get("completed") is not None and (
                    candidate["status"].get("status_str") in ("success", "error")):
                entry = candidate
        elapsed = time.monotonic() - start
    finally:
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
    status_info = entry.get("status") or {}
    messages = status_info.get("messages") or []
    if status_info.get("status_str") != "success":
        for event, data in messages:
            if event == "execution_error":
                text, node_id, node_type = format_execution_error(data, prompt)
                raise RunError(text, node_id, node_type, details=data)
            if event == "execution_interrupted":
                raise RunError(f"the workflow was interrupted at node {data.get('node_id')} ({data.get('node_type')})",
                               str(data.get("node_id")), data.get("node_type"), details=data)
        raise RunError(f"the workflow failed: {status_info}")
    outputs = entry.get("outputs") or {}
    return RunResult(prompt_id, outputs, collect_files(server, outputs), status_info.get("status_str"),
                     messages, elapsed)


def collect_files(server, outputs):
    """Paths of the files that output nodes reported (``{"filename", "subfolder", "type"}`` entries)."""
    roots = {"output": server.output_dir or server.base_dir / "output",
             "temp": server.base_dir / "temp",
             "input": server.input_dir or server.base_dir / "input"}
    files = []
    for node_out in outputs.values():
        for key in FILE_OUTPUT_KEYS:
            for item in node_out.get(key) or []:
                if isinstance(item, dict) and "filename" in item:
                    root = roots.get(item.get("type", "output"), roots["output"])
                    files.append(root / (item.get("subfolder") or "") / item["filename"])
    return files


def run_workflow(server, workflow, *, overrides=None, timeout=600, progress=None):
    """Convert a UI-format workflow (path/str/dict; API format passes through) and run it."""
    data = convert.load_workflow(workflow)
    info = server.object_info()
    if convert.is_api_format(data):
        prompt, ui = json.loads(json.dumps(data)), None
    else:
        prompt, ui = convert.ui_to_api(data, info, validate=True), data
    if overrides:
        convert.apply_overrides(prompt, overrides, info)
    return run_api(server, prompt, timeout=timeout, workflow=ui, progress=progress)


# --------------------------------------------------------------------------------------------------
# model files


def model_references(prompt):
    """(node_id, class, input, folder, file name) for every model-file input of the prompt."""
    refs = []
    for node_id, entry in prompt.items():
        special = MODEL_INPUTS_BY_CLASS.get(entry["class_type"])
        for name, value in entry["inputs"].items():
            folder = MODEL_INPUTS.get(name)
            if special and name == special[0]:
                folder = special[1]
            if folder and isinstance(value, str):
                refs.append((node_id, entry["class_type"], name, folder, value))
    return refs


def missing_models(prompt, object_info, comfyui_path):
    """Messages for model files the workflow names that this ComfyUI cannot see."""
    problems = []
    for node_id, cls, name, folder, value in model_references(prompt):
        spec = convert.input_spec(object_info.get(cls, {}), name)
        options = convert.combo_options(spec[0], spec[1]) if spec else None
        if options is None or value in options:
            continue
        source = KNOWN_SOURCES.get(pathlib.PurePath(value).name,
                                   "the model's official page (Hugging Face or civitai.com)")
        problems.append(
            f"node {node_id} ({cls}) needs the model file '{value}', which is missing.\n"
            f"    put it in: {pathlib.Path(comfyui_path) / 'models' / folder}/\n"
            f"    get it from: {source}"
        )
    return problems


# --------------------------------------------------------------------------------------------------
# the pack's requirements in ComfyUI's Python

_CHECK_REQS = r"""
import sys, re
from importlib import metadata
missing = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    name = re.split(r"[<>=!~;\[ ]", line, 1)[0]
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(line); continue
    try:
        from packaging.requirements import Requirement
        if not Requirement(line).specifier.contains(version, prereleases=True):
            missing.append(line)
    except Exception:
        pass
print("\n".join(missing))
"""


def missing_requirements(python, requirements=PACK_ROOT / "requirements.txt"):
    if not pathlib.Path(requirements).is_file():
        return []
    out = subprocess.run([python, "-c", _CHECK_REQS, str(requirements)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ComfyError(f"could not check the pack's requirements with {python}:\n{out.stderr[-2000:]}")
    return [line for line in out.stdout.splitlines() if line.strip()]


def ensure_requirements(python, requirements=PACK_ROOT / "requirements.txt", out=None):
    """pip-install the requirement lines missing from ``python``; one installer at a time per machine."""
    import hashlib
    import os

    if not missing_requirements(python, requirements):
        return []
    lock = os.path.join(cache_dir(), f"pip-{hashlib.sha256(str(python).encode()).hexdigest()[:12]}.lock")
    with locked(lock):
        return _install_missing(python, requirements, out)


def _install_missing(python, requirements, out):
    missing = missing_requirements(python, requirements)  # again: another run may have installed them
    if not missing:
        return []
    print(f"== installing the pack's requirements into ComfyUI's Python ({python}): {', '.join(missing)}",
          file=out or sys.stderr, flush=True)
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing])
    if proc.returncode != 0:
        raise ComfyError(f"pip could not install {', '.join(missing)} into {python}; install them by hand "
                         f"({python} -m pip install -r {requirements}).")
    return missing


# --------------------------------------------------------------------------------------------------
# command line


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", nargs="?", default=str(PACK_ROOT / "workflows" / "txt2img_core.json"),
                    help="UI-format (or API-format) workflow JSON (default: workflows/txt2img_core.json)")
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH, or the ComfyUI the pack is in)")
    ap.add_argument("--python", help="ComfyUI's Python (default: $COMFYUI_PYTHON, <comfyui>/.venv or venv, or this one)")
    ap.add_argument("--tiny", action="store_true",
                    help="replace every checkpoint by a tiny random-weight model (plumbing check: images are noise)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.input=VALUE",
                    help="override an input (NODE: node id, title or class; VALUE: JSON or text); repeatable")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the workflow (default 1800)")
    ap.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for ComfyUI to start")
    ap.add_argument("--output-dir", default=str(PACK_ROOT / "output"),
                    help="where images go (default: output/ in the pack)")
    ap.add_argument("--extra-model-paths", action="append", default=[], metavar="YAML",
                    help="an extra_model_paths.yaml with more model folders (repeatable); ComfyUI/models and "
                         "ComfyUI/extra_model_paths.yaml are always used")
    ap.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--cpu", action="store_true", default=None, help="force ComfyUI's --cpu (default: when no CUDA)")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install missing pack requirements")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary base directory (log, config)")
    ap.add_argument("--print-api", action="store_true", help="print the API-format prompt and exit (no run)")
    return ap


def main(argv=None, out=None, err=None):
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        comfy = find_comfyui(args.comfyui)
        python = args.python or find_python(comfy)
        workflow = convert.load_workflow(args.workflow)
        if not args.no_install:
            ensure_requirements(python, out=err)
        if args.tiny:
            from .tiny import NOISE_WARNING, ensure_tiny_sd15
            print(NOISE_WARNING, file=err, flush=True)
            tiny_path = ensure_tiny_sd15(comfy, python)
        print(f"== starting ComfyUI ({comfy}) ...", file=err, flush=True)
        with ComfyServer(comfy, python, port=args.port, user_models=True, output_dir=args.output_dir,
                         extra_model_paths=args.extra_model_paths,
                         input_dir=comfy / "input", cpu=args.cpu, startup_timeout=args.startup_timeout,
                         keep_base_dir=args.keep_temp) as server:
            print(f"== ComfyUI {server.url} (log: {server.log_path})", file=err, flush=True)
            if args.tiny and "--cpu" in server._cmd:
                print("   (on a CPU even the tiny model is slow at 512x512: for a quick check add e.g. "
                      "--set EmptyLatentImage.width=128 --set EmptyLatentImage.height=128 --set KSampler.steps=4)",
                      file=err, flush=True)
            info = server.object_info()
            if convert.is_api_format(workflow):
                prompt, ui = workflow, None
            else:
                prompt, ui = convert.ui_to_api(workflow, info, validate=True), workflow
            if args.overrides:
                convert.apply_overrides(prompt, args.overrides, info)
            if args.print_api:
                print(json.dumps(prompt, indent=2), file=out)
                return 0
            if args.tiny:
                from .tiny import place_checkpoint
                names = sorted({v for _, _, n, f, v in model_references(prompt) if f == "checkpoints"})
                place_checkpoint(tiny_path, server.models_dir / "checkpoints", names)
                info = server.object_info(refresh=True)
            problems = missing_models(prompt, info, comfy)
            if problems:
                raise MissingModel("the workflow needs model files that are not installed:\n  "
                                   + "\n  ".join(problems)
                                   + "\n(or run with --tiny for a plumbing check with random weights)")
            result = run_api(server, prompt, timeout=args.timeout, workflow=ui, progress=err)
        if args.tiny:
            print(NOISE_WARNING, file=err, flush=True)
        print(f"== done in {result.elapsed:.1f} s; {len(result.files)} file(s):", file=out)
        for path in result.files:
            print(f"   {path}", file=out)
        if not result.files:
            print("   (the workflow's output nodes wrote no files)", file=out)
        return 0
    except RunError as exc:
        print(f"ERROR: {exc}", file=err)
        return 1
    except (ComfyError, ComfyNotFound, convert.WorkflowError) as exc:
        print(f"ERROR: {exc}", file=err)
        return 2
    except KeyboardInterrupt:
        print("interrupted; ComfyUI stopped", file=err)
        return 130

