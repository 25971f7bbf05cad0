"""runner/tiny.py: the cached tiny checkpoint and its placement, with a fake maker script."""
import sys

import pytest

from runner import tiny
from runner.server import ComfyError

FAKE_TOOL = """
import pathlib, sys
out = pathlib.Path(sys.argv[1])
assert "--tiny" in sys.argv
calls = pathlib.Path(__file__).with_name("calls.txt")
calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
out.write_bytes(b"fake-safetensors")
"""


@pytest.fixture
def fake_tool(tmp_path, monkeypatch):
    tool = tmp_path / "tools" / "make_random_sd15.py"
    tool.parent.mkdir()
    tool.write_text(FAKE_TOOL)
    monkeypatch.setenv("ATELIER_TINY_SD15_TOOL", str(tool))
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    return tool


def test_built_once_then_cached(fake_tool, tmp_path):
    first = tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    second = tiny.ensure_tiny_sd15(tmp_path, sys.executable)
    assert first == second and first.read_bytes() == b"fake-safetensors"
    assert first.parent == tmp_path / "cache"
    assert (fake_tool.parent / "calls.txt").read_text() == "x"
    assert not list(first.parent.glob("*.part"))


def test_a_failing_maker_is_reported(fake_tool, tmp_path):
    fake_tool.write_text("raise SystemExit('no comfy on sys.path')")
    with pytest.raises(ComfyError, match=r"building the tiny checkpoint failed \(exit 1\):\nno comfy on sys.path"):
        tiny.ensure_tiny_sd15(tmp_path, sys.executable)


def test_place_checkpoint_links_every_name(tmp_path):
    source = tmp_path / "tiny.safetensors"
    source.write_bytes(b"w")
    folder = tmp_path / "models" / "checkpoints"
    (folder / "sub").mkdir(parents=True)
    (folder / "old.safetensors").write_bytes(b"old")
    placed = tiny.place_checkpoint(source, folder, ["old.safetensors", "sub/x.safetensors"])
    assert [p.read_bytes() for p in placed] == [b"w", b"w"]
    assert all(p.is_symlink() for p in placed)


def test_missing_tool_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_TINY_SD15_TOOL", str(tmp_path / "nope.py"))
    monkeypatch.setattr(tiny, "PACK_ROOT", tmp_path / "a" / "b" / "c" / "pack")
    with pytest.raises(ComfyError, match="--tiny needs make_random_sd15.py .*nope.py"):
        tiny.find_tool()
