"""runner/tiny.py: the cached tiny checkpoint and its placement, with a fake builder script.

(The real builder, runner/tiny_sd15.py, needs ComfyUI: tests/host/test_tiny_checkpoint.py checks it.)"""
import pathlib
import sys

import pytest

from atelier.runner import tiny
from atelier.runner.server import ComfyError

FAKE_BUILDER = """
import pathlib, sys
out = pathlib.Path(sys.argv[1])
assert sys.argv[2:] == ["--seed", "0"], sys.argv
calls = pathlib.Path(__file__).with_name("calls.txt")
calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
out.write_bytes(b"fake-safetensors")
pathlib.Path(str(out) + ".json").write_text('{"eps_std": 0.5}')
"""


@pytest.fixture
def fake_tool(tmp_path, monkeypatch):
    tool = tmp_path / "tools" / "tiny_sd15.py"
    tool.parent.mkdir()
    tool.write_text(FAKE_BUILDER)
    monkeypatch.setattr(tiny, "BUILDER", tool)
    monkeypatch.setattr(tiny, "builder_command", lambda python, *args: [str(python), str(tool), *map(str, args)])
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    return tool


def test_built_once_then_cached(fake_tool, tmp_path):
    first = tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    second = tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    assert first == second and first.read_bytes() == b"fake-safetensors"
    assert pathlib.Path(str(first) + ".json").read_text() == '{"eps_std": 0.5}'  # the builder's check report
    assert first.parent == tmp_path / "cache"
    assert (fake_tool.parent / "calls.txt").read_text() == "x"
    assert not list(first.parent.glob("*.part*"))


def test_the_cache_key_follows_the_comfyui_version(fake_tool, tmp_path):
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.15.1"\n')
    old = tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.16.0"\n')
    new = tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    assert old != new and (fake_tool.parent / "calls.txt").read_text() == "xx"


def test_a_failing_maker_is_reported(fake_tool, tmp_path):
    fake_tool.write_text("import sys; open(sys.argv[1], 'wb').write(b'half'); raise SystemExit('no comfy on sys.path')")
    with pytest.raises(ComfyError, match=r"building the tiny checkpoint failed \(exit 1\):\nno comfy on sys.path"):
        tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # nothing half-written is kept


def test_place_checkpoint_links_every_name(tmp_path):
    source = tmp_path / "tiny.safetensors"
    source.write_bytes(b"w")
    folder = tmp_path / "models" / "checkpoints"
    (folder / "sub").mkdir(parents=True)
    (folder / "old.safetensors").write_bytes(b"old")
    placed = tiny.place_checkpoint(source, folder, ["old.safetensors", "sub/x.safetensors"])
    assert [p.read_bytes() for p in placed] == [b"w", b"w"]
    assert all(p.is_symlink() for p in placed)
