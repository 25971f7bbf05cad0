"""SwinIR upscale in a real ComfyUI: the example workflow runs with a tiny random SwinIR written where a
user would put the real one (models/upscale_models, under the article's file name, laid out like the official
release: a torch.save'd {"params_ema": state_dict}), loaded by the stock UpscaleModelLoader."""
import struct

import pytest

from atelier.upscale.tiled import plan_axis
from atelier.tests.fixtures.tiny_swinir import DEFAULT_FILE, write_tiny_swinir

pytestmark = pytest.mark.host


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def swinir_file(comfy_server):
    folder = comfy_server.base_dir / "models" / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DEFAULT_FILE
    if not path.exists():
        write_tiny_swinir(path, scale=4)
    comfy_server.object_info(refresh=True)
    return path


def test_swinir_workflow_runs(comfy_server, swinir_file, repo_root):
    result = comfy_server.run_workflow(
        repo_root / "workflows" / "swinir_upscale.json",
        overrides={"5.width": 64, "5.height": 48, "3.steps": 2, "11.tile_size": 32, "11.overlap": 16},
        timeout=900,
    )
    assert result.status == "success"
    pngs = [p for p in result.files if p.suffix == ".png"]
    assert pngs and all(png_size(p) == (256, 192) for p in pngs)  # x4 of 64x48
    text = result.outputs["11"]["text"][0]
    grid = f"{len(plan_axis(48, 32, 16, 8))}x{len(plan_axis(64, 32, 16, 8))}"
    assert text.startswith("SwinIR x4 -> 256x192") and f"tiles {grid} of 32px" in text


def test_output_scale_and_rgba_through_the_api(comfy_server, swinir_file):
    """x2 from the x4 model (lanczos afterwards), fed by a core node producing RGBA-free RGB: size only."""
    prompt = {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": DEFAULT_FILE}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 2, "color": 0x336699}},
        "3": {"class_type": "AtelierSwinIRUpscale", "inputs": {
            "upscale_model": ["1", 0], "image": ["2", 0], "tile_size": 512, "overlap": 64, "tile_batch": 1,
            "output_scale": 2.0, "resize_method": "lanczos"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "swinir_x2"}},
    }
    result = comfy_server.run_api(prompt, timeout=600)
    pngs = [p for p in result.files if p.suffix == ".png"]
    assert len(pngs) == 2 and all(png_size(p) == (80, 48) for p in pngs)
    assert "-> 80x48" in result.outputs["3"]["text"][0]


def test_pickle_with_code_is_refused_by_the_stock_loader(comfy_server, swinir_file, tmp_path):
    """ComfyUI's loader reads .pth with torch.load(weights_only=True): a code-carrying pickle fails cleanly."""
    import os

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'EXECUTED'}",))

    evil = swinir_file.parent / "evil_swinir.pth"
    torch.save({"params_ema": {"x": torch.zeros(1)}, "payload": Payload()}, evil)
    comfy_server.object_info(refresh=True)
    prompt = {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": evil.name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "3": {"class_type": "AtelierSwinIRUpscale", "inputs": {
            "upscale_model": ["1", 0], "image": ["2", 0], "tile_size": 512, "overlap": 64, "tile_batch": 1,
            "output_scale": 0.0, "resize_method": "lanczos"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "evil"}},
    }
    with pytest.raises(Exception, match="(?i)weights only load failed|UpscaleModelLoader"):
        comfy_server.run_api(prompt, timeout=300)
    assert not (tmp_path / "EXECUTED").exists()
