"""python -m training caption (tiny random BLIP and GIT folders built here) and python -m training wikiart-csv."""
import json
import os

import pytest
import torch
from PIL import Image

from atelier.training import caption as C
from atelier.training import data as D
from atelier.training import wikiart
from atelier.tests.fixtures.tiny_captioner import make_not_a_captioner, make_tiny_blip, make_tiny_git
from atelier.tests.fixtures.training_toys import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": make_tiny_blip(root / "blip"), "git": make_tiny_git(root / "git"),
            "bert": make_not_a_captioner(root / "bert")}


def _folder(root, n=3):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        p = root / "Impressionism" / f"claude-monet_work-{i}-190{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(p)
    return root


@pytest.mark.parametrize("family", ["blip", "git"])
def test_captions_are_written_merged_with_the_template_and_read_by_the_trainer(tmp_path, models, family):
    root = _folder(tmp_path / "d")
    cap = C.Captioner(models[family], "cpu", max_new_tokens=6, num_beams=1)
    assert cap.family == family
    raw = cap.caption([Image.open(next((root / "Impressionism").iterdir()))])
    assert raw and raw[0]  # real generation through transformers
    stats = C.caption_folder(str(root), cap, batch_size=2, say=lambda *a: None)
    assert stats["captioned"] == 3 and stats["kept_own"] == 0
    side = (root / "Impressionism" / "claude-monet_work-1-1901.txt").read_text()
    machine = json.loads((root / D.MANIFEST).read_text())["entries"]["Impressionism/claude-monet_work-1-1901.png"]
    assert side == f"a painting by Claude Monet, Impressionism, 1901, {machine['caption']}"
    # the trainer ("both" mode) uses the merged sidecar as it is, not template + sidecar
    scan = D.scan_folder(str(root), 32)
    assert sorted(s.caption for s in scan.samples) == sorted(
        (root / "Impressionism" / f"claude-monet_work-{i}-190{i}.txt").read_text() for i in range(3))


def test_own_captions_are_kept_unless_overwrite_and_runs_resume(tmp_path, models):
    root = _folder(tmp_path / "d")
    own = root / "Impressionism" / "claude-monet_work-0-1900.txt"
    own.write_text("my own words")
    cap = C.Captioner(models["blip"], "cpu", max_new_tokens=4, num_beams=1)
    calls = []
    real = cap.caption
    cap.caption = lambda imgs: calls.append(len(imgs)) or real(imgs)
    stats = C.caption_folder(str(root), cap, batch_size=8)
    assert (stats["captioned"], stats["kept_own"], own.read_text()) == (2, 1, "my own words")
    again = C.caption_folder(str(root), cap, batch_size=8)  # resumed / re-run: nothing left to do
    assert (again["captioned"], again["already_done"], calls) == (0, 2, [2])
    edited = root / "Impressionism" / "claude-monet_work-1-1901.txt"
    edited.write_text("edited by hand")  # an edited machine caption becomes the user's
    assert C.caption_folder(str(root), cap)["kept_own"] == 2 and edited.read_text() == "edited by hand"
    stats = C.caption_folder(str(root), cap, overwrite=True)  # replaces the two user captions, keeps the done one
    assert (stats["captioned"], stats["already_done"]) == (2, 1)
    assert own.read_text() != "my own words" and edited.read_text() != "edited by hand"
    # in "both" mode a user's own sidecar still follows the template
    assert D.build_caption({"artist": "A"}, "x", "both", "{artist}") == "A, x"


def test_interrupted_captioning_keeps_whole_batches_and_continues(tmp_path, models):
    from atelier.tests.fixtures.progress import RecordingProgress

    root = _folder(tmp_path / "d", n=4)
    cap = C.Captioner(models["git"], "cpu", max_new_tokens=4, num_beams=1)
    with pytest.raises(KeyboardInterrupt):
        C.caption_folder(str(root), cap, batch_size=2, progress=RecordingProgress(stop_at=2, error=KeyboardInterrupt))
    assert len(list(root.rglob("*.txt"))) == 2
    assert C.caption_folder(str(root), cap, batch_size=2)["captioned"] == 2
    assert len(list(root.rglob("*.txt"))) == 4


def test_clip_filter_drops_low_pairs_and_the_trainer_skips_them(tmp_path, models):
    from atelier.tests.unit.test_training_data import TinyClip

    root = _folder(tmp_path / "d")
    cap = C.Captioner(models["blip"], "cpu", max_new_tokens=4, num_beams=1)
    clip = TinyClip()
    probe = C.caption_folder(str(root), cap, embedder=clip, threshold=-2.0)
    scores = sorted(e["score"] for e in json.loads((root / D.MANIFEST).read_text())["entries"].values())
    assert probe["captioned"] == 3 and not probe["dropped"]
    threshold = (scores[0] + scores[1]) / 2
    stats = C.caption_folder(str(root), cap, embedder=clip, threshold=threshold)  # a new threshold: redone
    assert len(stats["dropped"]) == 1 and stats["captioned"] == 2 and stats["dropped"][0][2] == scores[0]
    assert len(list(root.rglob("*.txt"))) == 2
    scan = D.scan_folder(str(root), 32)
    assert len(scan.samples) == 2 and "dropped by the CLIP filter" in scan.skipped[0][1]
    assert len(D.scan_folder(str(root), 32, caption_mode="template").samples) == 3


def test_wrong_model_folders_are_refused_clearly(tmp_path, models):
    with pytest.raises(C.CaptionError, match="holds a 'bert' model; captions need an image-to-text model"):
        C.Captioner(models["bert"], "cpu")
    with pytest.raises(C.CaptionError, match="not a model folder"):
        C.Captioner(str(tmp_path), "cpu")
    _folder(tmp_path / "d")
    with pytest.raises(SystemExit, match="needs --clip-weights"):
        C.main([str(tmp_path / "d"), "--model", models["blip"], "--clip-filter", "--no-progress"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        C.main([str(tmp_path / "empty"), "--model", models["blip"]])


def test_caption_cli_end_to_end(tmp_path, models, capsys):
    root = _folder(tmp_path / "d")
    assert C.main([str(root), "--model", models["git"], "--no-progress", "--max-new-tokens", "4",
                   "--num-beams", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "with GIT" in out and "wrote 3 caption(s)" in out and "--caption-mode sidecar" in out


def test_wikiart_csv_converter(tmp_path, capsys):
    d = tmp_path / "wikiart_csv"
    d.mkdir()
    (d / "genre_class.txt").write_text("0 abstract_painting\n1 cityscape\n2 religious_painting\n3 still_life\n")
    (d / "genre_train.csv").write_text("Impressionism/claude-monet_rouen-1894.jpg,1\n"
                                       "Baroque/rembrandt_the-night-watch-1642.jpg,2\n")
    (d / "genre_val.csv").write_text("Cubism/juan-gris_still-life-1914.jpg,3\n")
    (d / "style_class.txt").write_text("0 Impressionism\n1 Post_Impressionism\n")
    (d / "style_train.csv").write_text("Impressionism/claude-monet_rouen-1894.jpg,0\n")
    out = tmp_path / "meta.csv"
    assert wikiart.main([str(d), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines == ["path,genre,style", "Baroque/rembrandt_the-night-watch-1642.jpg,religious,",
                     "Cubism/juan-gris_still-life-1914.jpg,still life,",
                     "Impressionism/claude-monet_rouen-1894.jpg,cityscape,Impressionism"]
    assert "3 images; 3 with a genre, 1 with a style" in capsys.readouterr().out
    # the trainer reads it: "a cityscape painting by Claude Monet, Impressionism, 1894"
    img = tmp_path / "w" / "Impressionism" / "claude-monet_rouen-1894.jpg"
    img.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 80, 40)).save(img)
    scan = D.scan_folder(str(tmp_path / "w"), 64, metadata_file=str(out))
    assert scan.samples[0].caption == "a cityscape painting by Claude Monet, Impressionism, 1894"
    (d / "genre_train.csv").write_text("x.jpg,9\n")
    with pytest.raises(SystemExit, match="row 1: expected 'path,class index'"):
        wikiart.main([str(d), "--output", str(out)])
    with pytest.raises(SystemExit, match="no WikiArt label files"):
        wikiart.main([str(tmp_path / "w"), "--output", str(out)])
