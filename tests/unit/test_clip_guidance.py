"""CLIP guidance core (samplers/clip_guidance.py): losses by hand, cutouts, schedule, and guided sampling
with a tiny random open_clip, a toy decoder and the analytic Gaussian denoiser, all built inside
``torch.inference_mode()`` as ComfyUI builds its models."""
import math

import pytest
import torch

from atelier.samplers import clip_guidance as cg
from atelier.tests.fixtures.clip_guidance_toys import (
    TinyClip, ToyDecoder, gaussian_denoiser, karras_sigmas, sample_euler,
)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def comfy_like():
    """Models created under inference mode, like ComfyUI's loaders do."""
    with torch.inference_mode():
        clip = TinyClip()
        decoder = ToyDecoder()
        text = clip.encode_text(["a red barn", "an oil painting of the sea"])
    return clip, decoder, text


def _guidance(clip, decoder, target, sigmas, seed=0, **knobs):
    opts = dict(cutn=8, cut_batches=2)
    opts.update(knobs)
    return cg.CLIPGuidance(cg.make_pixel_embedder(clip), clip.image_size, cg.build_targets(target, [1.0] * len(target)),
                           cg.grad_ready_copy(decoder), cg.GuidanceOptions(**opts), sigmas=sigmas, seed=seed)


def _sample(guidance, x_T, sigmas):
    with torch.inference_mode():  # the sampler runs in inference mode, as in ComfyUI
        return sample_euler(cg.make_guided_denoiser(gaussian_denoiser(), guidance), x_T * sigmas[0], sigmas)


# ---------------------------------------------------------------------------------------- targets
def test_parse_weighted_prompts_lines_bars_and_weights():
    text = "a red barn:2\n oil painting | style: baroque \n\n  sea:-0.5 |"
    assert cg.parse_weighted_prompts(text) == [
        ("a red barn", 2.0), ("oil painting", 1.0), ("style: baroque", 1.0), ("sea", -0.5)]
    assert cg.parse_weighted_prompts(" \n | ") == []


def test_build_targets_normalises_weights_and_splits_image_weight():
    text = torch.eye(4)[:2] * 3
    images = torch.eye(4)[2:]
    t = cg.build_targets(text, [3.0, 1.0], images, image_weight=2.0)
    assert torch.allclose(t.embeddings, torch.eye(4))  # rows L2-normalised
    assert torch.allclose(t.weights, torch.tensor([3.0, 1.0, 1.0, 1.0]) / 6.0)


def test_build_targets_refuses_empty_and_cancelling_lists():
    with pytest.raises(ValueError, match="no target"):
        cg.build_targets(None, [])
    with pytest.raises(ValueError, match="sum to zero"):
        cg.build_targets(torch.eye(3)[:2], [1.0, -1.0])


# ---------------------------------------------------------------------------------------- losses by hand
def test_spherical_distance_hand_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [5.0, 0.0]])
    d = cg.spherical_distance(a, b)
    # orthogonal: |a-b| = sqrt 2 -> 2 asin(sqrt2/2)^2 = pi^2/8; opposite: 2 (pi/2)^2; equal: 0
    assert torch.allclose(d, torch.tensor([math.pi ** 2 / 8, math.pi ** 2 / 2, 0.0]), atol=1e-6)


def test_cos_spherical_distance_hand_value():
    d = cg.cos_spherical_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(d, torch.tensor([math.pi ** 2 / 8 + 0.5 * math.exp(2.0)]), atol=1e-5)


def test_clip_loss_weights_targets_and_averages_cuts():
    # 2 cuts x batch 1; targets e0 (w 3) and e1 (w 1) -> weights .75/.25
    targets = cg.build_targets(torch.eye(2), [3.0, 1.0])
    cuts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = cg.clip_loss(cuts, targets, batch=1)
    q = math.pi ** 2 / 8  # orthogonal distance
    expected = ((0.75 * 0 + 0.25 * q) + (0.75 * q + 0.25 * 0)) / 2
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_keeps_samples_apart():
    targets = cg.build_targets(torch.eye(2)[:1], [1.0])
    # rows are cut-major: cut0/sample0, cut0/sample1, cut1/sample0, cut1/sample1
    cuts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    loss = cg.clip_loss(cuts, targets, batch=2)
    assert torch.allclose(loss, torch.tensor([0.0, (math.pi ** 2 / 8 + math.pi ** 2 / 2) / 2]), atol=1e-6)


def test_tv_loss_hand_value():
    img = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # replicate-padded: dx = [[1,0],[2,0]], dy = [[2,3],[0,0]] -> (1+4+4+9)/4
    assert cg.tv_loss(img).item() == pytest.approx(18 / 4)
    assert cg.tv_loss(torch.full((2, 3, 5, 5), 0.3)).tolist() == [0.0, 0.0]


def test_range_and_saturation_hand_values():
    img = torch.tensor([[[[-2.0, 0.0], [0.5, 3.0]]]])
    assert cg.range_loss(img).item() == pytest.approx((1 + 4) / 4)
    assert cg.saturation_loss(img).item() == pytest.approx((1 + 2) / 4)


def test_clamp_grad_bounds_rms_per_sample():
    g = torch.stack([torch.full((4, 2, 2), 2.0), torch.full((4, 2, 2), 0.1)])
    out = cg.clamp_grad(g, 0.5)
    rms = out.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.tensor([0.5, 0.1]))
    assert torch.equal(out[1], g[1])
    assert torch.equal(cg.clamp_grad(g, 0.0), g)


# ---------------------------------------------------------------------------------------- cutouts
def test_cutout_shapes_counts_and_order():
    torch.manual_seed(0)
    px = torch.rand(1, 3, 40, 48)
    pixels = torch.cat([px, 1 - px])  # sample 1 is the negative of sample 0
    gen = torch.Generator().manual_seed(3)
    cuts = cg.make_cutouts(pixels, 16, 5, generator=gen)
    assert cuts.shape == (10, 3, 16, 16)
    pairs = cuts.view(5, 2, 3, 16, 16)  # cut-major
    assert torch.allclose(pairs[:, 1], 1 - pairs[:, 0], atol=1e-6)  # same box for every sample
    aug = cg.make_cutouts(pixels, 16, 7, generator=gen, augment=True)
    assert aug.shape == (14, 3, 16, 16)


def test_cutouts_are_seeded():
    pixels = torch.rand(2, 3, 32, 32)
    a = cg.make_cutouts(pixels, 8, 6, generator=torch.Generator().manual_seed(1), augment=True)
    b = cg.make_cutouts(pixels, 8, 6, generator=torch.Generator().manual_seed(1), augment=True)
    c = cg.make_cutouts(pixels, 8, 6, generator=torch.Generator().manual_seed(2), augment=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cutouts_of_an_image_smaller_than_the_cut_are_upsampled():
    cuts = cg.make_cutouts(torch.rand(1, 3, 8, 8), 32, 3, generator=torch.Generator().manual_seed(0))
    assert cuts.shape == (3, 3, 32, 32)


def test_cut_pow_favours_small_cuts():
    # a ramp image: a full-size cut averages to about .5 across x; small cuts spread more around it
    ramp = torch.linspace(0, 1, 96).view(1, 1, 1, 96).expand(1, 3, 96, 96).contiguous()

    def spread(cut_pow):
        cuts = cg.make_cutouts(ramp, 8, 80, cut_pow, torch.Generator().manual_seed(0))
        return (cuts[:, 0, :, -1] - cuts[:, 0, :, 0]).mean().item()  # horizontal extent seen by a cut

    assert spread(4.0) < spread(1.0) < spread(0.25)


def test_cutn_zero_is_refused():
    with pytest.raises(ValueError, match="cutn"):
        cg.make_cutouts(torch.rand(1, 3, 8, 8), 8, 0)
    with pytest.raises(ValueError, match="cutn"):
        cg.GuidanceOptions(cutn=0).validate()


@pytest.mark.parametrize("knobs, word", [
    ({"loss_fn": "l2"}, "loss_fn"), ({"schedule": "steps"}, "schedule"), ({"cut_batches": 0}, "cut_batches"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "swap"), ({"clamp_max": -1}, "clamp_max"),
    ({"tv_scale": -1.0}, "tv_scale"), ({"cut_pow": 0}, "cut_pow"),
])
def test_bad_options_are_named(knobs, word):
    with pytest.raises(ValueError, match=word):
        cg.GuidanceOptions(**knobs).validate()


# ---------------------------------------------------------------------------------------- schedule
def test_schedule_steps_and_shapes():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    sch = cg.GuidanceSchedule(sigmas, 0.25, 0.75)
    assert [sch.step_index(s)[0] for s in (10.0, 7.0, 5.0, 2.0, 1.5, 1.0)] == [0, 0, 1, 2, 2, 3]
    assert [sch.weight(s) for s in (10.0, 5.0, 2.0, 1.0)] == [0.0, 1.0, 1.0, 0.0]
    lin = cg.GuidanceSchedule(sigmas, 0.0, 1.0, "linear")
    assert [lin.weight(s) for s in (10.0, 5.0, 2.0, 1.0)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    cos = cg.GuidanceSchedule(sigmas, 0.0, 1.0, "cosine")
    assert cos.weight(2.0) == pytest.approx(math.cos(math.pi / 4))
    assert cg.GuidanceSchedule(sigmas, 0.0, 1.0).weight(1.0) == 1.0  # end 1 includes the last step


# ---------------------------------------------------------------------------------------- embedder / copies
def test_inference_mode_clip_gets_a_grad_ready_tower(comfy_like):
    clip, _, _ = comfy_like
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode(False):
        with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
            torch.autograd.grad(clip.embed_pixels(x.clone().requires_grad_()).sum(), [x])
    embed = cg.make_pixel_embedder(clip)
    assert embed is not clip.embed_pixels
    with torch.no_grad():
        assert torch.allclose(embed(x), clip.embed_pixels(x), atol=1e-5)
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(embed(leaf).sum(), [leaf])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_normal_clip_uses_the_contract_method():
    clip = TinyClip()
    assert cg.make_pixel_embedder(clip) == clip.embed_pixels


def test_grad_ready_copy_can_skip_submodules():
    with torch.inference_mode():
        ae = torch.nn.Module()
        ae.encoder = torch.nn.Linear(3, 3)
        ae.decoder = torch.nn.Linear(3, 3)
    dup = cg.grad_ready_copy(ae, skip=["encoder"])
    assert dup.encoder is None and ae.encoder is not None
    assert not dup.decoder.weight.is_inference() and not dup.decoder.weight.requires_grad
    assert torch.equal(dup.decoder.weight, ae.decoder.weight)


# ---------------------------------------------------------------------------------------- guided sampling
def test_scale_zero_reproduces_the_unguided_sampler_exactly(comfy_like):
    clip, decoder, text = comfy_like
    sigmas = karras_sigmas(6)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = sample_euler(gaussian_denoiser(), x_T * sigmas[0], sigmas)
    off = _guidance(clip, decoder, text[:1], sigmas, clip_scale=0.0)
    assert torch.equal(_sample(off, x_T, sigmas), plain)
    outside = _guidance(clip, decoder, text[:1], sigmas, start_percent=1.0, end_percent=1.0)
    assert torch.equal(_sample(outside, x_T, sigmas), plain)


@pytest.mark.parametrize("target", [0, 1])
def test_guided_samples_end_closer_to_the_target(comfy_like, target):
    clip, decoder, text = comfy_like
    sigmas = karras_sigmas(5)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(target))
    goal = text[target:target + 1]
    plain_dec = cg.grad_ready_copy(decoder)

    def distance(latent):
        with torch.no_grad():
            return cg.spherical_distance(clip.encode_image(((plain_dec(latent) + 1) / 2).clamp(0, 1)), goal[0])

    small = dict(cutn=4, cut_batches=1)  # the article's defaults otherwise (scales, clamp 0.05, augmentations)
    unguided = distance(_sample(_guidance(clip, decoder, goal, sigmas, clip_scale=0.0, **small), x_T, sigmas))
    guided = distance(_sample(_guidance(clip, decoder, goal, sigmas, **small), x_T, sigmas))
    assert (guided < unguided - 0.005).all(), (guided, unguided)


def test_targets_built_in_inference_mode_work(comfy_like):
    clip, decoder, text = comfy_like
    with torch.inference_mode():  # the nodes embed the targets while ComfyUI runs them
        targets = cg.build_targets(text, [1.0, 0.5])
    g = cg.CLIPGuidance(cg.make_pixel_embedder(clip), 32, targets, cg.grad_ready_copy(decoder),
                        cg.GuidanceOptions(cutn=2, cut_batches=1))
    with torch.inference_mode():
        grad, _ = g.loss_grad(torch.randn(1, 4, 8, 8))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_guidance_is_seeded_and_does_not_touch_its_input(comfy_like):
    clip, decoder, text = comfy_like
    sigmas = karras_sigmas(3)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    knobs = dict(clamp_max=0.0, cutn=2, cut_batches=1)
    a = _sample(_guidance(clip, decoder, text[:1], sigmas, seed=1, **knobs), x_T, sigmas)
    b = _sample(_guidance(clip, decoder, text[:1], sigmas, seed=1, **knobs), x_T, sigmas)
    c = _sample(_guidance(clip, decoder, text[:1], sigmas, seed=2, **knobs), x_T, sigmas)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = _guidance(clip, decoder, text[:1], sigmas)
    with torch.inference_mode():
        d = torch.randn(1, 4, 8, 8)
        before = d.clone()
        out = g(d, torch.tensor([2.0]))
    assert torch.equal(d, before) and not torch.equal(out, d)


def test_gradients_are_finite_and_checkpointing_matches(comfy_like):
    clip, decoder, text = comfy_like
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        g = _guidance(clip, decoder, text, None, seed=4, decoder_checkpoint=ckpt, saturation_scale=10.0)
        with torch.inference_mode():
            grad, terms = g.loss_grad(x0)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert all(math.isfinite(v) for v in terms.values()) and terms["clip"] > 0 and terms["tv"] > 0
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_range_gradient_through_a_linear_decoder_by_hand():
    # decoder: pixels = 2 * latent[:, :3]; range loss mean((p - clamp p)^2) over N pixels, scale r
    # dL/dlatent = r * 2 * 2 (p - clamp p) / N on the first 3 channels, 0 on the 4th
    latent = torch.tensor([0.1, 0.7, -0.9, 0.2]).view(1, 4, 1, 1).repeat(1, 1, 2, 2)
    opts = cg.GuidanceOptions(clip_scale=0.0, tv_scale=0.0, range_scale=3.0, scale_multiplier=1.0)
    g = cg.CLIPGuidance(lambda p: p, 8, cg.build_targets(torch.eye(2)[:1], [1.0]), lambda z: 2 * z[:, :3], opts)
    grad, terms = g.loss_grad(latent)
    p = 2 * latent[:, :3]
    n = p.numel()
    expected = torch.cat([3.0 * 2 * 2 * (p - p.clamp(-1, 1)) / n, torch.zeros(1, 1, 2, 2)], dim=1)
    assert torch.allclose(grad, expected, atol=1e-7)
    assert terms["range"] == pytest.approx(((p - p.clamp(-1, 1)) ** 2).mean().item())


def test_no_weight_gradients_accumulate():
    clip = TinyClip(seed=3)  # normal tensors, requires_grad=True: the embed_pixels path
    decoder = ToyDecoder(seed=4)
    params = list(clip.model.parameters()) + list(decoder.parameters())
    assert all(p.requires_grad for p in params)
    g = cg.CLIPGuidance(cg.make_pixel_embedder(clip), 32, cg.build_targets(clip.encode_text(["a barn"]), [1.0]),
                        decoder, cg.GuidanceOptions(cutn=4, cut_batches=2), sigmas=None, seed=0)
    with torch.inference_mode():
        out = g(torch.randn(1, 4, 8, 8), 3.0)
    assert torch.isfinite(out).all()
    assert all(p.grad is None for p in params)


def test_non_finite_gradient_is_reported(comfy_like):
    clip, _, text = comfy_like
    g = cg.CLIPGuidance(cg.make_pixel_embedder(clip), 32, cg.build_targets(text[:1], [1.0]),
                        lambda z: (z[:, :3] * float("nan")).repeat(1, 1, 4, 4),
                        cg.GuidanceOptions(cutn=2, cut_batches=1))
    with pytest.raises(FloatingPointError, match="NaN/inf pixels"):
        g.loss_grad(torch.randn(1, 4, 8, 8))
