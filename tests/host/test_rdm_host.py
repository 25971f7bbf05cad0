"""The RDM inside a real ComfyUI (0.15.1): the tiny CompVis-layout RDM through the loader node, the stock
samplers (KSampler with ``plms``, KSamplerAdvanced, SamplerCustomAdvanced), VAE Decode / Encode at f = 16, EMA
against raw weights, the exact context that reaches the UNet, and the loader's refusals.

In-process tests run ``INPROCESS`` with ComfyUI's own Python (ComfyUI imported as a library, the pack loaded with
``load_custom_node``); the UNet's inputs are captured with ``ModelPatcher.set_model_unet_function_wrapper``.
Server tests run the example workflows' graphs through the session server (tests/host/prepare_rdm.py).
"""
import json
import os
import pathlib
import pickle
import subprocess

import numpy as np
import pytest

from atelier.runner import convert

pytestmark = pytest.mark.host

ROOT = pathlib.Path(__file__).resolve().parents[2]

INPROCESS = r'''
import asyncio, json, os, sys
pack_dir, rdm_dir, clip_dir, db_dir, out_path = sys.argv[1:6]
_argv = sys.argv
sys.argv = [_argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
sys.argv = _argv
import torch
import nodes, comfy.samplers, comfy.sample, folder_paths
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
R = {"loaded": asyncio.run(nodes.load_custom_node(pack_dir))}
folder_paths.add_model_folder_path("rdm", rdm_dir)
Loader, Cond = nodes.NODE_CLASS_MAPPINGS["AtelierRDMCheckpointLoader"], nodes.NODE_CLASS_MAPPINGS["AtelierRDMConditioning"]
R["listed"] = sorted(Loader.INPUT_TYPES()["required"]["ckpt_name"][0])

from atelier.retrieval.embedder import OpenClipEmbedder
from atelier.retrieval.db import load_db
from atelier.tests.fixtures.tiny_clip import register_tiny_config
register_tiny_config(clip_dir, "Atelier-Tiny-ViT-L", embed_dim=768)
clip = OpenClipEmbedder("Atelier-Tiny-ViT-L", os.path.join(clip_dir, "Atelier-Tiny-ViT-L.safetensors"), device="cpu")
db = load_db(db_dir)
text = "a lighthouse in a storm"
q = clip.encode_text([text])[0]
nn = db.neighbors(q.numpy(), 19)

# the reference, from the paper's description: c = [t/|t|, e_1/|e_1|, ..., e_19/|e_19|] (best first)
t = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer([text])).float(), dim=-1)
import numpy as np
rows = torch.from_numpy(np.asarray(db.embeddings, dtype=np.float32)[nn.extra["rows"]])
ref = torch.cat([t[:, None], torch.nn.functional.normalize(rows, dim=-1)[None]], dim=1)

pos, info = Cond().encode(clip, text, 19, "text + neighbours", 1.0, "replace text", neighbors=nn)
neg = nodes.ConditioningZeroOut().zero_out(pos)[0]
R["cond_info"] = info
seen = []
def capture(apply_model, args):
    seen.append(args["c"]["c_crossattn"].detach().clone())
    return apply_model(args["input"], args["timestep"], **args["c"])

def sample(model, name="plms", steps=3, size=128, wrap=False, seed=1):
    m = model.clone()
    if wrap:
        m.set_model_unet_function_wrapper(capture)
    lat = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    with torch.inference_mode():
        return nodes.common_ksampler(m, seed, steps, 5.0, name, "ddim_uniform", pos, neg, lat)[0]["samples"]

model, vae, linfo = Loader().load("tiny_rdm.ckpt", "ema")
R["info"] = linfo
R["model_config"] = type(model.model.model_config).__name__
R["heads"] = [mod.heads for mod in model.model.diffusion_model.modules() if type(mod).__name__ == "CrossAttention"][:2]
R["sigma_max_min"] = [float(model.get_model_object("model_sampling").sigma_max), float(model.get_model_object("model_sampling").sigma_min)]
x = sample(model, wrap=True)
R["latent_shape"] = list(x.shape)
R["finite"] = bool(torch.isfinite(x).all())
R["calls"] = len(seen)
c = seen[0]
R["ctx_shape"] = list(c.shape)
halves = [c[i:i + 1] for i in range(c.shape[0])]
R["ctx_ref_err"] = min(float((h - ref).abs().max()) for h in halves)
R["ctx_zero_half"] = min(float(h.abs().max()) for h in halves)
with torch.inference_mode():
    img = nodes.VAEDecode().decode(vae, {"samples": x})[0]
    R["image_shape"] = list(img.shape)
    R["encoded_shape"] = list(nodes.VAEEncode().encode(vae, img)[0]["samples"].shape)

raw_model, _, _ = Loader().load("tiny_rdm.ckpt", "raw")
R["ema_vs_raw"] = float((sample(raw_model) - x).abs().max())
st_model, _, _ = Loader().load("tiny_rdm.safetensors", "ema")
R["ckpt_vs_safetensors"] = float((sample(st_model) - x).abs().max())
_, _, noema_info = Loader().load("tiny_rdm_noema.safetensors", "ema")
R["noema_info"] = noema_info

# KSamplerAdvanced and SamplerCustomAdvanced's path
lat = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
with torch.inference_mode():
    adv = nodes.KSamplerAdvanced().sample(model, "enable", 3, 2, 5.0, "plms", "ddim_uniform", pos, neg, lat, 0, 2, "disable")[0]
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 2).cpu()
    lat16 = comfy.sample.fix_empty_latent_channels(model, lat["samples"], lat.get("downscale_ratio_spacial"))  # as SamplerCustomAdvanced
    custom = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(lat16, 3), 5.0, comfy.samplers.sampler_object("plms"),
                                        sig, pos, neg, lat16, disable_pbar=True, seed=3)
R["advanced_shape"] = list(adv["samples"].shape)
R["custom_shape"] = list(custom.shape)

R["errors"] = {}
for name in ("sd15_in_the_wrong_folder.safetensors", "truncated.ckpt", "evil.ckpt"):
    try:
        Loader().load(name, "ema")
        R["errors"][name] = "loaded"
    except Exception as e:
        R["errors"][name] = f"{type(e).__name__}: {e}"
json.dump(R, open(out_path, "w"), indent=1)
'''


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def inprocess(comfy_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rdm_inprocess")
    (tmp / "atelier").symlink_to(ROOT, target_is_directory=True)
    models = pathlib.Path(comfy_server.base_dir) / "models"
    rdm = tmp / "rdm"
    rdm.mkdir()
    for f in (models / "rdm").iterdir():
        (rdm / f.name).symlink_to(f.resolve())
    data = (rdm / "tiny_rdm.ckpt").read_bytes()
    (rdm / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    marker = tmp / "the_pickle_ran"
    with open(rdm / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": Evil(marker)}}, f)
    script, out = tmp / "inprocess.py", tmp / "result.json"
    script.write_text(INPROCESS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(comfy_server.comfyui_path), str(ROOT)])}
    proc = subprocess.run([str(comfy_server.python), str(script), str(tmp / "atelier"), str(rdm), str(models / "open_clip"),
                           str(models / "atelier_style_db" / "artbench_surrealism"), str(out)],
                          cwd=comfy_server.comfyui_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    result["marker_exists"] = marker.exists()
    return result


def test_loader_builds_the_rdm_config(inprocess):
    assert inprocess["model_config"] == "RDM"
    assert inprocess["heads"] == [2, 2]  # 64 channels in heads of 32
    assert inprocess["sigma_max_min"] == pytest.approx([35.0677, 0.038759], rel=1e-3)  # linear 0.0015-0.015
    assert "ema weights" in inprocess["info"] and "KL f=16" in inprocess["info"]
    assert {"model.ckpt", "tiny_rdm.ckpt", "tiny_rdm.safetensors"} <= set(inprocess["listed"])


def test_stock_ksampler_with_plms_samples_and_the_vae_decodes_at_f16(inprocess):
    assert inprocess["latent_shape"] == [1, 16, 8, 8] and inprocess["finite"]
    assert inprocess["calls"] == 4  # plms: N steps = N + 1 model calls
    assert inprocess["image_shape"] == [1, 128, 128, 3]
    assert inprocess["encoded_shape"] == [1, 16, 8, 8]
    assert inprocess["advanced_shape"] == [1, 16, 4, 4] and inprocess["custom_shape"] == [1, 16, 4, 4]


def test_the_context_reaching_the_unet_is_knn2img_s(inprocess):
    assert inprocess["ctx_shape"] == [2, 20, 768]  # cond and uncond batched, (k + 1) tokens each
    assert inprocess["ctx_ref_err"] < 1e-5
    assert inprocess["ctx_zero_half"] == 0.0  # ConditioningZeroOut: knn2img's zeros_like(c)
    assert "(1, 20, 768)" in inprocess["cond_info"]


def test_ema_and_raw_weights_differ_and_conversions_agree(inprocess):
    assert inprocess["ema_vs_raw"] > 1e-3
    assert inprocess["ckpt_vs_safetensors"] == 0.0
    assert "no EMA weights" in inprocess["noema_info"] and "raw weights" in inprocess["noema_info"]


def test_loader_refuses_foreign_damaged_and_code_carrying_files(inprocess):
    errors = inprocess["errors"]
    assert "an SD 1.x checkpoint" in errors["sd15_in_the_wrong_folder.safetensors"]
    assert "truncated or not a checkpoint" in errors["truncated.ckpt"]
    assert "its pickle holds code" in errors["evil.ckpt"]
    assert not inprocess["marker_exists"]


def test_artbench_workflow_conditions_on_text_and_19_neighbours(comfy_server):
    name = "rdm_artbench.json"
    info = comfy_server.object_info()
    prompt = convert.ui_to_api(convert.load_workflow(ROOT / "workflows" / name), info, validate=True)
    convert.apply_overrides(prompt, {**comfy_server.workflow_overrides[name], "EmptyLatentImage.width": 64,
                                     "EmptyLatentImage.height": 96, "KSampler.steps": 2}, info)
    result = comfy_server.run_api(prompt, timeout=900)
    texts = [t for out in result.outputs.values() for t in out.get("text", [])]
    assert any("RDM context (1, 20, 768): text + 19 neighbours" in t for t in texts), texts
    assert any("[no image]" in t for t in texts)  # an imported database: no image files
    from PIL import Image

    pngs = [p for p in result.files if "atelier_rdm_artbench" in p.name]
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (64, 96)
    assert np.asarray(Image.open(pngs[0])).std() > 0
