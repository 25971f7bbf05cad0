"""Atomic writes, file hashes and locks: the only copies in the pack.

Every file the pack writes for a user (databases, caches, trained weights, configs) goes through
:func:`atomic_file` or :func:`atomic_folder`: the data is written to a temporary name in the same folder,
flushed to disk, then renamed over the target, so a reader sees the old file or the new one, never half of
one, and an interrupted or failed write leaves nothing behind.
"""
import contextlib
import hashlib
import os
import shutil
import tempfile
import threading

_HASHES = {}  # (real path, size, mtime_ns) -> sha256 hex
_HASHES_LOCK = threading.Lock()


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path`` (same ending, so writers that go by it still work); on success it
    is fsynced and renamed to ``path``, on any exception (Ctrl-C included) it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def atomic_write(path, data):
    """Write ``data`` to ``path`` atomically: bytes, str (as UTF-8), or a function that writes the file at the
    temporary path it is given (``lambda tmp: save_file(tensors, tmp)``)."""
    with atomic_file(path) as tmp:
        if callable(data):
            data(tmp)
            return
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an old folder is moved aside,
    then deleted), on any exception it is deleted and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):
            child = os.path.join(tmp, name)
            if os.path.isfile(child):
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(parent)


def file_sha256(path, chunk=1 << 22):
    """Hex sha256 of a file's bytes, remembered per (path, size, mtime) in this process: weights files are GBs."""
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    with _HASHES_LOCK:
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@contextlib.contextmanager
def locked(path, timeout=-1, message=None):
    """Hold an exclusive lock file (the ``filelock`` package) for the ``with`` block; ``message`` is printed
    when another process holds it and this one waits. ``timeout`` in seconds (-1: wait as long as it takes)
    raises ``filelock.Timeout`` when exceeded."""
    import filelock

    lock = filelock.FileLock(os.fspath(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if message:
            import sys

            print(message, file=sys.stderr, flush=True)
        lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        lock.release()


def cache_dir(*parts):
    """The pack's cache folder (``$ATELIER_CACHE_DIR``, else ``$XDG_CACHE_HOME/atelier`` or ``~/.cache/atelier``;
    the system temp folder when neither can be written), or a sub-folder of it; created if missing."""
    roots = [os.environ.get("ATELIER_CACHE_DIR"),
             os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "atelier"),
             os.path.join(tempfile.gettempdir(), "atelier-cache")]
    for root in filter(None, roots):
        path = os.path.join(root, *parts)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    raise OSError(f"no writable cache folder: set ATELIER_CACHE_DIR (tried {', '.join(filter(None, roots))})")
