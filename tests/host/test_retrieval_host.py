"""Style retrieval in a real ComfyUI: tiny open_clip files, generated databases, a tiny SD 2.1 unCLIP-H model.

tests/host/prepare_retrieval.py puts the model files in place; test_host_layer.py already runs every
example workflow once with those overrides. Here: what the outputs contain, that the neighbours'
embeddings really reach the unCLIP model, and the errors users get for mismatched models.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from atelier.runner import convert
from atelier.runner.run import RunError

ROOT = pathlib.Path(__file__).resolve().parents[2]
WF = ROOT / "workflows"

pytestmark = pytest.mark.host


def prompt_for(server, name, extra=None, steps=2):
    info = server.object_info()
    prompt = convert.ui_to_api(convert.load_workflow(WF / name), info, validate=True)
    convert.apply_overrides(prompt, server.workflow_overrides.get(name, {}), info)
    for entry in prompt.values():
        if entry["class_type"] == "EmptyLatentImage":
            entry["inputs"].update(width=64, height=64, batch_size=1)
        if entry["class_type"] == "KSampler":
            entry["inputs"]["steps"] = steps
    convert.apply_overrides(prompt, extra or {}, info)
    return prompt


def node_output(result, prompt, class_type, title=None):
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type
           and (title is None or v.get("_meta", {}).get("title") == title)]
    assert ids, f"no {class_type} node"
    return result.outputs[ids[0]]


def saved_pixels(result):
    pngs = [p for p in result.files if "atelier_style" in p.name]
    assert len(pngs) == 1, result.files
    return np.asarray(Image.open(pngs[0]), dtype=np.float32)


def test_unclip_workflow_retrieves_previews_and_conditions(comfy_server):
    prompt = prompt_for(comfy_server, "style_retrieval_unclip.json")
    result = comfy_server.run_api(prompt, timeout=900)
    report = node_output(result, prompt, "PreviewAny", "Retrieval report")["text"][0]
    assert "19 neighbour(s)" in report and "tiny_wikiart_1024" in report
    assert len(node_output(result, prompt, "PreviewImage")["images"]) == 19
    with_images = saved_pixels(result)
    assert np.isfinite(with_images).all()

    # strength 0 leaves the conditioning as it was: the sampled image changes, so the embeddings reached the UNet
    prompt0 = prompt_for(comfy_server, "style_retrieval_unclip.json", {"AtelierNeighborsToUnCLIP.strength": 0.0})
    without = saved_pixels(comfy_server.run_api(prompt0, timeout=900))
    assert np.abs(with_images - without).mean() > 0.5


def test_sd15_workflow_uses_neighbours_in_the_prompt(comfy_server):
    prompt = prompt_for(comfy_server, "style_retrieval_sd15.json",
                        {"AtelierStyleRetriever.style": "ukiyo", "AtelierStyleRetriever.k": 5})
    result = comfy_server.run_api(prompt, timeout=900)
    report = node_output(result, prompt, "PreviewAny", "Retrieval report")["text"][0]
    rows = [ln for ln in report.splitlines() if ln.strip()[:2].strip().rstrip(".").isdigit()]
    assert len(rows) == 5 and all("Ukiyo E" in ln for ln in rows)
    assert "filters: style~'ukiyo'" in report
    assert len(node_output(result, prompt, "PreviewImage")["images"]) == 5


def test_build_workflow_writes_a_loadable_database(comfy_server):
    result = comfy_server.run_workflow(WF / "style_db_build.json",
                                       overrides=comfy_server.workflow_overrides["style_db_build.json"], timeout=900)
    texts = [t for out in result.outputs.values() for t in out.get("text", [])]
    assert any("built 24 images" in t for t in texts), texts
    root = pathlib.Path(comfy_server.base_dir) / "models" / "atelier_style_db"
    manifest = root / "host_built_db" / "manifest.json"
    assert json.loads(manifest.read_text())["count"] == 24
    # a database being written (common.files.atomic_folder's temporary name) and an unfinished build are not offered
    unfinished = [root / ".host_next_db.k2j4.tmp", root / "host_next_db.partial"]
    for folder in unfinished:
        folder.mkdir(exist_ok=True)
        (folder / "manifest.json").write_text(manifest.read_text())
    try:
        choices = comfy_server.object_info(refresh=True)["AtelierStyleDBLoad"]["input"]["required"]["db_name"][0]
    finally:
        for folder in unfinished:
            shutil.rmtree(folder)
    assert "host_built_db/manifest.json" in choices
    assert not [c for c in choices if "host_next_db" in c], choices


def test_unclip_node_refuses_a_non_unclip_model(comfy_server):
    prompt = prompt_for(comfy_server, "style_retrieval_unclip.json",
                        {"CheckpointLoaderSimple.ckpt_name": "tiny_sd15.safetensors"})
    with pytest.raises(RunError, match="not an unCLIP model") as err:
        comfy_server.run_api(prompt, timeout=900)
    assert err.value.node_type == "AtelierNeighborsToUnCLIP"


def test_unclip_node_refuses_mismatched_embedding_size(comfy_server):
    prompt = prompt_for(comfy_server, "style_retrieval_unclip.json",
                        {"AtelierOpenCLIPLoader.weights": "Atelier-Tiny-ViT.safetensors",
                         "AtelierStyleDBLoad.db_name": "tiny_wikiart_64/manifest.json"})
    with pytest.raises(RunError, match="expects 1024-d CLIP image embeddings but the neighbours are 64-d"):
        comfy_server.run_api(prompt, timeout=900)


def test_retriever_refuses_a_database_of_another_embedder(comfy_server):
    prompt = prompt_for(comfy_server, "style_retrieval_sd15.json",
                        {"AtelierStyleDBLoad.db_name": "tiny_wikiart_1024/manifest.json"})
    with pytest.raises(RunError, match="was built with open_clip Atelier-Tiny-ViT-H") as err:
        comfy_server.run_api(prompt, timeout=900)
    assert err.value.node_type == "AtelierStyleRetriever"
