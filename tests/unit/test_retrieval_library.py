"""The core calls behind the retrieval nodes: database listing and lookup, the Style DB Build work, the
retriever's query, and the open_clip Loader's architecture configs, guesses and devices."""
import json
import os

import numpy as np
import pytest
import torch

from atelier.common.files import atomic_folder
from atelier.common.progress import Progress
from atelier.retrieval import embedder as E
from atelier.retrieval.db import load_db, write_db
from atelier.retrieval.library import build_style_db, db_fingerprint, db_names, find_db, folder_fingerprint
from atelier.retrieval.query import query_embedding, retrieve
from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder, tiny_config

N_IMAGES = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    name, path = make_tiny_open_clip(tmp_path_factory.mktemp("clip") / "tiny.safetensors", seed=0)
    return E.OpenClipEmbedder(name, str(path), device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("paintings")
    make_wikiart_folder(root, n=N_IMAGES)
    return root


def listing(root):
    """What ComfyUI's get_filename_list gives for a folder without extensions: every file, relative."""
    return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]


def tiny_db(path, n=3):
    rows = [{"path": f"{i}.png", "sha256": str(i)} for i in range(n)]
    write_db(path, np.eye(n, 4, dtype=np.float32), np.ones(n), rows, {"name": "x", "weights_hash": "0", "dim": 4})


# -- listing and finding databases ------------------------------------------------------------------------------
def test_listing_leaves_out_folders_being_written_and_partial_builds(tmp_path):
    tiny_db(tmp_path / "done")
    (tmp_path / "big.partial").mkdir()
    (tmp_path / "big.partial" / "manifest.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a database")
    with atomic_folder(tmp_path / "new") as tmp:  # a database being written: '.new.<random>.tmp/'
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            f.write("{}")
        assert os.path.basename(tmp).startswith(".new.")
        assert db_names(listing(tmp_path)) == ["done/manifest.json"]
    assert db_names(listing(tmp_path)) == ["done/manifest.json", "new/manifest.json"]
    assert db_names(["a/sub/manifest.json", "a/.cache/manifest.json", "b/manifest.json.bak"]) == \
        ["a/sub/manifest.json"]


def test_find_db_by_manifest_or_name_in_the_first_root_holding_it(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    tiny_db(second / "styles")
    assert find_db("styles/manifest.json", [str(first), str(second)]) == str(second / "styles")
    assert find_db("styles", [str(first), str(second)]) == str(second / "styles")
    with pytest.raises(FileNotFoundError, match=r"'gone' not found in .*first.*second.*Style DB Build"):
        find_db("gone/manifest.json", [str(first), str(second)])
    manifest = second / "styles" / "manifest.json"
    assert db_fingerprint("styles/manifest.json", [str(second)]) == str(os.path.getmtime(manifest))
    assert db_fingerprint("gone/manifest.json", [str(second)]) == "gone/manifest.json"


def test_folder_fingerprint_follows_the_files(tmp_path):
    make_wikiart_folder(tmp_path / "imgs", n=3, with_csv=False)
    before = folder_fingerprint(str(tmp_path / "imgs"), "db", "rebuild")
    assert before.startswith(f"{tmp_path / 'imgs'}|db|rebuild|3|")
    assert folder_fingerprint(str(tmp_path / "imgs"), "db", "rebuild") == before
    newest = max(os.path.getmtime(p) for p in (tmp_path / "imgs").rglob("*.png"))
    os.utime(next((tmp_path / "imgs").rglob("*.png")), (newest + 10, newest + 10))
    assert folder_fingerprint(str(tmp_path / "imgs"), "db", "rebuild").endswith(f"|3|{newest + 10}")
    assert folder_fingerprint(str(tmp_path / "missing"), "db", "x") == f"{tmp_path / 'missing'}|db|x|0|0.0"


# -- the Style DB Build node's work -----------------------------------------------------------------------------
@pytest.mark.parametrize("db_name", ["", "  ", "a/b", ".hidden"])
def test_build_refuses_names_that_are_not_plain_folder_names(tmp_path, tiny, images, db_name):
    with pytest.raises(ValueError, match="db_name must be a plain directory name"):
        build_style_db(str(tmp_path), tiny, str(images), db_name)


def test_build_refuses_a_missing_folder_and_an_unknown_mode(tmp_path, tiny, images):
    with pytest.raises(ValueError, match="is not a folder; give the absolute path"):
        build_style_db(str(tmp_path), tiny, str(tmp_path / "nope"), "db")
    with pytest.raises(ValueError, match="mode must be one of build or resume, rebuild, add new images"):
        build_style_db(str(tmp_path), tiny, str(images), "db", mode="merge")


def test_build_then_add_reports_what_was_done(tmp_path, tiny, images):
    (images / "Cubism" / "broken.jpg").write_bytes(b"not a jpeg")
    try:
        db, report = build_style_db(str(tmp_path), tiny, f' "{images}" ', " styles ", batch_size=4,
                                    metadata_file=f"{images / 'metadata.csv'} ")
    finally:
        (images / "Cubism" / "broken.jpg").unlink()
    assert db.count == N_IMAGES and db.path == str(tmp_path / "styles")
    lines = report.splitlines()
    assert lines[0] == f"built {N_IMAGES} images from {N_IMAGES + 1} file(s); 0 duplicate(s), 0 non-image file(s) ignored"
    assert lines[1].startswith("skipped Cubism/broken.jpg: not a readable image")
    assert report.endswith(db.info_text()) and "genres (2): landscape, portrait" in report
    db, report = build_style_db(str(tmp_path), tiny, str(images), "styles", mode="add new images", batch_size=4)
    assert report.splitlines()[0] == f"added 0 image(s), {N_IMAGES} already embedded, 0 changed, 0 unreadable; " \
                                     f"database now has {N_IMAGES}"
    assert db.count == N_IMAGES


def test_interrupted_build_keeps_chunks_and_rebuild_discards_them(tmp_path, tiny, images):
    class StopAtOnce(Progress):
        def check_interrupt(self):
            raise KeyboardInterrupt

    # 'add new images' without a database builds one; chunks of 1024 files: the interrupt loses the only chunk
    with pytest.raises(KeyboardInterrupt):
        build_style_db(str(tmp_path), tiny, str(images), "db", mode="add new images", progress=StopAtOnce())
    assert (tmp_path / "db.partial" / "plan.json").is_file() and not (tmp_path / "db").exists()
    _, report = build_style_db(str(tmp_path), tiny, str(images), "db", mode="rebuild")
    assert report.startswith(f"discarding the previous partial build in {tmp_path / 'db.partial'} (resume off)\n"
                             f"built {N_IMAGES} images")
    assert not (tmp_path / "db.partial").exists()


def test_interrupted_add_leaves_the_database_as_it_was(tmp_path, tiny, images):
    class StopAtOnce(Progress):
        def check_interrupt(self):
            raise KeyboardInterrupt

    build_style_db(str(tmp_path), tiny, str(images), "db")
    before = (tmp_path / "db" / "manifest.json").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        build_style_db(str(tmp_path), tiny, str(images), "db", mode="add new images", progress=StopAtOnce())
    assert (tmp_path / "db" / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["db"]


# -- the retriever's query --------------------------------------------------------------------------------------
def test_query_mixes_text_and_the_mean_image_embedding(tiny):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, tiny.image_size, tiny.image_size, 3, generator=g)  # IMAGE: [B, H, W, C]
    t = tiny.encode_text(["a harbour"])[0]
    i = torch.nn.functional.normalize(tiny.encode_image(image.movedim(-1, 1)).mean(0), dim=0)
    q, desc = query_embedding(tiny, "  a harbour ", image, 0.25)
    ref = torch.nn.functional.normalize(0.75 * tiny.encode_text(["  a harbour "])[0] + 0.25 * i, dim=0)
    assert torch.allclose(q, ref, atol=1e-6) and desc == "text 'a harbour' + image (weight 0.25)"
    q, desc = query_embedding(tiny, "a harbour", image, 0.0)
    assert torch.allclose(q, t, atol=1e-6) and desc == "text 'a harbour'"
    q, desc = query_embedding(tiny, "", image, 0.0)  # an image alone counts fully
    assert torch.allclose(q, i, atol=1e-6) and desc == "image (weight 1.00)"
    with pytest.raises(ValueError, match="give a text query, an image, or both"):
        query_embedding(tiny, " ", None)


def test_retrieve_filters_and_reports(tmp_path, tiny, images):
    db, _ = build_style_db(str(tmp_path), tiny, str(images), "db", metadata_file=str(images / "metadata.csv"))
    out = retrieve(load_db(db.path), tiny, "waves", k=2, style=" ukiyo ", year_min=1800, preview_size=32)
    assert out.images.shape == (2, 32, 32, 3) and len(out.neighbors) == 2
    assert {m["style"] for m in out.neighbors.metadata} == {"Ukiyo E"}
    assert out.report.endswith("filters: style~'ukiyo', year in [1800, inf]")
    assert out.style_prompt.startswith("waves, painting by ")


# -- the open_clip Loader ---------------------------------------------------------------------------------------
def test_folder_configs_register_and_guide_the_guess(tmp_path):
    import open_clip

    (tmp_path / "Atelier-Folder-ViT.json").write_text(json.dumps(tiny_config(embed_dim=16)))
    (tmp_path / "notes.json").write_text(json.dumps({"not": "a config"}))
    (tmp_path / "broken.json").write_text("{")
    # weights of the same shapes, made under another (registered) name: only the folder's config names them
    _, weights = make_tiny_open_clip(tmp_path / "elsewhere" / "w.safetensors", name="Atelier-Folder-Src",
                                     config_dir=tmp_path / "elsewhere", embed_dim=16)
    os.replace(weights, tmp_path / "Atelier-Folder-ViT-v2.safetensors")
    assert open_clip.get_model_config("Atelier-Folder-ViT") is None
    names = E.architectures([str(tmp_path), str(tmp_path / "absent")])
    assert names[:3] == ["ViT-H-14", "ViT-L-14", "ViT-B-32"] and "Atelier-Folder-ViT" in names
    assert "notes" not in names and "broken" not in names
    clip = E.load_embedder("Atelier-Folder-ViT-v2.safetensors", str(tmp_path / "Atelier-Folder-ViT-v2.safetensors"),
                           folders=[str(tmp_path)], device="cpu")
    assert (clip.name, clip.dim) == ("Atelier-Folder-ViT", 16)
    assert E.weight_files(["a.safetensors", "b.json", "c.PT", "d.ckpt"]) == ["a.safetensors", "c.PT"]


def test_loader_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file 'x.safetensors' not found in \['/models'\]\. Put"):
        E.load_embedder("x.safetensors", None, folders=["/models"])
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the architecture of 'model.safetensors'"):
        E.load_embedder("model.safetensors", str(tmp_path / "model.safetensors"))
    assert E.loader_device("cpu", host_device=lambda: pytest.fail("not asked")) == "cpu"
    assert E.loader_device("auto", host_device=lambda: torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device 'gpu' asked but ComfyUI runs on CPU"):
        E.loader_device("gpu", host_device=lambda: torch.device("cpu"))
