"""The SwinIR Upscale job (``upscale.pipeline.upscale_image``) on plain torch: layout, alpha, greyscale,
output scale, model device/dtype restore, out-of-memory backoff; then the node over it with the few ``comfy``
functions the host seam calls stubbed (the host test runs it inside a real ComfyUI)."""
import sys
import types

import pytest
import torch

from atelier.upscale.channels import luma
from atelier.upscale.pipeline import Resources, UpscaleOptions, upscale_image
from atelier.upscale.resize import resize
from atelier.upscale.tiled import upscale_tiled
from atelier.tests.fixtures.progress import RecordingProgress
from atelier.tests.fixtures.tiny_swinir import tiny_swinir


class Bar:
    instances = []

    def __init__(self, total, node_id=None):
        self.total, self.values = total, []
        Bar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        self.values.append((value, total))


@pytest.fixture()
def comfy(monkeypatch):
    mm = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"), intermediate_device=lambda: torch.device("cpu"),
        module_size=lambda m: sum(p.nbytes for p in m.state_dict().values()),
        OOM_EXCEPTION=torch.OutOfMemoryError, soft_empty_cache=lambda force=False: None,
        throw_exception_if_processing_interrupted=lambda: None, freed=[],
    )
    mm.free_memory = lambda memory, device, **kw: mm.freed.append(memory)
    pkg = types.ModuleType("comfy")
    pkg.model_management = mm
    pkg.utils = types.SimpleNamespace(ProgressBar=Bar)
    monkeypatch.setitem(sys.modules, "comfy", pkg)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", pkg.utils)
    Bar.instances.clear()
    return mm


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_swinir()


@pytest.fixture(scope="module")
def node(pack):
    from atelier.nodes.upscale import AtelierSwinIRUpscale

    return AtelierSwinIRUpscale()


OPTIONS = dict(tile_size=32, overlap=16, tile_batch=2, output_scale=0.0, resize_method="lanczos")


def run(model, img, resources=None, progress=None, **kw):
    """(image, report) of the core call with the tests' small tiles."""
    options = UpscaleOptions(**dict(OPTIONS, **kw))
    return upscale_image(model, img, options, resources, progress or RecordingProgress())


def bhwc(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_schema_and_mapping(pack):
    assert "AtelierSwinIRUpscale" in pack.NODE_CLASS_MAPPINGS
    from atelier.nodes.upscale import AtelierSwinIRUpscale as N

    spec = N.INPUT_TYPES()["required"]
    assert spec["upscale_model"][0] == "UPSCALE_MODEL" and spec["image"][0] == "IMAGE"
    assert all("tooltip" in v[1] for v in spec.values())
    assert N.RETURN_TYPES == ("IMAGE", "STRING") and len(N.OUTPUT_TOOLTIPS) == 2


def test_rgb_native_scale_matches_core(model):
    img = bhwc(2, 40, 56, 3)
    before = img.clone()
    freed, progress = [], RecordingProgress()
    resources = Resources(free_memory=lambda nbytes, device: freed.append((nbytes, device)))
    out, report = run(model, img, resources, progress)
    ref = upscale_tiled(model, img.movedim(-1, 1), tile=32, overlap=16, tile_batch=2).clamp(0, 1)
    assert out.shape == (2, 80, 112, 3)
    torch.testing.assert_close(out, ref.movedim(1, -1), atol=0, rtol=0)
    assert report.startswith("SwinIR x2 -> 112x80") and "WARNING" not in report
    weights = sum(t.nbytes for t in model.model.state_dict().values())
    assert len(freed) == 1 and freed[0][0] > weights and freed[0][1] == "cpu"
    assert progress.updates[-1] == (2 * 2 * 3, 2 * 2 * 3)
    assert torch.equal(img, before) and img.shape == (2, 40, 56, 3)  # input untouched


def test_node_runs_the_core_through_the_host(comfy, node, model):
    img = bhwc(2, 40, 56, 3)
    out = node.upscale(model, img, **OPTIONS)
    result, text = out["result"]
    core, report = run(model, img)
    torch.testing.assert_close(result, core, atol=0, rtol=0)
    assert text == report == out["ui"]["text"][0]
    assert comfy.freed and comfy.freed[0] > comfy.module_size(model.model)
    assert Bar.instances[-1].values[-1] == (2 * 2 * 3, 2 * 2 * 3)


def test_model_device_and_dtype_restored(model):
    model.model.to(torch.float64)
    try:
        run(model, bhwc(1, 20, 20, 3))
        assert next(model.model.parameters()).dtype == torch.float64
    finally:
        model.model.to(torch.float32)


def test_output_scale_resizes_after_model(model):
    img = bhwc(1, 24, 40, 3, seed=1)
    native, _ = run(model, img)
    half, _ = run(model, img, output_scale=1.0, resize_method="area")
    assert half.shape == (1, 24, 40, 3)
    expected = resize(native.movedim(-1, 1), 24, 40, "area").clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(half, expected)
    odd, _ = run(model, img, output_scale=1.5, resize_method="bicubic")
    assert odd.shape == (1, 36, 60, 3)


def test_rgba_alpha_is_resized_separately(model):
    img = bhwc(1, 24, 32, 4, seed=2)
    out, report = run(model, img, resize_method="bicubic")
    rgb, _ = run(model, img[..., :3].contiguous(), resize_method="bicubic")
    assert out.shape == (1, 48, 64, 4)
    torch.testing.assert_close(out[..., :3], rgb)
    alpha = resize(img[..., 3:].movedim(-1, 1), 48, 64, "bicubic").clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out[..., 3:], alpha)
    assert "alpha resized separately" in report


def test_greyscale_stays_greyscale(model):
    grey = bhwc(1, 24, 24, 1, seed=3)
    out, report = run(model, grey)
    assert out.shape == (1, 48, 48, 1)
    rgb, _ = run(model, grey.expand(-1, -1, -1, 3).contiguous())
    torch.testing.assert_close(out, luma(rgb.movedim(-1, 1)).movedim(1, -1))
    assert "greyscale" in report


def test_non_swinir_model_runs_with_a_warning(caplog):
    from spandrel import ModelLoader
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    compact = ModelLoader().load_from_state_dict(
        Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict()).eval()
    with caplog.at_level("WARNING"):
        out, report = run(compact, bhwc(1, 20, 20, 3))
    assert out.shape == (1, 40, 40, 3)
    assert "WARNING: Model is RealESRGAN Compact, not SwinIR" in report
    assert any("not SwinIR" in r.getMessage() for r in caplog.records)


def test_tile_rounded_to_window_and_reported(model):
    _, report = run(model, bhwc(1, 40, 40, 3), tile_size=30, overlap=8)
    assert "tile 30 -> 24" in report


def test_oom_from_comfy_exception_type_halves_the_tile(comfy, node):
    class FakeOOM(Exception):
        pass

    comfy.OOM_EXCEPTION = FakeOOM
    emptied = []
    comfy.soft_empty_cache = lambda force=False: emptied.append(1)
    m = tiny_swinir()
    real = m._call_fn

    def limited(net, x):
        if max(x.shape[-2:]) > 64:
            raise FakeOOM("out of memory (simulated)")
        return real(net, x)

    m._call_fn = limited
    out, report, _ = node_run(node, m, bhwc(1, 72, 128, 3), tile_size=128, overlap=16, tile_batch=1)
    assert out.shape == (1, 144, 256, 3)
    assert "of 64px" in report and "1 out-of-memory retries" in report and emptied == [1]
    assert next(m.model.parameters()).device.type == "cpu"


def node_run(node, model, img, **kw):
    out = node.upscale(model, img, **dict(OPTIONS, **kw))
    return out["result"][0], out["result"][1], out["ui"]["text"][0]


def test_not_an_image_model_is_refused(model):
    with pytest.raises(ValueError, match="single-image model from 'Load Upscale Model'"):
        run(model.model, bhwc(1, 16, 16, 3))
