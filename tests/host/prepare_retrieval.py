"""Model files for the style-retrieval workflows in the host session (see tests/host/conftest.py).

Writes tiny random open_clip models (64-d, and 1024-d like ViT-H-14) with their configs into
``models/open_clip``, generated WikiArt-layout images, a style database per embedder in
``models/atelier_style_db``, and a tiny random SD 2.1 unCLIP-H checkpoint (built once with ComfyUI's
Python and cached like the tiny SD1.5) into ``models/checkpoints``.
"""
import hashlib
import os
import pathlib
import subprocess


UNCLIP_NAME = "tiny_sd21_unclip_h.safetensors"
CLIP64 = "Atelier-Tiny-ViT"
CLIP1024 = "Atelier-Tiny-ViT-H"
DB64 = "tiny_wikiart_64"
DB1024 = "tiny_wikiart_1024"
N_IMAGES = 24

# Run with ComfyUI's Python and ComfyUI on sys.path: a checkpoint ComfyUI detects as SD21UnclipH (context
# 1024, adm 2048 = 1024-d CLIP image embedding + 1024-d noise-level embedding) with a two-level UNet.
UNCLIP_MAKER = r'''
import json, os, sys
import torch
from safetensors.torch import save_file
argv = sys.argv
sys.argv = [argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops
sys.argv = argv
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

torch.manual_seed(0)


def init_(module):
    """disable_weight_init leaves memory uninitialised: norms -> identity, linear/conv small random."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                mod.weight.normal_(0, 0.02)
                if mod.bias is not None:
                    mod.bias.zero_()
    return module


cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
           channel_mult=[1, 2], transformer_depth=[1, 1, 1, 1], transformer_depth_middle=1,
           transformer_depth_output=[1, 1, 1, 1], use_spatial_transformer=True, context_dim=1024, num_heads=-1,
           num_head_channels=64, use_linear_in_transformer=True, legacy=False, adm_in_channels=2048,
           num_classes="sequential", use_temporal_attention=False, use_temporal_resblock=False)
sd = {"model.diffusion_model." + k: v
      for k, v in init_(UNetModel(**cfg, operations=comfy.ops.disable_weight_init)).state_dict().items()}
dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
      "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
for k, v in init_(AutoencoderKL(ddconfig=dd, embed_dim=4)).state_dict().items():
    sd["first_stage_model." + k] = v
here = os.path.join(os.path.dirname(sys.modules["comfy.ops"].__file__), "text_encoders", "sd2_clip_config.json")
tcfg = {k: v for k, v in json.load(open(here)).items() if k in CLIPTextConfig().to_dict()}
for k, v in CLIPTextModel(CLIPTextConfig(**tcfg)).state_dict().items():
    k = k if k.startswith("text_model.") else "text_model." + k  # newer transformers drop the prefix
    sd["cond_stage_model.model.transformer." + k] = v
sd["cond_stage_model.model.transformer.text_projection.weight"] = torch.eye(1024)
save_file({k: v.contiguous().to(torch.float16) for k, v in sd.items()}, argv[1])
'''


def ensure_tiny_unclip(server):
    """Path of the cached tiny unCLIP-H checkpoint (about 1.1 GB, ~1.5 min to build once on 2 cores)."""
    from atelier.common.files import cache_dir, locked

    key = hashlib.sha256(UNCLIP_MAKER.encode()).hexdigest()[:12]
    target = pathlib.Path(cache_dir()) / f"tiny_sd21_unclip_h_{key}.safetensors"
    if target.is_file():
        return target
    with locked(str(target) + ".lock"):
        if target.is_file():
            return target
        script = pathlib.Path(cache_dir()) / f"make_tiny_unclip_{key}.py"
        script.write_text(UNCLIP_MAKER, encoding="utf-8")
        partial = target.with_name(f"{target.stem}.{os.getpid()}.part{target.suffix}")
        env = dict(os.environ, PYTHONPATH=str(server.comfyui_path))
        proc = subprocess.run([str(server.python), str(script), str(partial)], cwd=server.comfyui_path, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            raise RuntimeError("building the tiny unCLIP checkpoint failed:\n"
                               + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
        os.replace(partial, target)
    return target


def prepare(server):
    from atelier.retrieval.build import build_db
    from atelier.retrieval.embedder import OpenClipEmbedder
    from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder

    models = pathlib.Path(server.base_dir) / "models"
    clip_dir = models / "open_clip"
    images = pathlib.Path(server.base_dir) / "retrieval_images"
    make_wikiart_folder(images, n=N_IMAGES)
    for name, dim, db in ((CLIP64, 64, DB64), (CLIP1024, 1024, DB1024)):
        _, weights = make_tiny_open_clip(clip_dir / f"{name}.safetensors", name=name, config_dir=clip_dir,
                                         embed_dim=dim)
        clip = OpenClipEmbedder(name, str(weights), device="cpu")
        build_db(images, models / "atelier_style_db" / db, clip, metadata_file=images / "metadata.csv",
                 log=lambda m: None)
    from atelier.runner.tiny import place_checkpoint

    place_checkpoint(ensure_tiny_unclip(server), models / "checkpoints", [UNCLIP_NAME])
    server.retrieval_images = images
    loader64 = {"AtelierOpenCLIPLoader.weights": f"{CLIP64}.safetensors",
                "AtelierOpenCLIPLoader.architecture": "auto from file name"}
    return {
        "style_retrieval_unclip.json": {
            "AtelierOpenCLIPLoader.weights": f"{CLIP1024}.safetensors",
            "AtelierOpenCLIPLoader.architecture": "auto from file name",
            "AtelierStyleDBLoad.db_name": f"{DB1024}/manifest.json",
            "CheckpointLoaderSimple.ckpt_name": UNCLIP_NAME,
        },
        "style_retrieval_sd15.json": {**loader64, "AtelierStyleDBLoad.db_name": f"{DB64}/manifest.json"},
        "style_db_build.json": {**loader64, "AtelierStyleDBBuild.image_folder": str(images),
                                "AtelierStyleDBBuild.db_name": "host_built_db",
                                "AtelierStyleDBBuild.metadata_file": str(images / "metadata.csv")},
    }
