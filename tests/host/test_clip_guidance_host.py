"""CLIP guidance in a real ComfyUI: both nodes run with the tiny SD1.5 checkpoint, a tiny open_clip and
TAESD or VAE decoding (files from prepare_clip_guidance.py), any SAMPLER works, scale 0 equals the stock
KSampler, and bad input gives errors that say what to fix."""
import pathlib

import numpy as np
import pytest
from PIL import Image

from atelier.runner.server import ComfyError

HERE = pathlib.Path(__file__).parent
pytestmark = pytest.mark.host

CLIP_FILE = "atelier_cg_tiny.safetensors"
KNOBS = dict(clip_scale=5000.0, tv_scale=100.0, range_scale=150.0, saturation_scale=0.0, scale_multiplier=50.0,
             cutn=2, cut_batches=1, cut_pow=1.0, clamp_max=0.05)


def base_graph(arch):
    """Checkpoint (with its VAE), prompts, 64x64 latent and the tiny open_clip, as API nodes."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red barn, oil painting"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "AtelierOpenCLIPLoader",
              "inputs": {"weights": CLIP_FILE, "architecture": arch, "device": "cpu"}},
    }


def guided_ksampler(decoder, vae=("1", 2), **changes):
    inputs = {"model": ["1", 0], "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
              "clip": ["5", 0], "text_targets": "a red barn:2 | oil painting", "decoder": decoder, **KNOBS}
    if vae:
        inputs["vae"] = list(vae)
    inputs.update(changes)
    return {"class_type": "AtelierCLIPGuidedKSampler", "inputs": inputs}


def decode_and_save(graph, latent_ref, prefix):
    graph["90"] = {"class_type": "VAEDecode", "inputs": {"samples": latent_ref, "vae": ["1", 2]}}
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": prefix}}
    return graph


def pixels(result):
    pngs = [p for p in result.files if p.suffix == ".png"]
    assert len(pngs) == 1, result.files
    return np.asarray(Image.open(pngs[0]).convert("RGB"))


@pytest.fixture(scope="module")
def arch(comfy_server):
    from atelier.tests.fixtures.tiny_clip import TINY_NAME

    assert (comfy_server.base_dir / "models" / "open_clip" / CLIP_FILE).is_file(), "prepare_clip_guidance.py did not run"
    return TINY_NAME


@pytest.mark.parametrize("decoder", ["taesd", "vae"])
def test_guided_ksampler_runs(comfy_server, arch, decoder):
    graph = base_graph(arch)
    graph["10"] = guided_ksampler(decoder)
    result = comfy_server.run_api(decode_and_save(graph, ["10", 0], f"cg_ksampler_{decoder}"), timeout=900)
    assert result.status == "success"
    assert pixels(result).shape == (64, 64, 3)


def test_guider_with_sampler_custom_advanced(comfy_server, arch):
    info = comfy_server.object_info()
    samplers = info["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
    sampler = "plms" if "plms" in samplers else "dpmpp_2m"  # PLMS when the pack registered it
    graph = base_graph(arch)
    graph.update({
        "10": {"class_type": "AtelierCLIPGuider", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 6.0, "clip": ["5", 0],
            "text_targets": "a lighthouse", "decoder": "vae", "vae": ["1", 2], **KNOBS,
            "schedule": "linear", "end_percent": 0.9}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 3,
                                                          "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["11", 0], "guider": ["10", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
            "latent_image": ["4", 0]}},
    })
    result = comfy_server.run_api(decode_and_save(graph, ["14", 0], "cg_guider"), timeout=900)
    assert result.status == "success"
    assert pixels(result).shape == (64, 64, 3)


def test_scale_zero_is_the_stock_ksampler(comfy_server, arch):
    graph = base_graph(arch)
    graph["10"] = guided_ksampler("taesd", clip_scale=0.0)
    off = pixels(comfy_server.run_api(decode_and_save(graph, ["10", 0], "cg_off"), timeout=900))
    graph = base_graph(arch)
    graph["10"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    plain = pixels(comfy_server.run_api(decode_and_save(graph, ["10", 0], "cg_plain"), timeout=900))
    graph = base_graph(arch)
    graph["10"] = guided_ksampler("taesd", clamp_max=0.0)
    guided = pixels(comfy_server.run_api(decode_and_save(graph, ["10", 0], "cg_on"), timeout=900))
    assert np.array_equal(off, plain)
    assert not np.array_equal(guided, plain)  # guidance on changes the picture


def test_missing_taesd_file_names_file_folder_and_source(comfy_server, arch):
    approx = comfy_server.base_dir / "models" / "vae_approx"
    moved = approx / "taesd_decoder.safetensors"
    hidden = approx.parent / "taesd_decoder.safetensors.hidden"
    moved.rename(hidden)
    try:
        graph = base_graph(arch)
        graph["10"] = guided_ksampler("taesd", vae=None)
        with pytest.raises(ComfyError) as err:
            comfy_server.run_api(decode_and_save(graph, ["10", 0], "cg_missing"), timeout=900)
    finally:
        hidden.rename(moved)
    text = str(err.value)
    assert "taesd_decoder.safetensors" in text and "vae_approx" in text and "madebyollin/taesd" in text


def test_decoder_of_another_latent_format_is_refused(comfy_server, arch):
    graph = base_graph(arch)
    graph["7"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd3"}}
    graph["10"] = guided_ksampler("vae", vae=("7", 0))
    with pytest.raises(ComfyError, match="16-channel latents"):
        comfy_server.run_api(decode_and_save(graph, ["10", 0], "cg_mismatch"), timeout=900)


@pytest.mark.parametrize("decoder, change, message", [
    ("taesd", {"text_targets": "  |  "}, "no target"),
    ("taesd", {"cutn": 0}, "cutn"),
    ("vae", {}, "needs the 'vae' input"),
])
def test_bad_input_is_explained(comfy_server, arch, decoder, change, message):
    graph = base_graph(arch)
    graph["10"] = guided_ksampler(decoder, vae=None, **change)
    with pytest.raises(ComfyError, match=message):
        comfy_server.run_api(decode_and_save(graph, ["10", 0], "cg_bad"), timeout=900)
