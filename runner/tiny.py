"""A tiny random-weight SD1.5 checkpoint for plumbing checks (images are noise), made once and cached.

It is built by runner/tiny_sd15.py run with ComfyUI's Python (so its layout is the one that ComfyUI's
model detection expects), checked there (ComfyUI detects SD1.5, the UNet's ε varies, the VAE decodes finite
values, two prompts condition differently), then kept in a cache folder keyed by the builder's source, the
seed and the ComfyUI version, so tests and ``--tiny`` runs do not rebuild it (about 15 s and 630 MB).
A file lock lets concurrent runs share one build.
"""
import hashlib
import os
import pathlib
import subprocess

from ..common.files import cache_dir, locked
from ..host.locate import PACK_ROOT
from .errors import ComfyError

BUILDER = pathlib.Path(__file__).with_name("tiny_sd15.py")  # its source is part of the cache key
NOISE_WARNING = (
    "!" * 78 + "\n"
    "!!  --tiny: every checkpoint is replaced by a TINY RANDOM-WEIGHT model.\n"
    "!!  The images are NOISE. This only checks that the workflow runs end to end.\n"
    + "!" * 78
)


def builder_command(python, *args):
    """The command that runs runner/tiny_sd15.py with ComfyUI's Python (see builder_env)."""
    return [str(python), "-m", "atelier.runner.tiny_sd15", *map(str, args)]


def builder_env(comfyui_path):
    """ComfyUI's folder first on the path (its top-level modules), then the pack folder (for ``atelier``)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(comfyui_path), str(PACK_ROOT)]))


def _comfyui_version(comfyui_path):
    try:
        return (pathlib.Path(comfyui_path) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return ""


def ensure_tiny_sd15(comfyui_path, python, seed=0, timeout=900):
    """Path of the cached tiny checkpoint, building (and checking) it first if needed."""
    key = hashlib.sha256(BUILDER.read_bytes() + f"seed={seed}".encode()
                         + _comfyui_version(comfyui_path).encode()).hexdigest()[:12]
    target = pathlib.Path(cache_dir()) / f"tiny_sd15_{key}.safetensors"
    if target.is_file():
        return target
    with locked(str(target) + ".lock"):
        if target.is_file():  # another process built it while we waited
            return target
        # keep the .safetensors ending: ComfyUI's loader picks the format by it (the check loads this file)
        partial = target.with_name(f"{target.stem}.{os.getpid()}.part{target.suffix}")
        try:
            proc = subprocess.run(builder_command(python, partial, "--seed", seed), cwd=comfyui_path,
                                  env=builder_env(comfyui_path), capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0 or not partial.is_file():
                raise ComfyError(f"building the tiny checkpoint failed (exit {proc.returncode}):\n"
                                 + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
            os.replace(str(partial) + ".json", str(target) + ".json")
            os.replace(partial, target)
        finally:
            for leftover in (partial, pathlib.Path(str(partial) + ".json")):
                leftover.unlink(missing_ok=True)
    return target


def place_checkpoint(source, folder, names):
    """Make ``source`` visible under each file name in ``folder`` (symlinks; existing entries replaced)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    placed = []
    for name in names:
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
        placed.append(link)
    return placed
