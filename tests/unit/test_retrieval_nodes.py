"""Retrieval nodes and the helpers behind them: previews, reports, style prompts, unCLIP embeddings."""
import ast
import pathlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.retrieval.embedder import guess_architecture
from atelier.retrieval.neighbors import Neighbors
from atelier.retrieval.present import letterbox, preview_batch, style_prompt, unclip_embeddings


def neighbours(dim=8, k=3, name="Atelier-Tiny-ViT"):
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1)
    meta = [{"artist": a, "style": s, "genre": "", "title": f"t{i}", "year": "1900", "path": f"/nope/{i}.png"}
            for i, (a, s) in enumerate([("Claude Monet", "Impressionism"), ("Hokusai", "Ukiyo E"),
                                        ("Claude Monet", "Impressionism")][:k])]
    return Neighbors(emb, [0.9, 0.5, 0.1][:k], meta, name, "abc", norms=[2.0, 3.0, 4.0][:k])


def test_neighbors_validates_shapes():
    n = neighbours()
    with pytest.raises(ValueError, match="3 embeddings but 2 scores"):
        Neighbors(n.embeddings, [1.0, 2.0], n.metadata, "x", "y")
    assert torch.allclose(n.raw_embeddings(), n.embeddings * torch.tensor([[2.0], [3.0], [4.0]]))


def test_unclip_embeddings_combinations():
    n = neighbours()
    raw = n.raw_embeddings()
    assert torch.allclose(unclip_embeddings(n, "average"), raw.mean(0, keepdim=True))
    w = torch.tensor([0.9, 0.5, 0.1]) / 1.5
    assert torch.allclose(unclip_embeddings(n, "score-weighted average"), (raw * w[:, None]).sum(0, keepdim=True))
    assert torch.allclose(unclip_embeddings(n, "each", top_n=2), raw[:2])
    assert unclip_embeddings(n, "average", expected_dim=8).shape == (1, 8)


def test_unclip_dimension_and_embedder_mismatch_errors():
    with pytest.raises(ValueError, match="expects 1024-d.*8-d.*ViT-H-14"):
        unclip_embeddings(neighbours(), expected_dim=1024)
    with pytest.raises(ValueError, match="trained with open_clip ViT-H-14.*ViT-g-14"):
        unclip_embeddings(neighbours(dim=1024, name="ViT-g-14"), expected_dim=1024)
    empty = Neighbors(torch.zeros(0, 8), [], [], "x", "y", reason="no image matches the filters")
    with pytest.raises(ValueError, match="no image matches the filters"):
        unclip_embeddings(empty)


def test_preview_letterbox_and_missing(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "wide.png")
    tile = letterbox(Image.open(tmp_path / "wide.png"), 64)
    assert tile.shape == (64, 64, 3)
    assert torch.allclose(tile[32, 32], torch.tensor([1.0, 0, 0]))  # image in the middle
    assert torch.allclose(tile[2, 32], torch.full((3,), 0.5), atol=0.01)  # grey padding above
    imgs, missing = preview_batch([str(tmp_path / "wide.png"), str(tmp_path / "gone.png")], 32)
    assert imgs.shape == (2, 32, 32, 3) and missing == [str(tmp_path / "gone.png")]
    assert preview_batch([], 16)[0].shape == (1, 16, 16, 3)


def test_style_prompt_uses_most_frequent_artists():
    assert style_prompt("a harbour at dawn", neighbours()) == \
        "a harbour at dawn, painting by Claude Monet, Hokusai, Impressionism, Ukiyo E"


# -- nodes, with stand-ins for the two ComfyUI modules the unCLIP node touches ---------------------------------------
@pytest.fixture
def fake_comfy(monkeypatch):
    class Output:
        def __getitem__(self, key):
            return getattr(self, key)

        def __setitem__(self, key, value):
            setattr(self, key, value)

    def set_values(conditioning, values, append=False):
        out = []
        for t, d in conditioning:
            d = dict(d)
            for k, v in values.items():
                d[k] = d.get(k, []) + v if append else v
            out.append([t, d])
        return out

    comfy = types.ModuleType("comfy")
    cv = types.ModuleType("comfy.clip_vision")
    cv.Output = Output
    comfy.clip_vision = cv
    nh = types.ModuleType("node_helpers")
    nh.conditioning_set_values = set_values
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.clip_vision", cv)
    monkeypatch.setitem(sys.modules, "node_helpers", nh)


def test_unclip_node_appends_entries(pack, fake_comfy):
    node = pack.retrieval.AtelierNeighborsToUnCLIP()
    cond = [[torch.zeros(1, 77, 8), {"pooled_output": None}]]
    n = neighbours()
    (out,) = node.apply(cond, n, 0.6, 0.2, "each", 0)
    entries = out[0][1]["unclip_conditioning"]
    assert len(entries) == 1 and entries[0]["noise_augmentation"] == 0.2
    assert entries[0]["strength"] == pytest.approx(0.2)  # 0.6 split over 3 neighbours
    assert torch.allclose(entries[0]["clip_vision_output"].image_embeds, n.raw_embeddings())
    assert "unclip_conditioning" not in cond[0][1]  # input untouched
    (twice,) = node.apply(out, n, 1.0, 0.0, "average", 0)
    assert len(twice[0][1]["unclip_conditioning"]) == 2

    unclip_model = types.SimpleNamespace(model=types.SimpleNamespace(
        noise_augmentor=types.SimpleNamespace(data_mean=torch.zeros(1, 1024))))
    with pytest.raises(ValueError, match="expects 1024-d"):
        node.apply(cond, n, 1.0, 0.0, "average", 0, model=unclip_model)
    sd15 = types.SimpleNamespace(model=types.SimpleNamespace())
    with pytest.raises(ValueError, match="not an unCLIP model"):
        node.apply(cond, n, 1.0, 0.0, "average", 0, model=sd15)


def test_retriever_node(pack, tmp_path):
    from atelier.retrieval import build as B
    from atelier.retrieval.db import load_db
    from atelier.retrieval.embedder import OpenClipEmbedder
    from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder

    make_wikiart_folder(tmp_path / "imgs", n=6)
    name, path = make_tiny_open_clip(tmp_path / "tiny.safetensors")
    clip = OpenClipEmbedder(name, str(path))
    B.build_db(tmp_path / "imgs", tmp_path / "db", clip, metadata_file=tmp_path / "imgs" / "metadata.csv",
               log=lambda m: None)
    db = load_db(tmp_path / "db")
    node = pack.retrieval.AtelierStyleRetriever()
    imgs, nb, rep, prompt = node.retrieve(db, clip, "a quiet pond", 19, 0.5, "", "", "", 0, 0, 64)
    assert imgs.shape == (6, 64, 64, 3) and len(nb) == 6 and "only 6" in rep
    assert prompt.startswith("a quiet pond, painting by ")
    image = torch.from_numpy(np.asarray(Image.open(db.image_path(2)), np.float32) / 255)[None]
    _, nb, _, _ = node.retrieve(db, clip, "", 3, 0.5, "", "", "", 0, 0, 32, image=image)
    assert nb.extra["rows"][0] == 2
    _, nb, rep, _ = node.retrieve(db, clip, "x", 5, 0.0, "", "surrealism", "", 0, 0, 32)
    assert len(nb) == 0 and "matches the filters" in rep
    with pytest.raises(ValueError, match="give a text query"):
        node.retrieve(db, clip, "  ", 5, 0.0, "", "", "", 0, 0, 32)


def test_node_schemas_have_tooltips(pack):
    mod = pack.retrieval
    for node_id, cls in mod.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Atelier") and cls.CATEGORY.startswith("atelier/")
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, (typ, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)


def test_architecture_guess_from_file_name():
    guess = guess_architecture
    names = ["ViT-L-14", "ViT-L-14-336", "ViT-B-32", "ViT-H-14"]
    assert guess("ViT-L-14-336-openai.safetensors", names) == "ViT-L-14-336"
    assert guess("sub/ViT-H-14-laion2b_s32b_b79k.safetensors", names) == "ViT-H-14"
    assert guess("model.safetensors", names) is None


def test_node_methods_are_thin():
    """Every node method but the schema (INPUT_TYPES) is at most 15 lines: one core call and the wrapping."""
    path = pathlib.Path(__file__).resolve().parents[2] / "nodes" / "retrieval.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    sizes = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name != "INPUT_TYPES"):
            body = fn.body[1:] if ast.get_docstring(fn) else fn.body
            sizes[f"{cls.name}.{fn.name}"] = body[-1].end_lineno - body[0].lineno + 1
    assert len(sizes) == 8 and max(sizes.values()) <= 15, sizes
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))], "loops belong in the core"
