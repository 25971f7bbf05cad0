"""The pack registers its model folders without clobbering what a user configured."""
import sys
import types

import pytest


@pytest.fixture
def fake_folder_paths(monkeypatch, tmp_path):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {
        "loras": ([str(tmp_path / "models" / "loras")], {".safetensors"}),
        # a user's extra_model_paths.yaml entry, applied before packs load
        "open_clip": (["/data/my_clip"], {".safetensors"}),
    }
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def test_registers_pack_folders_and_keeps_user_paths(pack, fake_folder_paths):
    from atelier.host import folders as _paths

    assert _paths.register_model_folders() is True
    fnp = fake_folder_paths.folder_names_and_paths
    models = fake_folder_paths.models_dir
    # the user's path stays first, ours is appended, their extensions are untouched
    assert fnp["open_clip"] == (["/data/my_clip", f"{models}/open_clip"], {".safetensors"})
    for name in ("prompt_expansion", "atelier_knowledge", "atelier_style_db"):
        assert fnp[name][0] == [f"{models}/{name}"]
    assert fnp["loras"][0] == [f"{models}/loras"]
    # registering twice adds nothing
    _paths.register_model_folders()
    assert fnp["open_clip"][0] == ["/data/my_clip", f"{models}/open_clip"]


def test_model_folder_creates_first_path(pack, fake_folder_paths):
    from atelier.host import folders as _paths

    _paths.register_model_folders()
    path = _paths.first_path("atelier_style_db")
    assert path.endswith("models/atelier_style_db")
    assert __import__("os").path.isdir(path)
