"""Metric nodes in a real ComfyUI: what they report, and the errors users get, on small API prompts (no
sampling). tests/host/prepare_metrics.py writes the files; test_host_layer.py runs the comparison workflows.
"""
import numpy as np
import pytest

from atelier.runner.run import RunError

pytestmark = pytest.mark.host


def empty(color, n=2):
    return {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": n, "color": color}}


INCEPTION = {"inception": "weights-inception-2015-12-05-6726825d.pth", "features": "64", "resize": "tf-bilinear"}


def test_alpha_fid_node_reports_both_arms_against_reference_folders(comfy_server):
    prompt = {"1": empty(0x204080), "2": empty(0x808000),
              "3": {"class_type": "AtelierAlphaFID", "inputs": {"images": ["1", 0], "baseline_images": ["2", 0],
                                                                "reference_1": "dragons", "reference_2": "fish",
                                                                **INCEPTION}}}
    result = comfy_server.run_api(prompt, timeout=600)
    text = result.outputs["3"]["text"][0]
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("images", "baseline"))]
    assert [r[0] for r in rows] == ["images", "baseline"] and all(r[-1] == "2" for r in rows)
    for r in rows:  # α-FID from the row's own x and y (eq. 6)
        alpha, x, y = map(float, r[1:4])
        assert alpha == pytest.approx(np.sqrt((x * x + y * y + (x - y) ** 2) / 2), abs=2e-3)
    assert "dragons (5 images)" in text and "fish (4 images)" in text and "few images" in text


def test_fid_node_refuses_statistics_of_another_dimension(comfy_server, tmp_path):
    ref = tmp_path / "ref2048.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    prompt = {"1": empty(0x204080), "2": {"class_type": "AtelierFID", "inputs": {"images": ["1", 0],
                                                                                "reference": str(ref), **INCEPTION}}}
    with pytest.raises(RunError, match="2048-d features but the feature extractor gives 64-d") as err:
        comfy_server.run_api(prompt, timeout=600)
    assert err.value.node_type == "AtelierFID"


def test_fid_node_names_a_missing_reference(comfy_server):
    prompt = {"1": empty(0), "2": {"class_type": "AtelierFID", "inputs": {"images": ["1", 0],
                                                                         "reference": "no_such_set", **INCEPTION}}}
    with pytest.raises(RunError, match="'no_such_set' is not in models/atelier_fid"):
        comfy_server.run_api(prompt, timeout=600)


def test_style_score_refuses_a_classifier_of_another_clip(comfy_server):
    prompt = {
        "1": {"class_type": "AtelierOpenCLIPLoader", "inputs": {"weights": "Atelier-Tiny-ViT.safetensors",
                                                               "architecture": "auto from file name", "device": "cpu"}},
        "2": {"class_type": "AtelierStyleClassifierLoad", "inputs": {"classifier": "tiny_styles.safetensors"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0}},
        "4": {"class_type": "AtelierStyleScore", "inputs": {"classifier": ["2", 0], "clip": ["1", 0], "images": ["3", 0],
                                                           "top_k": 2, "target_style": ""}},
    }
    with pytest.raises(RunError, match="trained on open_clip Atelier-Tiny-ViT features .* but the loaded CLIP"):
        comfy_server.run_api(prompt, timeout=300)
