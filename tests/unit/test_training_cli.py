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


def test_help_groups_hold_their_flags():
    parser = fa.build_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert groups["options"] == ["help"]  # every real flag sits in a titled group
    assert {"inputs", "captions and data", "method", "optimisation", "checkpoints and output",
            "augmentation and caption noise", "validation, logs and samples"} <= set(groups)
    assert "lr" in groups["optimisation"] and "rank" in groups["method"] and "flip" in groups[
        "augmentation and caption noise"]


@pytest.mark.parametrize("flags,message", [
    (["--lr", "0"], "--lr must be > 0 .*trains nothing"),
    (["--lr=-1e-4"], "--lr must be > 0 .*backwards"),
    (["--lr-text-encoder", "0"], "--lr-text-encoder must be > 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--rank", "0"], "--rank must be an integer >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be an integer >= 1"),
    (["--caption-dropout", "2"], "--caption-dropout must be a number from 0 to 1"),
    (["--validation-split", "0.9"], "--validation-split must be a number from 0 to 0.5"),
])
def test_bad_numbers_are_refused_before_any_work(folder, flags, message):
    with pytest.raises(SystemExit, match=message):
        fa.resolve_config(["--data", str(folder / "data"), "--checkpoint", "c", "--output", str(folder / "o"), *flags])
    assert not (folder / "o").exists()


def test_resume_with_another_rank_says_so(folder):
    assert _run(folder, folder / "r", "--steps", "1") == 0
    with pytest.raises(SystemExit, match=r"shape \(2, .*this run has \(4, .*another --rank"):
        fa.run(fa.resolve_config(["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"),
                                  "--output", str(folder / "r"), "--resolution", "64", "--rank", "4",
                                  "--no-progress", "--train-text-encoder", "--steps", "2", "--resume"]),
               backend_factory=ToyBackend)


def test_read_only_output_is_refused_before_any_work(folder, monkeypatch):
    """Simulated (the tests run as root, whom permissions do not stop): creating files in the folder fails."""
    import tempfile

    real = tempfile.mkstemp
    ro = str(folder / "ro")

    def refuse(*a, dir=None, **k):
        if dir and os.path.abspath(dir).startswith(ro):
            raise PermissionError(13, "Permission denied", dir)
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit, match="cannot write to the output folder .*Permission denied.*writable --output"):
        fa.main(["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"), "--output", ro])


def test_disk_full_while_saving_the_lora_leaves_no_file_and_resume_writes_it(folder, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if "claude_monet" not in os.path.basename(str(filename)):  # the latent cache and checkpoints still fit
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit, match="No space left.*Nothing half-written.*--resume"):
        _run(folder, folder / "full", "--steps", "2")
    assert not list((folder / "full").glob("*.safetensors")) and not list((folder / "full").glob(".*tmp*"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert _run(folder, folder / "full", "--steps", "2", "--resume") == 0
    straight = folder / "straight"
    assert _run(folder, straight, "--steps", "2") == 0
    a, _ = _tensors(folder / "full" / "claude_monet.safetensors")
    b, _ = _tensors(straight / "claude_monet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # nothing trained was lost


def test_corrupt_and_truncated_images_among_good_ones_are_skipped(folder, capsys):
    (folder / "data" / "Impressionism" / "claude-monet_bad-1910.jpg").write_bytes(b"not an image")
    Image.new("RGB", (64, 64), (9, 90, 200)).save(folder / "data" / "Impressionism" / "claude-monet_cut-1911.jpg")
    cut = folder / "data" / "Impressionism" / "claude-monet_cut-1911.jpg"
    cut.write_bytes(cut.read_bytes()[:400])
    assert _run(folder, folder / "o", "--steps", "1") == 0
    out = capsys.readouterr().out
    assert "claude-monet_bad-1910.jpg: unreadable image" in out and "claude-monet_cut-1911.jpg: unreadable" in out
    assert "3 images of Claude Monet" in out


def test_sdxl_checkpoint_is_refused_with_the_family_named(monkeypatch, tmp_path):
    """The backend's family check, with ComfyUI's loader replaced by one returning an SDXL model."""
    import types

    from atelier.training import comfy_backend as cb

    class SDXL:
        pass

    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=SDXL()))
    monkeypatch.setattr(cb, "attach", lambda path=None: None)
    monkeypatch.setattr(cb.models, "load_checkpoint", lambda *a, **k: (fake, object(), object()))
    monkeypatch.setattr(cb.models, "is_sd15", lambda m: False)
    ckpt = tmp_path / "sd_xl_base_1.0.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(cb.BackendError, match="sd_xl_base_1.0.safetensors is a SDXL checkpoint; the artist trainer "
                                              "fine-tunes SD 1.x"):
        cb.SD1Backend(str(ckpt), device="cpu")


def test_same_seed_gives_the_same_lora_and_another_seed_another(folder):
    for name, seed in (("s1", "3"), ("s2", "3"), ("s3", "4")):
        assert _run(folder, folder / name, "--steps", "2", "--seed", seed) == 0
    a, b, c = (_tensors(folder / n / "claude_monet.safetensors")[0] for n in ("s1", "s2", "s3"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_epochs_intermediate_loras_samples_validation_and_logs(folder, capsys):
    out = folder / "feat"
    assert _run(folder, out, "--epochs", "4", "--batch-size", "1", "--save-every", "3", "--save-every-epochs", "2",
                "--sample-every", "3", "--sample-prompt", "a harbour at dawn", "--sample-prompt", "a garden",
                "--sample-steps", "3", "--validation-split", "0.34", "--validation-every", "2", "--flip",
                "--random-crop", "--caption-dropout", "0.1", "--shuffle-tags", "--keep-tokens", "1",
                "--min-snr-gamma", "5", "--noise-offset", "0.05", "--lr-scheduler", "cosine", "--warmup-steps", "1",
                "--grad-accum", "2") == 0
    text = capsys.readouterr().out
    # 2 training images (1 held out) of one bucket, batch 1 × accumulation 2 → 1 step per epoch
    assert "2 images of Claude Monet" in text and "1 held out for validation" in text
    assert "4 steps (1 per epoch)" in text and "validation loss: step 2:" in text and "step 4:" in text
    names = sorted(p.name for p in out.glob("claude_monet*.safetensors"))
    assert names == ["claude_monet-epoch0002.safetensors", "claude_monet-step000003.safetensors",
                     "claude_monet.safetensors"]
    final, md = _tensors(out / "claude_monet.safetensors")
    mid, mid_md = _tensors(out / "claude_monet-step000003.safetensors")
    assert mid.keys() == final.keys() and mid_md["ss_max_train_steps"] == "3" and md["ss_max_train_steps"] == "4"
    assert any(not torch.equal(mid[k], final[k]) for k in mid)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["step-000003-00.png", "step-000003-01.png", "step-000004-00.png", "step-000004-01.png"]
    im = Image.open(out / "samples" / "step-000003-01.png")
    assert im.size == (64, 64) and im.text["parameters"].startswith("a garden")
    rows = (out / "logs" / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr_te,lr_unet,val_loss") and len(rows) == 1 + 4 + 2
    assert any("tfevents" in p.name for p in (out / "logs").iterdir())


def test_full_weight_two_stage_through_the_cli(folder):
    assert _run(folder, folder / "f2", "--steps", "3", "--method", "full", "--text-encoder-only-steps", "1",
                "--lr", "1e-3", "--lr-text-encoder", "1e-3") == 0
    sd, md = _tensors(folder / "f2" / "claude_monet_full.safetensors")
    assert md["atelier.kind"] == "checkpoint"
    assert json.loads(md["atelier.training_args"])["text_encoder_only_steps"] == 1


def test_whole_wikiart_many_artists_in_one_run(folder, capsys):
    g = torch.Generator().manual_seed(5)
    for rel in ("Baroque/rembrandt_night-watch-1642.png", "Cubism/juan-gris_still-life-1914.png"):
        p = folder / "data" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(p)
    Image.new("RGB", (32, 32)).save(folder / "data" / "Cubism" / "juan-gris_tiny-1915.png")
    cfg = fa.resolve_config(["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"),
                             "--output", str(folder / "all"), "--resolution", "64", "--rank", "2", "--steps", "1",
                             "--no-progress"])
    assert fa.run(cfg, backend_factory=ToyBackend) == 0
    out = capsys.readouterr().out
    assert "skipped 1 image(s) smaller than 64x64" in out and "5 images of 3 artists" in out
    _, md = _tensors(folder / "all" / "wikiart.safetensors")
    assert md["atelier.artist"] == "" and json.loads(md["atelier.artists"])[0] == "Claude Monet"
    assert sorted(json.loads(md["atelier.styles"])) == ["Baroque", "Cubism", "Impressionism"]


def test_presets_reproduce_the_papers_settings_and_say_what_was_open(folder, capsys):
    from atelier.training.presets import PRESETS, describe

    base = ["--data", "d", "--checkpoint", "c"]
    tl = fa.resolve_config(base + ["--preset", "transfer-learning-2023"])
    assert (tl["method"], tl["lr"], tl["epochs"], tl["batch_size"], tl["resolution"], tl["buckets"],
            tl["mixed_precision"]) == ("full", 1e-5, 50, 1, 512, False, "fp16")
    cp = fa.resolve_config(base + ["--preset", "creative-painting-2022", "--epochs", "1"])
    assert (cp["method"], cp["train_text_encoder"], cp["text_encoder_only_fraction"], cp["epochs"]) == \
        ("full", True, 0.1, 1)
    text = describe("creative-painting-2022", cp["_overrides"])
    assert "stated by the paper" in text and "left open by the paper; our choice" in text
    assert "--epochs 2" in text and "[overridden: 1]" in text
    for name, p in PRESETS.items():
        assert set(p["stated"]).isdisjoint(p["chosen"]) and set(p["stated"]) | set(p["chosen"]) <= set(fa.DEFAULTS)
    # a preset run on the toy: stage split from the fraction, preset printed
    assert fa.run(fa.resolve_config(["--data", str(folder / "data"), "--checkpoint", str(folder / "base.safetensors"),
                                     "--output", str(folder / "cp"), "--preset", "creative-painting-2022",
                                     "--resolution", "64", "--epochs", "5", "--batch-size", "1",
                                     "--mixed-precision", "no", "--no-progress", "--warmup-steps", "2"]),
                  backend_factory=ToyBackend) == 0
    out = capsys.readouterr().out
    assert "preset creative-painting-2022: Creative Painting with Latent Diffusion Models" in out
    _, md = _tensors(folder / "cp" / "claude_monet_full.safetensors")
    args = json.loads(md["atelier.training_args"])
    assert args["steps"] == 15 and args["text_encoder_only_steps"] == 1  # 3 square images × 5 epochs; 10 % and args["ema_decay"] == 0.9999
