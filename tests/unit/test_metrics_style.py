"""CLIP score against a direct cosine, the style classifier (training, file round trip, embedder checks,
the paper's relative accuracy) and the metric nodes that need no ComfyUI."""
import json

import numpy as np
import pytest
import torch

from atelier.metrics import clip_score, reports, style
from atelier.metrics.frechet import MetricsError
from atelier.retrieval.build import build_db
from atelier.retrieval.db import load_db
from atelier.retrieval.embedder import OpenClipEmbedder
from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    name, path = make_tiny_open_clip(d / "Atelier-Tiny-ViT.safetensors", config_dir=d)
    return OpenClipEmbedder(name, str(path), device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))


def test_clip_score_equals_a_direct_cosine(clip):
    x = torch.rand(3, 3, 40, 40)
    u8 = (x * 255).to(torch.uint8)
    prompts = ["a red square", "a blue circle", "a green line"]
    got = clip_score.clip_scores(clip, u8, prompts, batch_size=2)
    img = clip.model.encode_image(clip.preprocess(u8.float() / 255))
    txt = clip.model.encode_text(clip.tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt).detach().numpy()
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-4)


def test_clip_score_clips_negative_cosines_at_zero():
    assert clip_score.scores_from_embeddings([[1.0, 0.0], [1.0, 0.0]], [[-1.0, 0.0], [3.0, 4.0]]).tolist() == \
        pytest.approx([0.0, 60.0])


def test_prompt_counts_must_match(clip):
    with pytest.raises(MetricsError, match="2 prompts for 3 images"):
        clip_score.clip_scores(clip, torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ["a", "b"])
    assert clip_score.pair_prompts("one", 3) == ["one"] * 3


def test_mlp_learns_a_separable_toy_set_to_100_percent():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 3
    labels = [f"style {i % 4}" for i in range(120)]
    feats = centres[[i % 4 for i in range(120)]] + rng.normal(size=(120, 32)) * 0.3
    clf, report = style.train_classifier(feats, labels, {"name": "toy", "weights_hash": "0", "dim": 32},
                                         hidden=32, epochs=15, batch_size=32, val_fraction=0.2)
    assert report["train_accuracy"] == 1.0 and report["val_accuracy"] == 1.0 and report["val_images"] == 24
    probs = clf.probabilities(feats[:4])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert [t[0][0] for t in clf.top(probs, 2)] == labels[:4]


def test_classifier_round_trip_keeps_labels_embedder_and_outputs(tmp_path):
    feats = np.random.default_rng(1).normal(size=(20, 8))
    clf, _ = style.train_classifier(feats, ["a", "b"] * 10, {"name": "n", "weights_hash": "h", "dim": 8},
                                    hidden=16, epochs=3)
    path = clf.save(tmp_path / "clf.safetensors")
    back = style.load_classifier(path)
    assert back.labels == ["a", "b"] and back.embedder == {"name": "n", "weights_hash": "h", "dim": 8}
    np.testing.assert_allclose(back.probabilities(feats), clf.probabilities(feats), rtol=1e-6)
    assert "2 labels" in back.describe()


def test_classifier_refuses_another_embedder(tmp_path, clip):
    clf, _ = style.train_classifier(np.eye(4), ["a", "b", "a", "b"], {"name": clip.name, "weights_hash": "other",
                                                                       "dim": 4}, hidden=4, epochs=1)
    with pytest.raises(MetricsError, match="trained on open_clip Atelier-Tiny-ViT features \\(weights other, dim 4\\)"):
        clf.check_embedder(clip)


def test_a_file_that_is_not_a_classifier_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(MetricsError, match="not an Atelier style classifier"):
        style.load_classifier(tmp_path / "lora.safetensors")


def test_one_label_is_not_enough():
    with pytest.raises(MetricsError, match="at least 2 labels"):
        style.train_classifier(np.zeros((3, 2)), ["x"] * 3, {"name": "n", "weights_hash": "h", "dim": 2})


def test_features_come_from_the_style_database_when_given(tmp_path, clip, cache):
    make_wikiart_folder(tmp_path / "art", n=9)
    build_db(tmp_path / "art", tmp_path / "db", clip, log=lambda m: None)
    db = load_db(tmp_path / "db")
    feats, labels, info, skipped = style.labelled_features(None, clip, "style", db=db)
    assert len(feats) == 9 and sorted(set(labels)) == ["Cubism", "Impressionism", "Ukiyo E"] and skipped == []
    np.testing.assert_allclose(feats, np.asarray(db.embeddings, np.float32))
    assert info == {"name": clip.name, "weights_hash": clip.weights_hash, "dim": clip.dim}
    from_folder, labels2, _, _ = style.labelled_features(tmp_path / "art", clip, "style")
    assert labels2 == labels and from_folder.shape == feats.shape


def test_relative_accuracy_follows_the_definition():
    clf = style.StyleClassifier(torch.nn.Identity(), ["A", "B"], {"name": "n", "weights_hash": "h", "dim": 2}, 2)
    method = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.7, 0.3]])  # 3 of 4 top-1 "A"
    base = np.array([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])  # 1 of 4
    res = style.relative_accuracy(clf, method, "A", base, "A")
    row = res["styles"]["A"]
    assert (row["accuracy"], row["baseline_accuracy"]) == (0.75, 0.25)
    assert row["relative_improvement"] == pytest.approx((0.75 - 0.25) / 0.25)
    assert row["target_probability"] == pytest.approx(0.7) and row["vote"] == "method"
    assert "+200.0%" in style.relative_table(res)
    never = style.relative_accuracy(clf, method, "A", base[[1, 2]], "A")
    assert never["styles"]["A"]["relative_improvement"] is None


def test_unknown_target_style_lists_the_labels():
    clf = style.StyleClassifier(torch.nn.Identity(), ["Cubism", "Ukiyo E"], {"name": "n", "weights_hash": "h",
                                                                            "dim": 2}, 2)
    assert clf.label_index("ukiyo_e") == 1
    with pytest.raises(MetricsError, match="'Baroque' is not one of the classifier's 2 labels: Cubism, Ukiyo E"):
        clf.label_index("Baroque")


def test_clip_score_node_scores_both_arms_without_comfyui(clip):
    from atelier.nodes.metrics import AtelierCLIPScore

    images, baseline = torch.rand(2, 24, 24, 3), torch.rand(3, 24, 24, 3)
    before = images.clone()
    out = AtelierCLIPScore().score(clip, images, "a painting\n", baseline)
    score, base, text = out["result"]
    assert torch.equal(images, before) and out["ui"]["text"] == [text]
    direct = clip_score.clip_scores(clip, reports.comfy_to_uint8(images), ["a painting"])
    assert score == pytest.approx(float(direct.mean())) and 0 <= base <= 100
    assert "difference (images − baseline)" in text and [ln.split()[0] for ln in text.splitlines() if ln.startswith("#")] == ["#1", "#2"]


def test_style_score_node_reports_relative_accuracy(clip, tmp_path):
    from atelier.nodes.metrics import AtelierStyleScore

    info = {"name": clip.name, "weights_hash": clip.weights_hash, "dim": clip.dim}
    feats = np.random.default_rng(2).normal(size=(12, clip.dim))
    clf, _ = style.train_classifier(feats, ["Cubism", "Impressionism"] * 6, info, hidden=8, epochs=2)
    out = AtelierStyleScore().score(clf, clip, torch.rand(2, 32, 32, 3), 2, "cubism", torch.rand(2, 32, 32, 3))
    top, acc, base_acc, text = out["result"]
    assert len(top.splitlines()) == 2 and 0 <= acc <= 1 and 0 <= base_acc <= 1
    assert "relative" in text and "overall: top-1" in text
    with pytest.raises(MetricsError, match="give target_style"):
        AtelierStyleScore().score(clf, clip, torch.rand(2, 32, 32, 3), 2, "", torch.rand(2, 32, 32, 3))
    json.dumps(out["result"][:3])  # plain values only
