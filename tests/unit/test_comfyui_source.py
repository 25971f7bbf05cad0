"""scripts/comfyui_source.py: a ComfyUI source tarball becomes a trusted tree exactly once, or a clear error.

The tarballs here are made by the test: a minimal tree with the files every ComfyUI source has.
"""
import io
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "comfyui_source.py"
FILES = {"main.py": "print('comfy')\n", "folder_paths.py": "", "comfyui_version.py": '__version__ = "0.15.1"\n',
         "requirements.txt": "numpy\n", "comfy/__init__.py": ""}


def make_tarball(path, files=FILES, top="ComfyUI"):
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def resolve(source, cache, **kwargs):
    return subprocess.run([sys.executable, str(SCRIPT), str(source), "--cache", str(cache)],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_unpacks_once_then_reuses(tmp_path):
    tarball = make_tarball(tmp_path / "comfyui.tar.gz")
    first = resolve(tarball, tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    tree = pathlib.Path(first.stdout.strip())
    assert (tree / "main.py").read_text() == "print('comfy')\n" and tree.name == "ComfyUI"
    assert "unpacking comfyui.tar.gz" in first.stderr
    second = resolve(tarball, tmp_path / "cache")
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "unpacking" not in second.stderr  # reused, not unpacked again


def test_a_folder_is_used_where_it_is(tmp_path):
    make_tarball(tmp_path / "c.tar.gz")
    with tarfile.open(tmp_path / "c.tar.gz") as archive:
        archive.extractall(tmp_path / "src", filter="data")
    proc = resolve(tmp_path / "src", tmp_path / "cache")
    assert proc.returncode == 0 and pathlib.Path(proc.stdout.strip()) == (tmp_path / "src" / "ComfyUI").resolve()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("cut", [10, 200, 0.5])
def test_a_truncated_tarball_is_refused_and_nothing_is_kept(tmp_path, cut):
    good = make_tarball(tmp_path / "good.tar.gz", {**FILES, "comfy/big.py": os.urandom(40000).hex()}).read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good[: int(len(good) * cut) if isinstance(cut, float) else cut])
    proc = resolve(bad, tmp_path / "cache")
    assert proc.returncode == 2
    assert "could not be unpacked" in proc.stderr and "truncated or damaged" in proc.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_tarball_of_something_else_is_refused(tmp_path):
    other = make_tarball(tmp_path / "other.tar.gz", {"setup.py": "", "README.md": "not comfy"}, top="project")
    proc = resolve(other, tmp_path / "cache")
    assert proc.returncode == 2 and "not of a ComfyUI source tree" in proc.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_missing_source_and_a_folder_that_is_not_comfyui(tmp_path):
    proc = resolve(tmp_path / "nope.tar.gz", tmp_path / "cache")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = resolve(tmp_path / "empty", tmp_path / "cache")
    assert proc.returncode == 2 and "is not a ComfyUI source tree" in proc.stderr


def test_an_unwritable_cache_folder_says_how_to_fix_it(tmp_path):
    tarball = make_tarball(tmp_path / "c.tar.gz")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder's parent should be")
    proc = resolve(tarball, blocker / "cache")
    assert proc.returncode == 2
    assert "cannot write the ComfyUI cache folder" in proc.stderr and "ATELIER_COMFYUI_CACHE" in proc.stderr
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        proc = resolve(tarball, ro / "cache")
        assert proc.returncode == 2 and "cannot write" in proc.stderr


def test_an_interrupted_unpack_is_never_trusted(tmp_path):
    tarball = make_tarball(tmp_path / "c.tar.gz")
    cache = tmp_path / "cache"
    first = resolve(tarball, cache)
    tree = pathlib.Path(first.stdout.strip())
    key_dir = tree.parent
    # what a killed run leaves: a partial folder, and a final folder without its completion mark
    (cache / f"{key_dir.name}.partial-99999" / "ComfyUI").mkdir(parents=True)
    (key_dir / ".atelier-unpacked").unlink()
    (tree / "main.py").write_text("half\n")
    again = resolve(tarball, cache)
    assert again.returncode == 0
    assert "removing an unfinished unpack" in again.stderr and "unpacking" in again.stderr
    assert (tree / "main.py").read_text() == "print('comfy')\n"
    assert not list(cache.glob("*.partial-*"))


def test_two_runs_at_once_share_one_unpack(tmp_path):
    tarball = make_tarball(tmp_path / "c.tar.gz", {**FILES, **{f"comfy/m{i}.py": "x = 1\n" * 2000 for i in range(300)}})
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(tarball), "--cache", str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0][0] == outs[1][0]
    assert sum("unpacking c.tar.gz" in err for _, err in outs) == 1  # one unpacked, the other waited or reused
