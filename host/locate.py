"""Finding ComfyUI and its Python, and importing ComfyUI from a command-line tool (no ComfyUI import here
until :func:`attach` is called)."""
import os
import pathlib
import sys

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]


class ComfyNotFound(RuntimeError):
    """No usable ComfyUI; the message says how to point the pack at one."""


def is_comfyui(path):
    path = pathlib.Path(path)
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "folder_paths.py").is_file()


def find_comfyui(explicit=None):
    """The ComfyUI checkout to use: ``explicit``, else ``$COMFYUI_PATH``, else the ComfyUI this pack sits in."""
    candidates = []
    if explicit:
        candidates.append(("--comfyui", explicit))
    elif os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH", os.environ["COMFYUI_PATH"]))
    else:
        # the pack as ComfyUI sees it: a folder (or a symlink) in <ComfyUI>/custom_nodes/
        for root in (pathlib.Path(os.path.abspath(__file__)).parents[1], PACK_ROOT):
            if root.parent.name == "custom_nodes" and is_comfyui(root.parent.parent):
                candidates.append(("the ComfyUI this pack is installed in", root.parent.parent))
                break
    for origin, path in candidates:
        path = pathlib.Path(path).expanduser().resolve()
        if is_comfyui(path):
            return path
        raise ComfyNotFound(
            f"{origin} points at {path}, which is not a ComfyUI checkout (no main.py / comfy/ there).")
    raise ComfyNotFound(
        "No ComfyUI found. Set COMFYUI_PATH to a ComfyUI checkout (e.g. `COMFYUI_PATH=~/ComfyUI`), pass "
        "--comfyui PATH, or install this pack as ComfyUI/custom_nodes/atelier. "
        "ComfyUI: https://github.com/comfyanonymous/ComfyUI (git clone, then pip install -r requirements.txt).")


def find_python(comfy_path):
    """ComfyUI's Python: ``$COMFYUI_PYTHON``, else a venv inside the checkout, else this interpreter."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    comfy_path = pathlib.Path(comfy_path)
    for rel in (".venv/bin/python", "venv/bin/python", ".venv/Scripts/python.exe", "venv/Scripts/python.exe"):
        candidate = comfy_path / rel
        if candidate.exists():
            return str(candidate)
    return sys.executable


def attach(comfyui=None, cpu=None):
    """Make ComfyUI importable in this process (a command-line tool run with ComfyUI's Python) and set its
    options without parsing our command line: CPU when there is no CUDA (or ``cpu``). Returns its root.

    The one ``sys.path`` change of the pack: ComfyUI is not an installed package, its modules import each
    other by top-level names from its own folder."""
    import torch

    root = str(find_comfyui(comfyui))
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options  # noqa: F401  keeps ComfyUI from parsing sys.argv
    import comfy.cli_args

    if cpu if cpu is not None else not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    return root
