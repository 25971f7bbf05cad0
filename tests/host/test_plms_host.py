"""PLMS inside a real ComfyUI (0.15.1): registration, stock KSampler, SamplerCustomAdvanced, model-call counts,
the real ipndm, masks, denoise < 1, v-prediction and interrupts.

Two kinds of test:
- server tests use the host layer's ``comfy_server`` fixture (a running ComfyUI with this pack loaded);
- in-process tests run ``INPROCESS`` below with ComfyUI's own Python in a subprocess: ComfyUI is imported
  as a library, this pack is loaded with ComfyUI's ``load_custom_node``, and every model call is counted
  with ``ModelPatcher.set_model_unet_function_wrapper`` (one call = one sampler model evaluation, cond and
  uncond batched together).
"""
import json
import os
import pathlib
import subprocess

import pytest

pytestmark = pytest.mark.host

ROOT = pathlib.Path(__file__).resolve().parents[2]

INPROCESS = r'''
import asyncio, json, os, sys
pack_dir, ckpt, out_path = sys.argv[1:4]
_argv = sys.argv
sys.argv = [_argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
sys.argv = _argv
import torch
import nodes, comfy.samplers, comfy.sample, comfy.sd, comfy.utils, comfy.model_management as mm
import comfy.k_diffusion.sampling as kds

asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
R = {"loaded": asyncio.run(nodes.load_custom_node(pack_dir))}
# a second copy of the pack (another folder name) must not add the name twice
R["loaded_again"] = asyncio.run(nodes.load_custom_node(pack_dir + "_again"))
def combo_options(node):
    spec = nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"]["sampler_name"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # V1 list, or V3 ("COMBO", {options})

R["counts"] = {
    "KSAMPLER_NAMES": comfy.samplers.KSAMPLER_NAMES.count("plms"),
    "SAMPLER_NAMES": comfy.samplers.SAMPLER_NAMES.count("plms"),
    "KSampler.SAMPLERS": comfy.samplers.KSampler.SAMPLERS.count("plms"),
    "KSampler node": combo_options("KSampler").count("plms"),
    "KSamplerAdvanced node": combo_options("KSamplerAdvanced").count("plms"),
    "KSamplerSelect node": combo_options("KSamplerSelect").count("plms"),
}
R["ipndm_first"] = comfy.samplers.KSAMPLER_NAMES.index("ipndm") < comfy.samplers.KSAMPLER_NAMES.index("plms")
R["sample_plms_module"] = kds.sample_plms.__module__
plms_node = sys.modules[kds.sample_plms.__module__]
PLMSNode = nodes.NODE_CLASS_MAPPINGS["AtelierPLMSSampler"]

model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True)
pos = nodes.CLIPTextEncode().encode(clip, "a painting of a lighthouse")[0]
neg = nodes.CLIPTextEncode().encode(clip, "")[0]
calls = []

def counting(apply_model, args):
    """Count the model calls (the tiny UNet's ε varies, so samplers do not agree trivially)."""
    x, sigma = args["input"], args["timestep"]
    calls.append(float(sigma.flatten()[0]))
    return apply_model(x, sigma, **args["c"])

m = model.clone()
m.set_model_unet_function_wrapper(counting)
latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

def ksampler(name, steps, denoise=1.0, model=m, lat=None):
    calls.clear()
    with torch.inference_mode():
        out = nodes.common_ksampler(model, 1, steps, 5.0, name, "ddim_uniform", pos, neg,
                                    {"samples": torch.zeros(1, 4, 8, 8) if lat is None else lat}, denoise=denoise)[0]
    return out["samples"], len(calls)

print("sampling checks", flush=True)
R["ksampler_calls"] = {}
for name, steps in [("plms", 1), ("plms", 2), ("plms", 5), ("ipndm", 5)]:
    s, n = ksampler(name, steps)
    R["ksampler_calls"][f"{name}-{steps}"] = [n, bool(torch.isfinite(s).all())]
s, n = ksampler("plms", 4, denoise=0.5)  # sigmas are the tail of an 8-step schedule
R["denoise_half_calls"] = n

def sigmas_for(steps, mdl=m):
    return comfy.samplers.calculate_sigmas(mdl.get_model_object("model_sampling"), "ddim_uniform", steps).cpu()

def custom(sampler, sigmas, mdl=m, mask=None, callback=None, lat=None, grad=False):
    calls.clear()
    lat = torch.zeros(1, 4, 8, 8) if lat is None else lat
    noise = comfy.sample.prepare_noise(lat, 3)
    ctx = torch.inference_mode() if not grad else torch.enable_grad()
    with ctx:
        out = comfy.sample.sample_custom(mdl, noise, 5.0, sampler, sigmas, pos, neg, lat, noise_mask=mask,
                                         callback=callback, disable_pbar=True, seed=3)
    return out, len(calls)

sampler = PLMSNode().get_sampler(order=4, first_step="pseudo_improved_euler", eta=0.0)[0]
x_pie, R["custom_calls_5"] = custom(sampler, sigmas_for(5))
a, R["custom_calls_eta"] = custom(PLMSNode().get_sampler(order=2, first_step="pseudo_improved_euler", eta=0.5)[0], sigmas_for(5))
b, _ = custom(PLMSNode().get_sampler(order=2, first_step="pseudo_improved_euler", eta=0.5)[0], sigmas_for(5))
R["eta_seeded_repeatable"] = bool(torch.equal(a, b))
R["eta_changes_result"] = float((a - x_pie).abs().max())

# the real ipndm vs PLMS with an Euler first step: the same method
R["ipndm_diff"] = {}
for steps, order in [(1, 4), (2, 4), (5, 4), (5, 2)]:
    x_ip, _ = custom(comfy.samplers.ksampler("ipndm", {"max_order": order}), sigmas_for(steps))
    x_pl, _ = custom(comfy.samplers.KSAMPLER(plms_node.comfy_sample_plms, {"order": order, "first_step": "euler"}), sigmas_for(steps))
    R["ipndm_diff"][f"{steps}-{order}"] = [float((x_ip - x_pl).abs().max()), float(x_ip.abs().max())]
    if (steps, order) == (5, 4):
        R["pie_vs_ipndm_diff"] = float((x_ip - x_pie).abs().max())

# inpainting: KSamplerX0Inpaint wraps the model, so every denoised PLMS sees is pinned outside the mask
image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
mask = torch.zeros(1, 1, 8, 8)
mask[..., 4:] = 1.0
seen = []
out, _ = custom(sampler, sigmas_for(5), mask=mask, lat=image, callback=lambda i, x0, x, total: seen.append(x0.clone()))
R["mask_steps"] = len(seen)
kept = m.model.process_latent_in(image)[..., :4]  # denoised lives in the model's latent scale
R["mask_keep_err"] = max(float((x0[..., :4] - kept).abs().max()) for x0 in seen)
R["mask_out_keep_err"] = float((out[..., :4] - image[..., :4]).abs().max())
R["mask_out_changed"] = float((out[..., 4:] - image[..., 4:]).abs().max())

# v-prediction: ComfyUI's V_PREDICTION wrapper turns the model output into D; PLMS only sees D
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
mv = ModelSamplingDiscrete.execute(m, "v_prediction", False)[0] if hasattr(ModelSamplingDiscrete, "execute") else ModelSamplingDiscrete().patch(m, "v_prediction", False)[0]
s, n = ksampler("plms", 4, model=mv)
R["vpred"] = [n, bool(torch.isfinite(s).all())]

# interrupts: the progress hook ComfyUI's server installs raises once the user pressed "cancel"
def hook(value, total, preview_image=None, prompt_id=None, node_id=None):
    if value == 2:
        mm.interrupt_current_processing(True)  # the user cancels during step 2
    mm.throw_exception_if_processing_interrupted()
comfy.utils.set_progress_bar_global_hook(hook)
try:
    ksampler("plms", 5)
    R["interrupt"] = "not raised"
except mm.InterruptProcessingException:
    R["interrupt"] = len(calls)
finally:
    mm.interrupt_current_processing(False)
    comfy.utils.set_progress_bar_global_hook(None)

# outside inference mode (scripts): no autograd graph
out_grad, _ = custom(sampler, sigmas_for(4), grad=True)
R["grad_outside_inference"] = bool(out_grad.requires_grad)
R["model_params_require_grad"] = any(p.requires_grad for p in m.model.parameters())

json.dump(R, open(out_path, "w"), indent=1)
'''


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


@pytest.fixture(scope="module")
def inprocess(server, tmp_path_factory):
    comfy = server.comfyui_path
    ckpts = [pathlib.Path(server.tiny_checkpoint)] if getattr(server, "tiny_checkpoint", None) else sorted(
        (server.base_dir / "models" / "checkpoints").glob("*.safetensors"))
    assert ckpts, "the host fixture put no checkpoint in models/checkpoints"
    tmp = tmp_path_factory.mktemp("plms_inprocess")
    for name in ("atelier", "atelier_again"):
        (tmp / name).symlink_to(ROOT, target_is_directory=True)
    script, out = tmp / "inprocess.py", tmp / "result.json"
    script.write_text(INPROCESS, encoding="utf-8")
    proc = subprocess.run([str(server.python), str(script), str(tmp / "atelier"), str(ckpts[0].resolve()), str(out)],
                          cwd=comfy, env={**os.environ, "PYTHONPATH": str(comfy)}, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_plms_is_registered_once_everywhere(inprocess):
    assert inprocess["loaded"] and inprocess["loaded_again"]
    assert inprocess["counts"] == dict.fromkeys(inprocess["counts"], 1)
    assert inprocess["ipndm_first"]  # appended, existing names keep their places
    assert inprocess["sample_plms_module"].endswith("nodes.plms")


def test_stock_ksampler_runs_plms_with_steps_plus_one_calls(inprocess):
    calls = inprocess["ksampler_calls"]
    assert all(finite for _, finite in calls.values())
    # plms N steps: N + 1 calls (one step straight to σ = 0 needs no extra call); ipndm/euler: N calls.
    # An unknown name would silently fall back to euler, which this count tells apart.
    assert {k: n for k, (n, _) in calls.items()} == {
        "plms-1": 1, "plms-2": 3, "plms-5": 6, "ipndm-5": 5}
    assert inprocess["denoise_half_calls"] == 5
    assert inprocess["vpred"] == [5, True]


def test_plms_node_sampler_runs_in_sample_custom(inprocess):
    assert inprocess["custom_calls_5"] == 6
    assert inprocess["custom_calls_eta"] == 6
    assert inprocess["eta_seeded_repeatable"] and inprocess["eta_changes_result"] > 1e-3


def test_euler_start_equals_real_ipndm(inprocess):
    for key, (diff, scale) in inprocess["ipndm_diff"].items():
        assert diff <= 1e-5 * max(1.0, scale), (key, diff, scale)
    assert inprocess["pie_vs_ipndm_diff"] > 1e-3  # the pseudo improved Euler start really differs


def test_mask_is_applied_by_comfyui_wrapper(inprocess):
    assert inprocess["mask_steps"] == 5
    assert inprocess["mask_keep_err"] < 1e-6
    assert inprocess["mask_out_keep_err"] < 1e-5
    assert inprocess["mask_out_changed"] > 1e-2


def test_interrupt_stops_plms_during_the_next_progress_update(inprocess):
    # calls: step 1 (+1 extra), step 2 -> progress value 2 raises; no call of step 3
    assert inprocess["interrupt"] == 3


def test_no_autograd_graph_outside_inference_mode(inprocess):
    assert inprocess["grad_outside_inference"] is False


# ---------------------------------------------------------------- through the server

def test_object_info_lists_plms_once(server):
    info = server.object_info()
    for node in ("KSampler", "KSamplerAdvanced", "KSamplerSelect"):
        options = info[node]["input"]["required"]["sampler_name"]
        names = options[0] if isinstance(options[0], list) else options[1]["options"]
        assert names.count("plms") == 1, node
    assert "AtelierPLMSSampler" in info


def _ksampler_graph(sampler_name, steps):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse, oil painting", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": steps, "cfg": 5.0, "sampler_name": sampler_name, "scheduler": "ddim_uniform", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "plms_host"}},
    }


def test_ksampler_with_plms_runs_through_the_server(server):
    result = server.run_api(_ksampler_graph("plms", 4), timeout=600)
    assert result.files and all(pathlib.Path(f).is_file() for f in result.files)


def test_sampler_custom_advanced_with_atelier_plms(server):
    graph = _ksampler_graph("plms", 4)
    del graph["5"]
    graph.update({
        "10": {"class_type": "AtelierPLMSSampler", "inputs": {"order": 4, "first_step": "pseudo_improved_euler", "eta": 0.0}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "ddim_uniform", "steps": 4, "denoise": 1.0}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 5.0}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["12", 0], "guider": ["13", 0], "sampler": ["10", 0], "sigmas": ["11", 0], "latent_image": ["4", 0]}},
    })
    result = server.run_api(graph, timeout=600)
    assert result.files
