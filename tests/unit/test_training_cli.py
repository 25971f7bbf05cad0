"""python -m training finetune (training/finetune_artist.py): flags, config merging, and whole runs on the toy backend (no ComfyUI)."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from atelier.training import finetune_artist as fa
from atelier.tests.fixtures.training_toys import ToyBackend, torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_help_documents_every_flag():
    parser = fa.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"
    assert set(DEFAULT for DEFAULT in fa.DEFAULTS) <= {a.dest for a in parser._actions}
    assert "(default: 16)" in text  # ArgumentDefaultsHelpFormatter shows defaults


def test_config_file_merges_under_typed_flags(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"data": "d", "checkpoint": "c.safetensors", "rank": 4, "steps": 7}))
    cfg = fa.resolve_config(["--config", str(cfg_file), "--steps", "9"])
    assert (cfg["rank"], cfg["steps"], cfg["lr"], cfg["data"]) == (4, 9, fa.DEFAULTS["lr"], "d")
    cfg_file.write_text(json.dumps({"data": "d", "checkpoint": "c", "rnak": 4}))
    with pytest.raises(SystemExit, match="unknown keys.*rnak"):
        fa.resolve_config(["--config", str(cfg_file)])
    with pytest.raises(SystemExit, match="--data is required"):
        fa.resolve_config(["--checkpoint", "x"])
    with pytest.raises(SystemExit, match="need --train-text-encoder"):
        fa.resolve_config(["--data", "d", "--checkpoint", "c", "--text-encoder-only-steps", "3"])


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(64, 64), (64, 64), (96, 64)]):
        p = tmp_path / "data" / "Impressionism" / f"claude-monet_work-{i}-190{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(p)
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(os.urandom(4096))
    return tmp_path


def _run(folder, out, *extra):
    cfg = fa.resolve_config(["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"),
                             "--output", str(out), "--resolution", "64", "--rank", "2", "--alpha", "2",
                             "--lr", "1e-2", "--no-progress", "--train-text-encoder", *extra])
    return fa.run(cfg, backend_factory=ToyBackend)


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_run_writes_kohya_lora_and_resume_matches_straight_run(folder):
    assert _run(folder, folder / "a", "--steps", "4", "--text-encoder-only-steps", "1") == 0
    straight, md = _tensors(folder / "a" / "claude_monet.safetensors")
    assert md["atelier.artist"] == "Claude Monet" and json.loads(md["atelier.styles"]) == ["Impressionism"]
    assert json.loads(md["atelier.training_args"])["text_encoder_only_steps"] == 1
    assert {k.split(".")[0].split("_")[1] for k in straight} == {"unet", "te"}
    assert _run(folder, folder / "b", "--steps", "2", "--text-encoder-only-steps", "1", "--checkpoint-every", "1") == 0
    assert _run(folder, folder / "b", "--steps", "4", "--text-encoder-only-steps", "1", "--resume") == 0
    resumed, _ = _tensors(folder / "b" / "claude_monet.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert len(os.listdir(folder / "a" / "latent_cache")) == 3


def test_run_full_checkpoint_export_and_bad_resume(folder):
    assert _run(folder, folder / "f", "--steps", "1", "--method", "full", "--no-train-text-encoder") == 0
    sd, md = _tensors(folder / "f" / "claude_monet_full.safetensors")
    assert md["atelier.kind"] == "checkpoint" and any(k.startswith("model.diffusion_model.") for k in sd)
    with pytest.raises(SystemExit, match="no checkpoint"):
        _run(folder, folder / "empty", "--steps", "1", "--resume")


def test_small_images_skipped_by_default_or_refused_on_request(folder):
    base = ["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"), "--resolution", "128"]
    with pytest.raises(SystemExit, match="no usable images.*smaller than 128x128"):
        fa.run(fa.resolve_config(base + ["--output", str(folder / "o")]), backend_factory=ToyBackend)
    with pytest.raises(SystemExit, match="smaller than the training resolution 128x128"):
        fa.run(fa.resolve_config(base + ["--output", str(folder / "p"), "--small-images", "error"]),
               backend_factory=ToyBackend)


def test_clip_filter_through_the_cli_with_the_pack_embedder(folder, capsys):
    """--clip-filter goes through retrieval.embedder (the ATELIER_CLIP contract) and reports what it drops."""
    from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip

    name, weights = make_tiny_open_clip(folder / "clip.safetensors")
    base = ["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"), "--resolution", "64",
            "--no-progress", "--steps", "1", "--clip-filter", "--clip-model", name, "--clip-weights", str(weights),
            "--device", "cpu"]
    with pytest.raises(SystemExit, match="dropped every image"):
        fa.run(fa.resolve_config(base + ["--output", str(folder / "all"), "--clip-threshold", "1.01"]),
               backend_factory=ToyBackend)
    report = json.loads((folder / "all" / "clip_filter_dropped.json").read_text())
    assert len(report) == 3 and all(r["score"] < 1.01 for r in report)
    scores = sorted(r["score"] for r in report)
    mid = (scores[0] + scores[1]) / 2  # drops exactly the lowest-scoring pair
    assert fa.run(fa.resolve_config(base + ["--output", str(folder / "mid"), "--clip-threshold", str(mid)]),
                  backend_factory=ToyBackend) == 0
    dropped = json.loads((folder / "mid" / "clip_filter_dropped.json").read_text())
    assert [r["score"] for r in dropped] == [scores[0]]
    assert "kept 2, dropped 1" in capsys.readouterr().out
