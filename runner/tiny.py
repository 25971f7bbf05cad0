"""A tiny random-weight SD1.5 checkpoint for plumbing checks (images are noise), made once and cached.

It is built by ``make_random_sd15.py --tiny`` run with ComfyUI's Python (so it matches that ComfyUI's
model detection), then kept in a cache folder keyed by the tool's content, so tests and ``--tiny`` runs
do not rebuild it (about 20 s and 630 MB). A file lock lets concurrent runs share one build.
"""
import contextlib
import hashlib
import os
import pathlib
import subprocess

from .server import PACK_ROOT, ComfyError

TOOL_NAME = "make_random_sd15.py"
NOISE_WARNING = (
    "!" * 78 + "\n"
    "!!  --tiny: every checkpoint is replaced by a TINY RANDOM-WEIGHT model.\n"
    "!!  The images are NOISE. This only checks that the workflow runs end to end.\n"
    + "!" * 78
)


def find_tool():
    """``$ATELIER_TINY_SD15_TOOL``, else ``shared/tools/make_random_sd15.py`` beside the repository (or
    beside one of its parent folders, for git worktrees), else tools/ in the pack."""
    candidates = []
    if os.environ.get("ATELIER_TINY_SD15_TOOL"):
        candidates.append(pathlib.Path(os.environ["ATELIER_TINY_SD15_TOOL"]))
    candidates += [parent / "shared" / "tools" / TOOL_NAME for parent in list(PACK_ROOT.parents)[:3]]
    candidates.append(PACK_ROOT / "tools" / TOOL_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ComfyError(
        f"--tiny needs {TOOL_NAME} (it writes the random checkpoint); looked in: "
        + ", ".join(str(p) for p in candidates) + ". Set ATELIER_TINY_SD15_TOOL to its path."
    )


def cache_dir():
    root = os.environ.get("ATELIER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "atelier")
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path):
    """An exclusive file lock (fcntl), held for the ``with`` block."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_sd15(comfyui_path, python, seed=0, timeout=900):
    """Path of the cached tiny checkpoint, building it first if needed."""
    tool = find_tool()
    key = hashlib.sha256(tool.read_bytes() + f"seed={seed}".encode()).hexdigest()[:12]
    target = cache_dir() / f"tiny_sd15_{key}.safetensors"
    if target.is_file():
        return target
    with locked(str(target) + ".lock"):
        if target.is_file():  # another process built it while we waited
            return target
        partial = target.with_name(target.name + f".{os.getpid()}.part")
        env = dict(os.environ, PYTHONPATH=str(comfyui_path))
        proc = subprocess.run([python, str(tool), str(partial), "--tiny", "--seed", str(seed)],
                              cwd=comfyui_path, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            raise ComfyError(f"building the tiny checkpoint failed (exit {proc.returncode}):\n"
                             + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
        os.replace(partial, target)
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
