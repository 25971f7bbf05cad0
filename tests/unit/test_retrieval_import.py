"""Importing precomputed embeddings (no images): CompVis retrieval-database parts through the streaming engine."""
import json

import numpy as np
import pytest

from atelier.common.progress import Progress
from atelier.retrieval.db import StyleDBError, load_db
from atelier.retrieval.importers.formats import import_source
from atelier.retrieval.present import preview_batch
from atelier.tests.fixtures.tiny_rdm import make_compvis_npz


def compvis_folder(root, parts=(30, 25), dim=768):
    folder = root / "artbench-surrealism"
    embs = [make_compvis_npz(folder / f"{dim}-part_{i + 1}.npz", n=n, dim=dim, seed=i) for i, n in enumerate(parts)]
    return folder, np.concatenate(embs)


def test_compvis_round_trip_keeps_order_metadata_and_lengths(tmp_path):
    folder, raw = compvis_folder(tmp_path)
    res = import_source(folder, tmp_path / "db", log=lambda m: None)
    assert res["count"] == 55 and res["parts"] == 2 and res["format"] == "compvis-npz"
    db = load_db(tmp_path / "db")
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.allclose(np.asarray(db.embeddings, np.float32), unit, atol=2e-3)
    assert np.allclose(db.norms, np.linalg.norm(raw, axis=1), rtol=1e-5)
    first, last = db.metadata[0], db.metadata[54]
    assert first["img_id"] == "img_00_00000" and first["patch_coords"] == [0, 0, 256, 256]
    assert last["img_id"] == "img_01_00024" and last["part"] == "768-part_2.npz"
    assert first["style"] == "Surrealism" and first["path"] == ""
    assert db.manifest["embedder"] == {"name": "ViT-L-14", "weights_hash": "", "dim": 768}
    assert "without images" in db.info_text()
    # knn2img's search: the nearest rows by cosine, best first, each row's own embedding comes back normalised
    n = db.neighbors(unit[7], k=5)
    assert n.extra["rows"][0] == 7 and np.allclose(n.embeddings[0].numpy(), unit[7], atol=2e-3)
    images, missing = preview_batch([m["path"] for m in n.metadata], 64)
    assert images.shape == (5, 64, 64, 3) and missing == []
    assert float(images[0].std()) > 0.01  # the "no image" text is drawn on the grey tile


class StopAfter(Progress):
    def __init__(self, rows):
        self.rows, self.seen = rows, 0

    def update(self, done, total, preview=None):
        self.seen = done

    def check_interrupt(self):
        if self.seen >= self.rows:
            raise KeyboardInterrupt


def test_interrupted_import_resumes_at_the_next_part(tmp_path):
    folder, raw = compvis_folder(tmp_path, parts=(10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10))  # part_10 after part_9
    with pytest.raises(KeyboardInterrupt):
        import_source(folder, tmp_path / "db", progress=StopAfter(20), log=lambda m: None)
    assert not (tmp_path / "db").exists() and (tmp_path / "db.partial" / "done.json").is_file()
    assert json.loads((tmp_path / "db.partial" / "done.json").read_text()) == ["768-part_1.npz", "768-part_2.npz"]
    logs = []
    res = import_source(folder, tmp_path / "db", log=logs.append)
    assert res["resumed_parts"] == 2 and any("resumed: 2 of 11" in m for m in logs)
    db = load_db(tmp_path / "db")
    assert np.allclose(np.asarray(db.embeddings, np.float32),
                       raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=2e-3)
    assert not (tmp_path / "db.partial").exists()


def test_bad_parts_are_refused_and_the_previous_database_is_untouched(tmp_path):
    folder, _ = compvis_folder(tmp_path)
    import_source(folder, tmp_path / "db", log=lambda m: None)
    before = (tmp_path / "db" / "manifest.json").read_text()
    make_compvis_npz(folder / "zz-part_3.npz", n=5, dim=512)
    with pytest.raises(StyleDBError, match="zz-part_3.npz holds 512-d embeddings but the import is for 768-d"):
        import_source(folder, tmp_path / "db", log=lambda m: None)
    assert (tmp_path / "db" / "manifest.json").read_text() == before
    with pytest.raises(StyleDBError, match="only plain arrays are read"):
        other = tmp_path / "obj"
        make_compvis_npz(other / "p.npz", n=3, object_ids=True)
        import_source(other, tmp_path / "db2", log=lambda m: None)
    empty = tmp_path / "empty"
    make_compvis_npz(empty / "p.npz", n=0)
    with pytest.raises(StyleDBError, match="hold no rows"):
        import_source(empty, tmp_path / "db3", log=lambda m: None)
    with pytest.raises(StyleDBError, match="no .npz parts"):
        (tmp_path / "none").mkdir()
        import_source(tmp_path / "none", tmp_path / "db4", fmt="compvis-npz", log=lambda m: None)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(StyleDBError, match="not a readable .npz"):
        import_source(tmp_path / "bad.npz", tmp_path / "db5", log=lambda m: None)


def test_cli_import(tmp_path, capsys):
    from atelier.retrieval.cli import main

    folder, _ = compvis_folder(tmp_path, parts=(12,))
    assert main(["import", str(folder), str(tmp_path / "db"), "--style", "Dada"]) == 0
    assert "imported 12 rows from 1 compvis-npz part(s)" in capsys.readouterr().out
    assert load_db(tmp_path / "db").metadata[3]["style"] == "Dada"


def clip_retrieval_folder(root, parts=(20, 15), dim=768, meta_rows=None):
    """clip-retrieval's output layout, written with numpy and pyarrow as clip-retrieval writes it."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    embs = []
    for i, n in enumerate(parts):
        e = rng.normal(size=(n, dim)).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", e)
        rows = n if meta_rows is None else meta_rows[i]
        table = pa.table({"url": [f"https://example.org/{i}/{j}.jpg" for j in range(rows)],
                          "caption": [f"caption {i} {j}" for j in range(rows)],
                          "similarity": [0.3] * rows, "width": list(range(rows))})
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")
        embs.append(e.astype(np.float32))
    return np.concatenate(embs)


def test_clip_retrieval_round_trip_keeps_every_column(tmp_path):
    raw = clip_retrieval_folder(tmp_path / "laion")
    res = import_source(tmp_path / "laion", tmp_path / "db", arch="ViT-L-14", log=lambda m: None)
    assert res["format"] == "clip-retrieval" and res["count"] == 35
    db = load_db(tmp_path / "db")
    assert np.allclose(np.asarray(db.embeddings, np.float32), raw / np.linalg.norm(raw, axis=1, keepdims=True),
                       atol=2e-3)
    row = db.metadata[21]
    assert row["url"] == "https://example.org/1/1.jpg" and row["caption"] == "caption 1 1"
    assert row["title"] == "caption 1 1" and row["width"] == 1 and row["path"] == ""


def test_clip_retrieval_rows_must_match_embeddings(tmp_path):
    clip_retrieval_folder(tmp_path / "bad", meta_rows=(20, 14))
    with pytest.raises(StyleDBError, match="metadata_1.parquet has 14 rows but img_emb_1.npy has 15 embeddings"):
        import_source(tmp_path / "bad", tmp_path / "db", log=lambda m: None)
    assert not (tmp_path / "db").exists() and not (tmp_path / "db.partial").exists()
