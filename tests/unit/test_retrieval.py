"""Style databases (the RDM paper's retrieval database): build, resume, add, shard+merge, search, filters, format checks.

A tiny open_clip ViT (random weights, real BPE tokenizer) embeds generated pattern images laid out like WikiArt.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.common import artdata
from atelier.common.progress import Progress
from atelier.retrieval import build as B
from atelier.retrieval.db import (FORMAT_VERSION, Filters, StyleDBError, load_db, topk, write_db)
from atelier.retrieval.embedder import OpenClipEmbedder
from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder

N_IMAGES = 14


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    name, path = make_tiny_open_clip(d / "tiny.safetensors", seed=0)
    torch.manual_seed(0)
    return OpenClipEmbedder(name, str(path), device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wikiart")
    make_wikiart_folder(root, n=N_IMAGES)
    return root


@pytest.fixture(scope="module")
def built(tiny, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dbs") / "full"
    B.build_db(folder, out, tiny, metadata_file=folder / "metadata.csv", batch_size=4, chunk_size=4, log=lambda m: None)
    return out


class Counting:
    """Wraps an embedder and counts the images it embeds (to prove what is and is not re-embedded)."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_preprocessed(self, pixels):
        self.count += pixels.shape[0]
        return self.inner.encode_preprocessed(pixels)


def load_pixels(path):
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def same_db(a, b):
    da, db = load_db(a), load_db(b)
    assert da.manifest["embedder"] == db.manifest["embedder"]
    assert da.manifest["skipped"] == db.manifest["skipped"]
    assert da.metadata == db.metadata
    assert np.array_equal(np.asarray(da.embeddings), np.asarray(db.embeddings))
    assert np.array_equal(da.norms, db.norms)


# -- parsing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel, expected", [
    ("Impressionism/claude-monet_water-lilies-1916.jpg",
     {"artist": "Claude Monet", "style": "Impressionism", "title": "Water Lilies", "year": "1916"}),
    ("Abstract_Expressionism/jackson-pollock_number-1.jpg",
     {"artist": "Jackson Pollock", "style": "Abstract Expressionism", "title": "Number 1", "year": ""}),
    ("Baroque/rembrandt_the-night-watch-1642-1.jpg",
     {"artist": "Rembrandt", "style": "Baroque", "title": "The Night Watch 1642 1", "year": ""}),
    ("holiday.png", {"artist": "", "style": "", "title": "Holiday", "year": ""}),
])
def test_wikiart_names_parse(rel, expected):
    got = artdata.parse_wikiart(rel)
    assert {k: got[k] for k in expected} == expected


def test_metadata_table_csv_and_jsonl(tmp_path):
    (tmp_path / "m.csv").write_text("file,genre,year\nMonet/a.jpg,landscape,1900\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "b.jpg", "genre": "portrait"}) + "\n")
    assert artdata.row_metadata("Monet/a.jpg", B.load_metadata_table(str(tmp_path / "m.csv")))["genre"] == "landscape"
    assert artdata.row_metadata("x/b.jpg", B.load_metadata_table(str(tmp_path / "m.jsonl")))["genre"] == "portrait"
    (tmp_path / "bad.csv").write_text("genre\nlandscape\n")
    with pytest.raises(StyleDBError, match="no file column"):
        B.load_metadata_table(str(tmp_path / "bad.csv"))


# -- embedder contract ------------------------------------------------------------------------------------------
def test_embedder_contract(tiny):
    t = tiny.encode_text(["a painting of a harbour", "a cat"])
    assert t.shape == (2, tiny.dim) and t.dtype == torch.float32 and not t.requires_grad
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    x = torch.rand(3, 3, tiny.image_size, tiny.image_size)
    e = tiny.encode_image(x)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    xg = x.clone().requires_grad_(True)
    raw = tiny.embed_pixels(xg)
    raw.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # at the model's own size both paths are the same computation; embed_pixels is not normalised
    assert torch.allclose(torch.nn.functional.normalize(raw.detach(), dim=-1), e, atol=1e-5)
    assert not torch.allclose(raw.detach().norm(dim=-1), torch.ones(3), atol=1e-3)


def test_embedder_refuses_bad_inputs(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        OpenClipEmbedder(tiny.name, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="does not know"):
        OpenClipEmbedder("No-Such-Arch", tiny.weights_path)
    with pytest.raises(ValueError, match="Hugging Face"):
        OpenClipEmbedder("xlm-roberta-base-ViT-B-32", tiny.weights_path)


def test_pickled_weights_load_weights_only(tmp_path, tiny):
    """.pt state dicts load (weights_only); a pickle carrying code is refused rather than executed."""
    pt = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), pt)
    again = OpenClipEmbedder(tiny.name, str(pt))
    assert torch.allclose(again.encode_text(["x"]), tiny.encode_text(["x"]), atol=1e-6)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Counting(None)}, evil)
    with pytest.raises(Exception):
        OpenClipEmbedder(tiny.name, str(evil))


# -- search -----------------------------------------------------------------------------------------------------
def test_image_query_returns_itself_first(built, tiny):
    db = load_db(built)
    assert db.count == N_IMAGES
    for row in range(db.count):
        q = tiny.encode_image(load_pixels(db.image_path(row)))[0].numpy()
        res = db.search(q, k=3)
        assert res.indices[0, 0] == row
        assert res.scores[0, 0] == pytest.approx(1.0, abs=2e-3)


def test_text_query_matches_reference_cosine_ranking(built, tiny):
    db = load_db(built)
    q = tiny.encode_text(["a stormy sea at night"])[0].numpy()
    n = db.neighbors(q)  # k defaults to 19; the DB has fewer
    ref = np.asarray(db.embeddings, dtype=np.float64) @ q.astype(np.float64)
    ref_order = sorted(range(db.count), key=lambda i: (-ref[i], i))
    assert n.extra["rows"] == ref_order
    assert n.scores == pytest.approx(ref[ref_order].tolist(), abs=1e-4)
    assert "only 14" in n.reason
    assert torch.allclose(n.embeddings.norm(dim=-1), torch.ones(len(n)), atol=1e-5)
    assert set(n.metadata[0]) == {"artist", "style", "genre", "title", "year", "path"}
    assert os.path.isfile(n.metadata[0]["path"])
    assert (n.embedder_name, n.embedder_hash) == (tiny.name, tiny.weights_hash)
    # raw embeddings restore the image tower's own output (needed by the unCLIP noise augmentor)
    raw = tiny.encode_image_raw(load_pixels(n.metadata[0]["path"]))[0]
    assert torch.allclose(n.raw_embeddings()[0], raw, rtol=2e-3, atol=2e-3)


def test_mixed_text_image_query_interpolates(built, tiny):
    db = load_db(built)
    t = tiny.encode_text(["an ukiyo-e print"])[0]
    i = tiny.encode_image(load_pixels(db.image_path(3)))[0]
    q = torch.nn.functional.normalize(0.2 * t + 0.8 * i, dim=0).numpy()
    assert db.search(q, 1).indices[0, 0] == 3


def test_filters(built):
    db = load_db(built)
    q = np.ones(db.dim, np.float32) / np.sqrt(db.dim)
    res = db.search(q, 19, Filters(style="cubism"))
    styles = {db.metadata[i]["style"] for i in res.indices[0]}
    expected = sum(m["style"] == "Cubism" for m in db.metadata)
    assert styles == {"Cubism"} and res.indices.shape[1] == expected
    res = db.search(q, 19, Filters(artist="CLAUDE MONET"))
    assert {db.metadata[i]["artist"] for i in res.indices[0]} == {"Claude Monet"}
    res = db.search(q, 19, Filters(genre="portrait", year_min=1870, year_max=1920))
    rows = [db.metadata[i] for i in res.indices[0]]
    assert rows and all(r["genre"] == "portrait" and 1870 <= int(r["year"]) <= 1920 for r in rows)
    assert len(rows) == sum(m["genre"] == "portrait" and 1870 <= int(m["year"]) <= 1920 for m in db.metadata)
    res = db.search(q, 19, Filters(style="surrealism"))
    assert res.indices.shape == (1, 0) and "matches the filters" in res.reason
    with pytest.raises(StyleDBError, match="dim"):
        db.search(np.ones(db.dim + 1, np.float32), 3)


def test_torch_search_matches_numpy(built):
    db = load_db(built)
    rng = np.random.default_rng(5)
    q = rng.normal(size=(3, db.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ref = db.search(q, 5, Filters(style="impressionism"))
    got = db.search(q, 5, Filters(style="impressionism"), device="cpu")
    assert got.info["method"] == "exact-torch-cpu"
    assert np.array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)


def test_topk_against_full_sort():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 500)).astype(np.float32)
    idx, sc = topk(s, 19)
    for r in range(4):
        assert idx[r].tolist() == np.argsort(-s[r], kind="stable")[:19].tolist()
        assert np.array_equal(sc[r], s[r, idx[r]])


# -- storage ----------------------------------------------------------------------------------------------------
def test_save_load_round_trip(built, tmp_path):
    db = load_db(built)
    assert np.asarray(db.embeddings).dtype == np.float16 and isinstance(db.embeddings, np.memmap)
    write_db(tmp_path / "copy", np.asarray(db.embeddings), db.norms, db.metadata,
             {"name": db.embedder_name, "weights_hash": db.embedder_hash, "dim": db.dim},
             source_root=db.source_root(), skipped=db.manifest["skipped"])
    same_db(built, tmp_path / "copy")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_unknown_format_version_refused(built, tmp_path):
    shutil.copytree(built, tmp_path / "db")
    m = json.loads((tmp_path / "db" / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StyleDBError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        load_db(tmp_path / "db")
    with pytest.raises(StyleDBError, match="no manifest.json"):
        load_db(tmp_path)


def test_other_embedder_refused(built, tmp_path):
    name, path = make_tiny_open_clip(tmp_path / "other.safetensors", seed=1)
    other = OpenClipEmbedder(name, str(path))
    with pytest.raises(StyleDBError, match="built with open_clip"):
        load_db(built).check_embedder(other)


# -- building ---------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """What a host's interrupt raises (ComfyUI's InterruptProcessingException, KeyboardInterrupt...)."""


class StopAfter(Progress):
    """A Progress whose check_interrupt raises on its n-th call; records the updates it got."""

    def __init__(self, n):
        self.n, self.checks, self.updates = n, 0, []

    def update(self, done, total, preview=None):
        self.updates.append((done, total))

    def check_interrupt(self):
        self.checks += 1
        if self.checks == self.n:
            raise Interrupted("killed")


def test_interrupted_build_resumes_to_the_same_database(tiny, folder, built, tmp_path):
    out = tmp_path / "db"
    stop = StopAfter(2)
    with pytest.raises(Interrupted):
        B.build_db(folder, out, tiny, metadata_file=folder / "metadata.csv", batch_size=4, chunk_size=4,
                   progress=stop, log=lambda m: None)
    assert not out.exists() and (tmp_path / "db.partial").is_dir()
    assert stop.updates == [(4, N_IMAGES)]  # the first batch reported, the second interrupted before it
    counting = Counting(tiny)
    logs = []
    track = StopAfter(0)
    s = B.build_db(folder, out, counting, metadata_file=folder / "metadata.csv", batch_size=4, chunk_size=4,
                   progress=track, log=logs.append)
    assert s["resumed_chunks"] == 1 and counting.count == N_IMAGES - 4
    assert track.updates == [(8, N_IMAGES), (12, N_IMAGES), (N_IMAGES, N_IMAGES)]  # counted over the whole build
    assert logs == ["resumed: 1 of 4 chunk(s) were already embedded"]
    assert not (tmp_path / "db.partial").exists()
    same_db(built, out)


def test_add_embeds_only_new_images(tiny, folder, built, tmp_path):
    part = tmp_path / "part"
    files, _ = B.scan_folder(folder)
    for rel in files[:6]:
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / rel, part / rel)
    shutil.copy(folder / "metadata.csv", part / "metadata.csv")
    B.build_db(part, tmp_path / "db", tiny, metadata_file=part / "metadata.csv", batch_size=4, log=lambda m: None)
    for rel in files[6:]:
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / rel, part / rel)
    counting = Counting(tiny)
    s = B.add_to_db(tmp_path / "db", part, counting, metadata_file=part / "metadata.csv", batch_size=4,
                    log=lambda m: None)
    assert counting.count == len(files) - 6 and s["unchanged"] == 6
    got, ref = load_db(tmp_path / "db"), load_db(built)
    assert got.metadata == ref.metadata
    np.testing.assert_allclose(np.asarray(got.embeddings, np.float32), np.asarray(ref.embeddings, np.float32),
                               atol=2e-3)
    # a changed file is re-embedded and replaces its row; a deleted one goes with --prune
    Image.new("RGB", (40, 40), (255, 0, 0)).save(part / files[0])
    os.remove(part / files[1])
    counting.count = 0
    B.add_to_db(tmp_path / "db", part, counting, metadata_file=part / "metadata.csv", prune=True, log=lambda m: None)
    after = load_db(tmp_path / "db")
    assert counting.count == 1 and after.count == len(files) - 1
    assert files[1] not in {m["path"] for m in after.metadata}
    red = tiny.encode_image(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(1, 3, 40, 40))[0].numpy()
    assert after.metadata[after.search(red, 1).indices[0, 0]]["path"] == files[0]


def test_corrupt_and_non_image_files(tiny, tmp_path):
    make_wikiart_folder(tmp_path / "imgs", n=5, with_csv=False)
    (tmp_path / "imgs" / "Cubism" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = tmp_path / "imgs" / "Cubism" / "juan-gris_cut-1900.png"
    Image.new("RGB", (40, 40), (0, 0, 255)).save(good)
    good.write_bytes(good.read_bytes()[:60])  # truncated
    (tmp_path / "imgs" / "notes.txt").write_text("hello")
    s = B.build_db(tmp_path / "imgs", tmp_path / "db", tiny, log=lambda m: None)
    assert s["count"] == 5
    assert [x["path"] for x in s["skipped"]] == ["Cubism/broken.jpg", "Cubism/juan-gris_cut-1900.png"]
    assert "not a readable image" in s["skipped"][0]["reason"]
    assert s["ignored"] == ["notes.txt"]
    assert load_db(tmp_path / "db").manifest["skipped"] == s["skipped"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(StyleDBError, match="no image files"):
        B.build_db(tmp_path / "empty", tmp_path / "db2", tiny, log=lambda m: None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nope")
    with pytest.raises(StyleDBError, match="none of the 1 image"):
        B.build_db(tmp_path / "bad", tmp_path / "db3", tiny, log=lambda m: None)


def test_duplicate_content_kept_once(tiny, tmp_path):
    make_wikiart_folder(tmp_path / "imgs", n=4, with_csv=False)
    files, _ = B.scan_folder(tmp_path / "imgs")
    shutil.copy(tmp_path / "imgs" / files[0], tmp_path / "imgs" / "zz_copy.png")
    s = B.build_db(tmp_path / "imgs", tmp_path / "db", tiny, log=lambda m: None)
    assert s["count"] == 4 and s["duplicates"] == [{"path": "zz_copy.png", "same_as": files[0]}]


def test_shards_merge_to_the_single_build(tiny, folder, built, tmp_path):
    parts = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        B.build_db(folder, out, tiny, metadata_file=folder / "metadata.csv", batch_size=4, chunk_size=4,
                   shard=f"{i}/3", log=lambda m: None)
        parts.append(out)
    assert sum(load_db(p).count for p in parts) == N_IMAGES
    B.merge_dbs(tmp_path / "merged", parts)
    same_db(built, tmp_path / "merged")
    with pytest.raises(StyleDBError, match="0 <= i < n"):
        B.parse_shard("3/3")


def test_cli_build_info_search(tiny, folder, tmp_path, capsys):
    from atelier.retrieval.cli import main

    cfg = os.path.join(os.path.dirname(tiny.weights_path), "open_clip_configs", f"{tiny.name}.json")
    common = ["--arch", tiny.name, "--weights", tiny.weights_path, "--model-config", cfg, "--device", "cpu"]
    assert main(["build", str(folder), str(tmp_path / "db"), "--metadata", str(folder / "metadata.csv"),
                 "--batch-size", "4", *common]) == 0
    assert main(["info", str(tmp_path / "db")]) == 0
    assert f"{N_IMAGES} images" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "db"), "--text", "waves", "-k", "2", "--style", "ukiyo", *common]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(("1 ", "2 "))]
    assert len(lines) == 2 and all("Ukiyo E" in ln for ln in lines)
    assert main(["info", str(tmp_path)]) == 2
