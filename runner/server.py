"""Start a real ComfyUI as a subprocess, talk to it over HTTP, and always stop it.

The runner never imports ComfyUI: it runs ComfyUI's own ``main.py`` with ComfyUI's own Python, on
127.0.0.1 and a free port, with ``--base-directory`` set to a fresh temporary folder whose
``custom_nodes/`` holds only a symlink to this pack. That keeps the user's ComfyUI checkout untouched
(no database, no output, no temp files written there) and lets several runs share one machine.
"""
import ast
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from ..host.locate import PACK_ROOT, find_comfyui, find_python
from .errors import ComfyError, ComfyNotFound, PackImportFailed, PortInUse, ServerStartError  # noqa: F401

PACK_LINK_NAME = "atelier"
READY_MARKER = "To see the GUI go to"

# Standard model folders of a ComfyUI checkout (ComfyUI maps the legacy "clip"/"unet" names itself).
USER_MODEL_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models", "unet",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "t2i_adapter",
    "gligen", "upscale_models", "latent_upscale_models", "hypernetworks", "photomaker", "classifiers",
    "model_patches", "audio_encoders",
)


def cuda_available(python):
    """Whether torch in ``python`` sees a GPU. Cheap path first: no NVIDIA device node means no CUDA."""
    if os.environ.get("ATELIER_FORCE_CPU"):
        return False
    if not any(pathlib.Path("/dev").glob("nvidia[0-9]*")) and not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


# --------------------------------------------------------------------------------------------------
# ports


def port_in_use(port, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host="127.0.0.1"):
    """A port nobody listens on now (the OS picks it; a race with another process is detected at start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# the server


def declared_pack_nodes(pack_dir=PACK_ROOT):
    """Node ids the pack declares, read from the ``NODE_CLASS_MAPPINGS = {...}`` literals in nodes/*.py
    (parsed, not imported: the runner must not import the pack or ComfyUI)."""
    ids = set()
    for path in sorted((pathlib.Path(pack_dir) / "nodes").glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue  # ComfyUI's import of the pack will fail and say why
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in targets) and isinstance(
                    node.value, ast.Dict):
                ids.update(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return sorted(ids)


def user_models_yaml(comfy_path, dest):
    """Write an extra_model_paths yaml that makes ``<comfy>/models/*`` visible to a server whose base
    directory is elsewhere (the user's own model files, read only)."""
    models = pathlib.Path(comfy_path) / "models"
    lines = ["atelier_user_comfyui:", f"  base_path: {json.dumps(str(models))}"]
    for folder in USER_MODEL_FOLDERS:
        if (models / folder).is_dir():
            lines.append(f"  {folder}: {folder}")
    # the pack's own folders live under models/ too
    for child in sorted(models.iterdir()) if models.is_dir() else []:
        if child.is_dir() and child.name not in USER_MODEL_FOLDERS and not child.name.startswith("."):
            lines.append(f"  {child.name}: {json.dumps(child.name)}")
    pathlib.Path(dest).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(dest).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pathlib.Path(dest)


def _die_with_parent():
    """In the child, before exec: on Linux, ask the kernel to end the server when its parent dies, so a
    killed test run or runner never leaves an orphan ComfyUI holding a port and memory."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ComfyServer:
    """A ComfyUI subprocess with this pack loaded. Use as a context manager; ``stop()`` always runs.

    comfyui_path: the checkout (see find_comfyui). base_dir: the --base-directory (a fresh temp folder
    when None; removed at stop unless keep_base_dir). user_models: also search ``<comfy>/models``.
    extra_model_paths: more extra_model_paths yaml files. output_dir/input_dir: override those folders.
    expected_nodes: node ids that must be in /object_info after start (default: those in nodes/*.py).
    """

    def __init__(self, comfyui_path=None, python=None, *, base_dir=None, port=None, user_models=False,
                 extra_model_paths=(), output_dir=None, input_dir=None, cpu=None, extra_args=(),
                 startup_timeout=300.0, keep_base_dir=False, pack_dir=PACK_ROOT, pack_name=PACK_LINK_NAME,
                 expected_nodes=None):
        self.comfyui_path = find_comfyui(comfyui_path)
        self.python = python or find_python(self.comfyui_path)
        self._own_base = base_dir is None
        self.base_dir = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="atelier-comfy-")).resolve()
        self.keep_base_dir = keep_base_dir
        self.requested_port = port
        self.port = None
        self.user_models = user_models
        self.extra_model_paths = [pathlib.Path(p).resolve() for p in extra_model_paths]
        self.output_dir = pathlib.Path(output_dir).resolve() if output_dir else None
        self.input_dir = pathlib.Path(input_dir).resolve() if input_dir else None
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.pack_dir = pathlib.Path(pack_dir).resolve()
        self.pack_name = pack_name
        self.expected_nodes = expected_nodes  # None: the ids declared in nodes/*.py
        self.proc = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = None

    # ---- life cycle -------------------------------------------------------------------------------

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self):
        return self.base_dir / "models"

    @property
    def pack_link(self):
        return self.base_dir / "custom_nodes" / self.pack_name

    def _prepare_base(self):
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.pack_link.is_symlink() or self.pack_link.exists():
            if self.pack_link.resolve() != self.pack_dir:
                raise ServerStartError(f"{self.pack_link} exists and is not a link to {self.pack_dir}")
        else:
            self.pack_link.symlink_to(self.pack_dir, target_is_directory=True)

    def command(self):
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-api-nodes", "--disable-auto-launch",
               "--database-url", "sqlite:///" + str(self.base_dir / "user" / "comfyui.db"),
               "--disable-assets-autoscan", "--preview-method", "none"]
        yamls = list(self.extra_model_paths)
        if self.user_models:
            yamls.append(user_models_yaml(self.comfyui_path, self.base_dir / "user_models.yaml"))
        for yaml_path in yamls:
            cmd += ["--extra-model-paths-config", str(yaml_path)]
        if self.output_dir:
            cmd += ["--output-directory", str(self.output_dir)]
        if self.input_dir:
            cmd += ["--input-directory", str(self.input_dir)]
        cpu = self.cpu if self.cpu is not None else not cuda_available(self.python)
        if cpu:
            cmd.append("--cpu")
        return cmd + self.extra_args

    def start(self):
        if self.proc is not None:
            return self
        self._prepare_base()
        if self.requested_port:
            if port_in_use(self.requested_port):
                raise PortInUse(
                    f"port {self.requested_port} on 127.0.0.1 is already in use (another ComfyUI?). "
                    "Stop that program or choose another port (leave --port out to get a free one)."
                )
            self.port = self.requested_port
        else:
            self.port = free_port()
        cmd = self._cmd = self.command()
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the test venv's path must not leak into ComfyUI's Python
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_path, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
            self._check_pack_loaded()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "address already in use" in tail.lower() or "errno 98" in tail.lower():
                    raise PortInUse(f"ComfyUI could not listen on port {self.port}: it is already in use.\n"
                                    f"--- ComfyUI log (last lines) ---\n{tail}")
                raise ServerStartError(
                    f"ComfyUI exited with code {code} while starting.\n  command: {self.command_for_display()}\n  in: {self.comfyui_path}\n"
                    f"--- ComfyUI log (last lines) ---\n{tail}"
                )
            if READY_MARKER in self.log_text():
                try:
                    stats = self.get_json("/system_stats", timeout=5)
                except (OSError, ComfyError):
                    stats = None
                if stats is not None:
                    argv = stats.get("system", {}).get("argv", [])
                    if str(self.base_dir) not in argv:
                        raise PortInUse(f"another server answers on port {self.port}; it is not the ComfyUI we started")
                    return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"ComfyUI did not become ready within {self.startup_timeout:.0f} s.\n"
                    f"--- ComfyUI log (last lines) ---\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def command_for_display(self):
        return shlex.join(getattr(self, "_cmd", None) or [str(self.python), "main.py"])

    def import_failures(self):
        """Log lines saying that our pack failed to import (ComfyUI's exit code never says so)."""
        text = self.log_text()
        link = str(self.pack_link)
        bad = [line.strip() for line in text.splitlines()
               if "IMPORT FAILED" in line and (link in line or str(self.pack_dir) in line)]
        if bad:
            # the traceback ComfyUI logs before "Cannot import <path> module for custom nodes: <error>"
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if "Cannot import" in line and link in line:
                    start = max(0, i - 25)
                    bad = lines[start:i + 1] + bad
                    break
        return bad

    def _check_pack_loaded(self):
        bad = self.import_failures()
        if bad:
            raise PackImportFailed("ComfyUI could not import the Atelier pack:\n" + "\n".join(bad))
        expected = declared_pack_nodes(self.pack_dir) if self.expected_nodes is None else self.expected_nodes
        if expected and "--disable-all-custom-nodes" not in self.extra_args:
            listed = set(self.object_info())
            missing = sorted(set(expected) - listed)
            if missing:
                raise PackImportFailed(
                    f"ComfyUI loaded the pack but /object_info lacks these Atelier nodes: {', '.join(missing)} "
                    f"(another pack may define the same ids, or the ids differ from nodes/*.py).\n"
                    f"--- ComfyUI log (last lines) ---\n{self.log_tail()}"
                )

    def pack_nodes(self, object_info=None):
        """Node ids this server registered from our pack (object_info ``python_module``)."""
        info = object_info if object_info is not None else self.object_info()
        module = f"custom_nodes.{self.pack_name}"
        return sorted(k for k, v in info.items() if v.get("python_module") == module)

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait(timeout=20)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_base and not self.keep_base_dir and self.base_dir.exists():
            self._saved_log = self.log_text()
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # ---- logs ------------------------------------------------------------------------------------

    def log_text(self):
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return getattr(self, "_saved_log", "")

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- HTTP ------------------------------------------------------------------------------------

    def request(self, path, data=None, timeout=60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path, timeout=60):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} answered HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def post_json(self, path, data, timeout=60):
        status, body = self.request(path, data, timeout=timeout)
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {"raw": body.decode("utf-8", "replace")}
        return status, payload

    def object_info(self, refresh=False):
        """The server's /object_info (cached; ``refresh`` after adding model files)."""
        if refresh or getattr(self, "_object_info", None) is None:
            self._object_info = self.get_json("/object_info")
        return self._object_info
