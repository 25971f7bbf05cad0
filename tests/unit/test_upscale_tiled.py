"""Tiled inference core (``upscale/tiled.py``) against untiled runs of a tiny real SwinIR descriptor.

The model (``tests/fixtures/tiny_swinir.py``) is spandrel's SwinIR class with a tiny config and sharpened random
weights, loaded back through ``ModelLoader`` so it is a real descriptor whose tile-edge influence reaches
~26 px (default init would fade within ~12 px and make tiled == untiled nearly trivially true).
"""
import pytest
import torch
from atelier.tests.fixtures.progress import Interrupted, RecordingProgress
from atelier.tests.fixtures.tiny_swinir import tiny_swinir
from atelier.tests.fixtures.training_toys import torch_threads
from atelier.upscale.tiled import (
    TileOOMError,
    TileReport,
    blend_weights,
    plan_axis,
    receptive_radius,
    requirements_of,
    upscale_tiled,
)


def psnr(a, b, peak=1.0):
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is much faster than several fighting for a few cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_swinir()


def image(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g)


def eligible(intervals, scale, radius, length):
    """Output pixels (1-D) where every tile with non-zero blend weight is > radius from its inner edges."""
    weights = blend_weights(intervals, scale, 0.5)
    ok = torch.ones(length * scale, dtype=torch.bool)
    for (s, e), w in zip(intervals, weights):
        x = torch.arange(s * scale, e * scale) + 0.5
        dist = torch.full_like(x, float("inf"))
        if s > 0:
            dist = torch.minimum(dist, x - s * scale)
        if e < length:
            dist = torch.minimum(dist, e * scale - x)
        ok[s * scale:e * scale] &= ~((w > 0) & (dist <= radius * scale))
    return ok


def test_tiny_model_is_a_real_swinir_descriptor(model):
    assert type(model).__name__ == "ImageModelDescriptor"
    assert model.architecture.id == "SwinIR" and model.scale == 2
    req = requirements_of(model)
    assert req.window == 8 and req.align == 8 and req.smallest_tile == 16
    # 2 groups x 2 blocks x (window - 1) + one conv per group + 4 outer convs
    assert receptive_radius(model) == 2 * 2 * 7 + 2 + 4


def test_tiled_equals_untiled_psnr_and_exact_away_from_tile_borders(model):
    x = image(1, 3, 136, 200)
    ref = model(x)
    out = upscale_tiled(model, x, tile=96, overlap=32)
    assert out.shape == ref.shape == (1, 3, 272, 400)
    saturated = ((ref == 0) | (ref == 1)).float().mean().item()
    assert saturated < 0.01  # the descriptor clamps; a saturated output would make equality trivial
    assert psnr(out, ref) >= 45.0
    R = receptive_radius(model)
    rows, cols = plan_axis(136, 96, 32, 8), plan_axis(200, 96, 32, 8)
    mask = eligible(rows, 2, R, 136)[:, None] & eligible(cols, 2, R, 200)[None, :]
    assert mask.float().mean() > 0.3
    err = (out - ref).abs()[0].amax(0)
    assert err[mask].max() < 1e-5
    # near the seams it is *not* exact (so the exactness above is not vacuous)
    assert err[~mask].max() > 1e-4


def test_overlap_wider_than_receptive_field_is_exact_everywhere(model):
    x = image(1, 3, 64, 200, seed=2)
    ref = model(x)
    R = receptive_radius(model)
    # band 0.1 * 80 = 8 px centred in an 80 px overlap: 36 px margins > R = 34
    out = upscale_tiled(model, x, tile=112, overlap=80, feather=0.1)
    assert len(plan_axis(200, 112, 80, 8)) > 2 and (80 - 8) / 2 > R
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_feathering_beats_hard_cut_at_tile_edge(model):
    """Cross-fading from the very tile edge (feather=1, like a plain ramp) lets the worst pixels in."""
    x = image(1, 3, 64, 176, seed=3)
    ref = model(x)
    centred = psnr(upscale_tiled(model, x, tile=64, overlap=32, feather=0.5), ref)
    edge = psnr(upscale_tiled(model, x, tile=64, overlap=32, feather=1.0), ref)
    assert centred > edge + 3.0


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (1, 3, 61, 29)])
def test_odd_sizes(model, shape):
    x = image(*shape, seed=4)
    ref = model(x)
    out = upscale_tiled(model, x, tile=32, overlap=16)
    assert out.shape == ref.shape == (1, 3, shape[2] * 2, shape[3] * 2)
    assert psnr(out, ref) >= 45.0


@pytest.mark.parametrize("shape", [(1, 3, 13, 21), (1, 3, 5, 3), (1, 3, 1, 1)])
def test_smaller_than_a_tile_is_one_padded_call_equal_to_the_descriptor(model, shape):
    x = image(*shape, seed=5)
    rep = TileReport(0, 0, 0, (0, 0), 0, 0)
    out = upscale_tiled(model, x, tile=64, overlap=16, report=rep)
    assert rep.grid == (1, 1) and rep.model_calls == 1
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=0)


def test_one_by_one_grid_is_exact(model):
    x = image(1, 3, 48, 64, seed=6)
    rep = TileReport(0, 0, 0, (0, 0), 0, 0)
    out = upscale_tiled(model, x, tile=64, overlap=16, report=rep)
    assert rep.grid == (1, 1)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=0)


def test_batch_of_images_and_batched_tiles(model):
    x = image(3, 3, 40, 72, seed=7)
    rep = TileReport(0, 0, 0, (0, 0), 0, 0)
    out = upscale_tiled(model, x, tile=32, overlap=16, tile_batch=4, report=rep)
    assert rep.tiles == 3 * rep.grid[0] * rep.grid[1]
    assert rep.model_calls < rep.tiles  # tiles really ran in batches
    for n in range(3):
        single = upscale_tiled(model, x[n:n + 1], tile=32, overlap=16, tile_batch=1)
        torch.testing.assert_close(out[n:n + 1], single, atol=1e-5, rtol=0)
        assert psnr(out[n:n + 1], model(x[n:n + 1])) >= 45.0


class FakeOOM(RuntimeError):
    pass


class Limited:
    """A callable wrapper that runs out of 'memory' above a tile edge or a batch size."""

    def __init__(self, model, max_edge, max_batch=64):
        self.model, self.max_edge, self.max_batch = model, max_edge, max_batch
        self.calls, self.failures = [], 0

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        if max(x.shape[-2:]) > self.max_edge or x.shape[0] > self.max_batch:
            self.failures += 1
            raise FakeOOM("CUDA out of memory (simulated)")
        return self.model(x)


def test_oom_halves_batch_then_tile_and_still_matches(model):
    x = image(1, 3, 80, 80, seed=8)
    limited = Limited(model, max_edge=40, max_batch=1)
    rep = TileReport(0, 0, 0, (0, 0), 0, 0)
    freed = []
    out = upscale_tiled(limited, x, tile=160, overlap=16, scale=2, requirements=requirements_of(model),
                        tile_batch=2, min_tile=16, oom_exceptions=(FakeOOM,), on_oom=lambda: freed.append(1),
                        report=rep)
    assert rep.tile == 40 and rep.tile_batch == 1
    assert rep.oom_retries == limited.failures == len(freed) == 3  # batch 2->1, tile 160->80->40
    assert psnr(out, model(x)) >= 45.0


def test_oom_below_floor_is_a_clear_error(model):
    x = image(1, 3, 64, 64, seed=9)
    limited = Limited(model, max_edge=8)
    with pytest.raises(TileOOMError, match=r"Out of memory even with 32x32 tiles \(floor 32\)"):
        upscale_tiled(limited, x, tile=64, overlap=8, scale=2, requirements=requirements_of(model),
                      min_tile=32, oom_exceptions=(FakeOOM,))


def test_other_errors_are_not_retried(model):
    def broken(x):
        raise KeyError("not memory")

    with pytest.raises(KeyError):
        upscale_tiled(broken, image(1, 3, 64, 64), tile=32, overlap=8, scale=2, oom_exceptions=(FakeOOM,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_refused_for_swinir(model, dtype):
    with pytest.raises(ValueError, match="float32"):
        upscale_tiled(model, image(1, 3, 32, 32), tile=32, overlap=8, dtype=dtype)


def test_bf16_does_not_match_fp32_for_swinir():
    """Why the refusal: spandrel allows bf16 for SwinIR, but its output is visibly off from fp32."""
    m = tiny_swinir()
    x = image(1, 3, 32, 32, seed=10)
    ref = m(x)
    m.model.to(torch.bfloat16)
    low = m(x.to(torch.bfloat16)).float()
    assert (low - ref).abs().max() > 1e-3


def test_tile_smaller_than_window_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"tile=8 is smaller than the model allows \(16 px: window 8"):
        upscale_tiled(model, image(1, 3, 64, 64), tile=8, overlap=0)


def test_overlap_not_smaller_than_tile_is_an_error(model):
    with pytest.raises(ValueError, match="overlap=64 must be"):
        upscale_tiled(model, image(1, 3, 100, 100), tile=64, overlap=64)


def test_progress_and_interrupt(model):
    x = image(2, 3, 48, 48, seed=11)
    seen = RecordingProgress()
    upscale_tiled(model, x, tile=32, overlap=16, tile_batch=3, progress=seen)
    total = seen.updates[-1][1]
    assert [d for d, _ in seen.updates] == sorted(d for d, _ in seen.updates) and seen.updates[-1][0] == total == 2 * 4
    stop = RecordingProgress(stop_at=3)
    with pytest.raises(Interrupted):
        upscale_tiled(lambda t: model(t), x, tile=32, overlap=16, scale=2, requirements=requirements_of(model),
                      progress=stop)
    assert stop.checks == 3 and len(stop.updates) == 2  # stopped before the third model call


def test_plain_callable_pointwise_model_is_exact_everywhere():
    """Nearest-neighbour x3 has no spatial context: any tiling reproduces it (bit for bit outside the
    cross-fade bands, where w*a + (1-w)*a may round by one ulp)."""
    def nearest3(t):
        return torch.nn.functional.interpolate(t, scale_factor=3, mode="nearest")

    x = image(2, 3, 45, 70, seed=12)
    out = upscale_tiled(nearest3, x, tile=20, overlap=6, scale=3, tile_batch=5)
    ref = nearest3(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert (out == ref).float().mean() > 0.5


def test_wrong_output_shape_and_channels_are_clear_errors(model):
    with pytest.raises(ValueError, match="expected scale x4"):
        upscale_tiled(lambda t: t, image(1, 3, 20, 20), tile=32, overlap=0, scale=4)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        upscale_tiled(model, image(1, 4, 20, 20), tile=32, overlap=0)


def test_masked_image_model_refused():
    from spandrel import MaskedImageModelDescriptor, SizeRequirements
    from spandrel.architectures.LaMa import LaMaArch

    inpaint = MaskedImageModelDescriptor(
        torch.nn.Identity(), {}, architecture=LaMaArch(), purpose="Inpainting", tags=[], supports_half=False,
        supports_bfloat16=False, input_channels=3, output_channels=3, size_requirements=SizeRequirements())
    with pytest.raises(TypeError, match="not a single-image model"):
        upscale_tiled(inpaint, image(1, 3, 20, 20), tile=32, overlap=0)


@pytest.mark.parametrize("length", [1, 7, 16, 33, 100, 257])
@pytest.mark.parametrize("tile, overlap, align", [(16, 0, 8), (32, 8, 8), (40, 24, 8), (24, 4, 1)])
def test_plan_and_weights_partition_unity(length, tile, overlap, align):
    intervals = plan_axis(length, tile, overlap, align)
    assert intervals[0][0] == 0 and intervals[-1][1] == length
    for s, e in intervals:
        assert s % align == 0 and 0 < e - s <= tile
    for (s0, e0), (s1, e1) in zip(intervals, intervals[1:]):
        assert s1 > s0 and e0 - s1 >= min(overlap, e0 - s0)
    for scale in (1, 3):
        weights = blend_weights(intervals, scale, 0.5)
        total = torch.zeros(length * scale)
        for (s, e), w in zip(intervals, weights):
            assert w.min() >= 0 and w.shape[0] == (e - s) * scale
            total[s * scale:e * scale] += w
        torch.testing.assert_close(total, torch.ones_like(total))


def test_precision_policy_for_other_architectures():
    """Non-SwinIR models follow their descriptor flags; SwinIR is refused even though spandrel allows bf16."""
    from atelier.upscale.tiled import check_precision
    from spandrel import ModelLoader
    from spandrel.architectures.Compact import Compact

    compact = ModelLoader().load_from_state_dict(
        Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict())
    assert compact.supports_half
    check_precision(compact, torch.float16)  # allowed
    compact.supports_half = False
    with pytest.raises(ValueError, match="does not support float16"):
        check_precision(compact, torch.float16)
    swinir = tiny_swinir()
    assert swinir.supports_bfloat16  # spandrel's flag ...
    with pytest.raises(ValueError, match="must run in float32"):  # ... overridden by the measured policy
        check_precision(swinir, torch.bfloat16)
