"""Turn a ComfyUI *source* (a release tarball or an unpacked folder) into a ComfyUI tree the tests can run.

    python scripts/comfyui_source.py SOURCE [--cache DIR]

Prints the path of the ComfyUI tree (the folder holding ``main.py``) on stdout; every message for people
goes to stderr. A folder is used where it is (ComfyUI is never written to: the runner gives it a temporary
``--base-directory``). A tarball is unpacked once into ``DIR/<sha256>/`` (default ``.cache/comfyui`` in the
pack, which git ignores), under a file lock, into a temporary folder that is renamed only once the tree is
complete and checked. So a second test run reuses it, two runs at once share one unpack, and an interrupted
unpack is never trusted: it is deleted by the next run.

Exit status: 0 with the path printed, 2 with a message saying what was wrong and how to fix it.
Standard library only: this runs before the test venv exists.
"""
import argparse
import contextlib
import hashlib
import os
import pathlib
import shutil
import sys
import tarfile
import time

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CACHE = PACK_ROOT / ".cache" / "comfyui"
COMPLETE = ".atelier-unpacked"  # written last, inside the finished tree's parent folder
# what every ComfyUI source tree has; a tarball without them is not ComfyUI
MARKERS = ("main.py", "folder_paths.py", "comfyui_version.py", "comfy", "requirements.txt")


class SourceError(Exception):
    """Shown to the user as is: what was wrong and how to fix it."""


def say(message):
    print(f"== {message}", file=sys.stderr, flush=True)


def is_comfyui_tree(path):
    path = pathlib.Path(path)
    return all((path / name).exists() for name in MARKERS) and (path / "comfy").is_dir()


def find_tree(root):
    """The ComfyUI tree in ``root``: root itself or one folder below it (tarballs wrap it in ``ComfyUI/``)."""
    root = pathlib.Path(root)
    if is_comfyui_tree(root):
        return root
    found = [child for child in sorted(root.iterdir()) if child.is_dir() and is_comfyui_tree(child)]
    return found[0] if len(found) == 1 else None


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an fcntl lock on ``path``; say so when another run holds it (it is unpacking the same source)."""
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another test run that is unpacking into {path.parent} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def writable_cache(cache):
    cache = pathlib.Path(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SourceError(
            f"cannot write the ComfyUI cache folder {cache} ({exc.strerror or exc}). Make it writable or point "
            f"ATELIER_COMFYUI_CACHE at a writable folder.") from exc
    return cache


def unpack(tarball, cache):
    """The ComfyUI tree unpacked from ``tarball`` under ``cache``, unpacking it first if needed."""
    tarball = pathlib.Path(tarball)
    if not tarball.is_file():
        raise SourceError(f"the ComfyUI source {tarball} does not exist (ATELIER_COMFYUI_SOURCE names a tarball "
                          "or a folder of a ComfyUI source tree).")
    cache = writable_cache(cache)
    key = sha256_of(tarball)
    final = cache / key
    done = final / COMPLETE
    if done.is_file() and (tree := find_tree(final)) is not None:
        return tree
    with exclusive_lock(cache / f"{key}.lock"):
        if done.is_file() and (tree := find_tree(final)) is not None:
            return tree  # another run finished it while we waited
        for stale in [final, *cache.glob(f"{key}.partial-*")]:
            if stale.exists():
                say(f"removing an unfinished unpack: {stale}")
                shutil.rmtree(stale)
        partial = cache / f"{key}.partial-{os.getpid()}"
        partial.mkdir()
        say(f"unpacking {tarball.name} (sha256 {key[:12]}...) into {final}")
        started = time.monotonic()
        try:
            with tarfile.open(tarball) as archive:
                # "data": nothing is written outside the folder (no absolute paths, outward links, devices)
                archive.extractall(partial, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise SourceError(
                f"the ComfyUI source {tarball} could not be unpacked ({type(exc).__name__}: {exc}); the file is "
                "truncated or damaged: fetch it again.") from exc
        except BaseException:  # Ctrl-C: leave nothing half-unpacked behind
            shutil.rmtree(partial, ignore_errors=True)
            raise
        tree = find_tree(partial)
        if tree is None:
            shutil.rmtree(partial, ignore_errors=True)
            raise SourceError(
                f"{tarball} is a tarball, but not of a ComfyUI source tree: none of its folders holds "
                f"{', '.join(MARKERS)}. Point ATELIER_COMFYUI_SOURCE at a ComfyUI release tarball.")
        (partial / COMPLETE).write_text(f"{tarball}\nsha256 {key}\n", encoding="utf-8")
        os.replace(partial, final)
        say(f"unpacked in {time.monotonic() - started:.1f} s")
    return find_tree(final)


def resolve(source, cache=DEFAULT_CACHE):
    source = pathlib.Path(source).expanduser()
    if source.is_dir():
        tree = find_tree(source)
        if tree is None:
            raise SourceError(f"the folder {source} is not a ComfyUI source tree (it lacks {', '.join(MARKERS)}).")
        return tree.resolve()
    return unpack(source.resolve(), cache).resolve()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a ComfyUI source tarball (.tar.gz) or folder")
    ap.add_argument("--cache", default=os.environ.get("ATELIER_COMFYUI_CACHE") or str(DEFAULT_CACHE),
                    help="where tarballs are unpacked (default: $ATELIER_COMFYUI_CACHE or .cache/comfyui)")
    args = ap.parse_args(argv)
    try:
        print(resolve(args.source, args.cache))
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-unpacked is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
