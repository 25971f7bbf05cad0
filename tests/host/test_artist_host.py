"""Artist training and loading against a real ComfyUI.

One module fixture goes from a folder of paintings to a LoRA as a user would: ``python -m training caption``
(a tiny random BLIP built here, with the CLIP < threshold filter of a tiny random open_clip dropping one pair),
then ``python -m training finetune`` for 3 steps with ComfyUI's Python on the tiny random SD1.5 checkpoint, and
drops the LoRA and the full checkpoint into the session server's model folders (under the names
workflows/artist_lora_plms.json uses).

This file sorts before test_host_layer.py on purpose: its files are what that module's example-workflow
test needs for artist_lora_plms.json.
"""
import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
LORA = "claude_monet.safetensors"
FULL = "claude_monet_full.safetensors"
BASE = "tiny_sd15.safetensors"  # the host layer's tiny checkpoint (conftest)
PROMPT = "a painting by Claude Monet, Impressionism"


def make_images(folder):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for style, name, (w, h) in [("Impressionism", "claude-monet_water-lilies-1916", (96, 64)),
                                ("Impressionism", "claude-monet_haystacks-1891", (64, 64)),
                                ("Impressionism", "claude-monet_rouen-cathedral-1894", (64, 96)),
                                ("Impressionism", "claude-monet_poplars-1891", (80, 64))]:
        (folder / style).mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / style / f"{name}.png")


def run_cli(server, *args, check=True, command="finetune"):
    env = dict(os.environ, COMFYUI_PATH=str(server.comfyui_path))
    proc = subprocess.run([str(server.python), "-m", "training", command, *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m training {command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def caption(server, tmp, data):
    """Machine captions with the CLIP filter set to drop exactly the lowest-scoring of the 4 pairs."""
    import json

    from atelier.retrieval.embedder import load_open_clip
    from atelier.tests.fixtures.tiny_captioner import make_tiny_blip
    from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip
    from atelier.training import caption as C

    blip = make_tiny_blip(tmp / "blip")
    name, weights = make_tiny_open_clip(tmp / "clip" / "tiny_clip.safetensors", config_dir=tmp / "clip")
    probe = tmp / "probe"
    shutil.copytree(data, probe)
    C.caption_folder(str(probe), C.Captioner(blip, "cpu", max_new_tokens=8, num_beams=1),
                     embedder=load_open_clip(name, str(weights), device="cpu"), threshold=-2.0)
    scores = sorted(e["score"] for e in json.loads((probe / C.MANIFEST).read_text())["entries"].values())
    threshold = (scores[0] + scores[1]) / 2
    proc = run_cli(server, data, "--model", blip, "--clip-filter", "--clip-model", name, "--clip-weights", weights,
                   "--clip-threshold", threshold, "--max-new-tokens", 8, "--num-beams", 1, "--no-progress",
                   command="caption")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(comfy_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artist")
    base = comfy_server.models_dir / "checkpoints" / BASE
    data = tmp / "wikiart"
    make_images(data)
    caption_log = caption(comfy_server, tmp, data)
    out = tmp / "out"
    proc = run_cli(comfy_server, "--data", data, "--checkpoint", base, "--output", out, "--resolution", 64,
                   "--steps", 3, "--train-text-encoder", "--text-encoder-only-steps", 1, "--checkpoint-every", 2,
                   "--lr", 3e-2, "--lr-text-encoder", 3e-2, "--export", "both", "--no-progress")
    (comfy_server.models_dir / "loras").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / LORA, comfy_server.models_dir / "loras" / LORA)
    shutil.copy(out / FULL, comfy_server.models_dir / "checkpoints" / FULL)
    comfy_server.object_info(refresh=True)
    return {"out": out, "data": data, "base": base, "log": proc.stdout + proc.stderr, "caption_log": caption_log}


def graph(ckpt, lora=None, strength=1.0, seed=5):
    """API prompt: checkpoint (+ stock LoraLoader) → 1-step 64² sample → SaveImage."""
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["1", 0], ["1", 1]
    if lora:
        p["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                        "strength_model": strength, "strength_clip": strength}}
        model, clip = ["2", 0], ["2", 1]
    p.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a harbour at dawn"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"artist_{seed}"}},
    })
    return p


def test_cli_three_steps_writes_lora_checkpoint_and_config(trained):
    out = trained["out"]
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    with safe_open(str(out / LORA), "pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert md["atelier.artist"] == "Claude Monet" and md["atelier.prompt"] == PROMPT
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "16"
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert "3 images of Claude Monet" in trained["log"]  # 4 paintings, 1 dropped by the CLIP filter
    assert "wrote 3 caption(s)" in trained["caption_log"] and "kept 3, dropped 1" in trained["caption_log"]
    assert "dropped by the CLIP filter" in trained["log"]
    sidecars = sorted(trained["data"].rglob("*.txt"))
    assert len(sidecars) == 3 and all(p.read_text().startswith("a painting by Claude Monet, Impressionism, 18")
                                      or p.read_text().startswith("a painting by Claude Monet, Impressionism, 19")
                                      for p in sidecars)


def test_lora_loads_in_stock_loraloader_and_changes_the_image(comfy_server, trained):
    before = comfy_server.log_text().count("lora key not loaded")
    plain = comfy_server.run_api(graph(BASE, seed=11), timeout=900)
    with_lora = comfy_server.run_api(graph(BASE, LORA, seed=11), timeout=900)
    log = comfy_server.log_text()
    assert log.count("lora key not loaded") == before, "ComfyUI ignored some of our LoRA keys"
    assert "NOT LOADED" not in log
    a, b = plain.files[0].read_bytes(), with_lora.files[0].read_bytes()
    assert a != b, "the LoRA did not change the output"


def test_artist_loader_returns_artist_prompt_and_report(comfy_server, trained):
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
         "2": {"class_type": "AtelierArtistLoader", "inputs": {
             "model": ["1", 0], "clip": ["1", 1], "lora_name": f"Claude Monet — {LORA}", "strength_model": 1.0,
             "strength_clip": 1.0, "prompt_template": "{trigger}, a painting by {artist}, {style}"}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
         "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}
    labels = comfy_server.object_info()["AtelierArtistLoader"]["input"]["required"]["lora_name"][0]
    assert f"Claude Monet — {LORA}" in labels
    res = comfy_server.run_api(p, timeout=600)
    assert res.outputs["3"]["text"] == [PROMPT]
    report = res.outputs["4"]["text"][0]
    assert "loaded 156 LoRA modules (84 UNet, 72 text encoder)" in report and "NOT loaded" not in report


def test_full_checkpoint_loads_in_checkpointloadersimple(comfy_server, trained):
    res = comfy_server.run_api(graph(FULL, seed=3), timeout=900)
    assert res.status == "success" and res.files
    p = {"1": {"class_type": "AtelierArtistCheckpointLoader",
               "inputs": {"ckpt_name": f"Claude Monet — {FULL}", "prompt_template": "{artist}"}},
         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}}
    assert comfy_server.run_api(p, timeout=600).outputs["2"]["text"] == ["Claude Monet"]


def test_lora_for_another_base_model_is_refused(comfy_server, trained):
    from atelier.runner.run import RunError

    alien = {"lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 2816),  # SDXL-only layers
             "lora_unet_label_emb_0_0.lora_up.weight": torch.zeros(1280, 4),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}
    save_file(alien, str(comfy_server.models_dir / "loras" / "sdxl_style.safetensors"),
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    comfy_server.object_info(refresh=True)
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
         "2": {"class_type": "AtelierArtistLoader", "inputs": {
             "model": ["1", 0], "clip": ["1", 1], "lora_name": "sdxl_style.safetensors", "strength_model": 1.0,
             "strength_clip": 1.0, "prompt_template": "{artist}"}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}
    with pytest.raises(RunError, match="none of the 2 modules of sdxl_style.safetensors match"):
        comfy_server.run_api(p, timeout=600)


def test_cli_refuses_bad_inputs(comfy_server, trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(comfy_server, "--data", empty, "--checkpoint", trained["base"], "--output", tmp_path / "o",
                   check=False)
    assert proc.returncode != 0 and "no images" in proc.stderr
    bogus = tmp_path / "not_sd1.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(bogus))
    proc = run_cli(comfy_server, "--data", trained["data"], "--checkpoint", bogus, "--output", tmp_path / "o2",
                   "--resolution", 64, check=False)
    assert proc.returncode != 0 and "could not load" in proc.stderr and "not_sd1.safetensors" in proc.stderr
    assert not list((tmp_path / "o2").glob("*.safetensors"))


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(comfy_server, trained, tmp_path):
    """A real SIGINT to the CLI mid-training: exit code 130, a resumable checkpoint, --resume completes."""
    import signal
    import time

    out = tmp_path / "run"
    args = [str(comfy_server.python), "-m", "training", "finetune", "--data", str(trained["data"]),
            "--checkpoint", str(trained["base"]), "--output", str(out), "--resolution", "64", "--no-progress",
            "--checkpoint-every", "1", "--keep-checkpoints", "0"]
    env = dict(os.environ, COMFYUI_PATH=str(comfy_server.comfyui_path))
    proc = subprocess.Popen(args + ["--steps", "200"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while not (out / "checkpoints" / "step-000001").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, text
    assert "interrupted at step" in text and "--resume" in text
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps and all(not p.startswith(".") for p in steps)  # no temporary folder left behind
    stopped_at = int(steps[-1].split("-")[1])
    assert 1 <= stopped_at < 200
    assert not (out / LORA).exists()  # no export from an interrupted run
    done = run_cli(comfy_server, *args[4:], "--steps", stopped_at + 1, "--resume")
    assert f"resumed from {out / 'checkpoints' / steps[-1]} at step {stopped_at}" in done.stdout
    assert (out / LORA).is_file()
