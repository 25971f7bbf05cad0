"""common/files.py: atomic files and folders, the cached hash, the lock."""
import hashlib
import os
import subprocess
import sys
import time

import pytest

from atelier.common import files


def test_atomic_write_bytes_text_and_writer(tmp_path):
    files.atomic_write(tmp_path / "a.bin", b"\x00\x01")
    files.atomic_write(tmp_path / "b.txt", "é")
    files.atomic_write(tmp_path / "c.npy", lambda tmp: open(tmp, "w").write(os.path.splitext(tmp)[1]))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é"
    assert (tmp_path / "c.npy").read_text() == ".npy"  # the temporary name keeps the target's ending
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.npy"]


def test_atomic_file_gets_normal_permissions(tmp_path):
    files.atomic_write(tmp_path / "a", b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        files.atomic_write(target, write)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_folder_replaces_or_leaves_untouched(tmp_path):
    target = tmp_path / "db"
    with files.atomic_folder(target) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with files.atomic_folder(target) as tmp:
            open(os.path.join(tmp, "a"), "w").write("2")
            raise RuntimeError("failed half-way")
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["db"]
    with files.atomic_folder(target) as tmp:
        open(os.path.join(tmp, "b"), "w").write("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_file_sha256_matches_hashlib_and_notices_changes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    assert files.file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    time.sleep(0.01)
    path.write_bytes(b"abcd")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert files.file_sha256(path) == hashlib.sha256(b"abcd").hexdigest()


def test_locked_waits_for_the_other_holder_and_says_so(tmp_path, capsys):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys, time\n"
        f"l = filelock.FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(1.0)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with files.locked(lock, message="waiting for the other writer"):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 0.3
    assert "waiting for the other writer" in capsys.readouterr().err
