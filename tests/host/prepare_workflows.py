"""Overrides for workflows/atelier_full_pipeline.json, which combines every seed pipeline.

Its model files are written by the area preparers (checkpoint: conftest; claude_monet LoRA:
prepare_artist; tiny open_clip, style DB and TAESD: prepare_clip_guidance; SwinIR: prepare_upscale).
The workflow names the real files (ViT-B-16 weights, a WikiArt database), so the run points those two
loaders at the tiny stand-ins and keeps the CPU time small: 2 steps, few cutouts, 4 neighbours, 32 px tiles.
"""
from atelier.tests.fixtures.tiny_clip import TINY_NAME

CLIP_FILE = "atelier_cg_tiny.safetensors"  # prepare_clip_guidance.CLIP_FILE
DB_NAME = "atelier_cg_tiny_db"  # prepare_clip_guidance.DB_NAME


def prepare(server):
    return {
        "atelier_full_pipeline.json": {
            "AtelierOpenCLIPLoader.weights": CLIP_FILE, "AtelierOpenCLIPLoader.architecture": TINY_NAME,
            "AtelierStyleDBLoad.db_name": f"{DB_NAME}/manifest.json", "AtelierStyleRetriever.k": 4,
            "BasicScheduler.steps": 2, "AtelierCLIPGuider.cutn": 2, "AtelierCLIPGuider.cut_batches": 1,
            "AtelierSwinIRUpscale.tile_size": 32, "AtelierSwinIRUpscale.overlap": 16,
        },
    }
