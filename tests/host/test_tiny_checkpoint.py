"""The tiny SD1.5 checkpoint the host layer and ``--tiny`` use, built by the project's own runner/tiny_sd15.py.

Checked two ways: the file itself (key layout, initial values of every norm and bias) read in this process,
and the builder's ``--check`` (runner/tiny_sd15.py) run again with ComfyUI's Python (ComfyUI detects SD1.5, ε varies, the VAE
decodes finite values, two prompts give different conditionings).
"""
import json
import subprocess

import pytest
from safetensors import safe_open

from atelier.runner.tiny import builder_command, builder_env

CLIP_PREFIX = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def tensors(comfy_server):
    with safe_open(str(comfy_server.tiny_checkpoint), framework="pt") as handle:
        return {k: handle.get_tensor(k).float() for k in handle.keys()}


def test_clip_keys_live_under_text_model(tensors):
    clip = [k for k in tensors if k.startswith(CLIP_PREFIX)]
    assert len(clip) > 190  # 12 layers x 16 tensors + embeddings + final norm
    assert all(k.startswith(CLIP_PREFIX + "text_model.") for k in clip)


def test_norms_are_identity_and_biases_zero(tensors):
    unet_vae = {k: v for k, v in tensors.items() if not k.startswith(CLIP_PREFIX)}
    norms = [k for k in unet_vae if k.endswith(".weight") and unet_vae[k].ndim == 1]  # GroupNorm/LayerNorm scales
    assert "model.diffusion_model.out.0.weight" in norms  # the UNet's last GroupNorm: ε ≡ 0 if it were 0
    assert len(norms) > 50
    assert all(bool((unet_vae[k] == 1).all()) for k in norms)
    biases = [k for k in unet_vae if k.endswith(".bias")]
    assert biases and all(bool((unet_vae[k] == 0).all()) for k in biases)


def test_conv_and_linear_weights_have_std_one_over_sqrt_fan_in(tensors):
    for key in ("model.diffusion_model.input_blocks.0.0.weight",   # conv_in, fan_in 4*3*3
                "model.diffusion_model.time_embed.0.weight",       # linear, fan_in 320
                "first_stage_model.decoder.conv_in.weight"):       # VAE conv, fan_in 4*3*3
        w = tensors[key]
        expected = w[0].numel() ** -0.5
        assert abs(float(w.std()) / expected - 1) < 0.1, (key, float(w.std()), expected)


def test_comfyui_detects_sd15_and_the_model_is_usable(comfy_server):
    proc = subprocess.run(builder_command(comfy_server.python, "--check", comfy_server.tiny_checkpoint),
                          cwd=comfy_server.comfyui_path, env=builder_env(comfy_server.comfyui_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["model_config"] == "SD15"
    assert report["eps_finite"] and report["eps_std"] > 0.01
    assert report["vae_finite"] and report["vae_std"] > 0.01 and report["image_shape"] == [1, 64, 64, 3]
    assert report["cond_shape"] == [1, 77, 768] and report["cond_max_abs_diff"] > 0.01
