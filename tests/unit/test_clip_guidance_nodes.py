"""CLIP guidance without ComfyUI: the nodes' schemas, and what the nodes call in the core (input validation,
target building, the decoders from the host's files, the guider on a stand-in CFGGuider)."""
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from atelier.common.progress import Progress
from atelier.samplers import clip_guidance as cg
from atelier.tests.fixtures.clip_guidance_toys import TinyClip, ToyDecoder


@pytest.fixture(scope="module")
def mod(pack):
    from atelier.nodes import clip_guidance
    return clip_guidance


@pytest.fixture(scope="module")
def clip():
    with torch.inference_mode():
        return TinyClip()


@dataclass
class FakeNeighbors:  # the shape of ATELIER_NEIGHBORS (retrieval's neighbours)
    embeddings: torch.Tensor
    scores: list = field(default_factory=list)
    metadata: list = field(default_factory=list)
    embedder_name: str = "tiny-ViT"
    embedder_hash: str = "random"


KNOBS = dict(clip_scale=5000.0, tv_scale=100.0, range_scale=150.0, saturation_scale=0.0, scale_multiplier=50.0,
             cutn=16, cut_batches=4, cut_pow=1.0, clamp_max=0.05)


def test_schemas_have_tooltips_and_the_articles_defaults(mod):
    for cls in (mod.AtelierCLIPGuider, mod.AtelierCLIPGuidedKSampler):
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (kind, opts) in group.items():
                assert opts.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
                if isinstance(kind, list):
                    assert opts["default"] in kind
        req = spec["required"]
        for knob, value in KNOBS.items():
            assert req[knob][1]["default"] == value
        assert req["cutn"][1]["min"] == 1
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert set(mod.NODE_CLASS_MAPPINGS) == set(mod.NODE_DISPLAY_NAME_MAPPINGS)


def test_setup_embeds_weighted_text_and_neighbours(clip):
    emb = clip.encode_text(["baroque", "impressionism"])
    setup = cg.build_setup(clip, "a red barn:3 | the sea", "taesd", neighbors=FakeNeighbors(emb), style_weight=2.0,
                            **KNOBS)
    assert setup.targets.embeddings.shape == (4, clip.dim)
    assert torch.allclose(setup.targets.weights, torch.tensor([3.0, 1.0, 1.0, 1.0]) / 6)
    assert "a red barn" in setup.report and setup.options.decoder_checkpoint is False
    only_style = cg.build_setup(clip, "", "taesd", neighbors=FakeNeighbors(emb), **KNOBS)
    assert torch.allclose(only_style.targets.weights, torch.tensor([0.5, 0.5]))


def test_setup_decoder_checkpoint_auto_follows_decoder(clip):
    vae = object()
    assert cg.build_setup(clip, "x", "vae", vae=vae, **KNOBS).options.decoder_checkpoint is True
    off = cg.build_setup(clip, "x", "vae", vae=vae, decoder_checkpoint="off", **KNOBS)
    assert off.options.decoder_checkpoint is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_targets=" | \n", decoder="taesd"), "no target"),
    (dict(text_targets="x", decoder="vae"), "needs the 'vae' input"),
    (dict(text_targets="x", decoder="taesd", cutn=0), "cutn"),
    (dict(text_targets="a:1 | b:-1", decoder="taesd"), "sum to zero"),
])
def test_setup_bad_input_is_explained(clip, kwargs, message):
    knobs = dict(KNOBS)
    knobs.update({k: v for k, v in kwargs.items() if k in knobs})
    args = {k: v for k, v in kwargs.items() if k not in knobs}
    with pytest.raises(ValueError, match=message):
        cg.build_setup(clip, **args, **knobs)


def test_setup_refuses_neighbours_from_another_clip(clip):
    with pytest.raises(ValueError, match="64-d embeddings"):
        cg.build_setup(clip, "x", "taesd", neighbors=FakeNeighbors(torch.randn(3, 64)), **KNOBS)
    other = FakeNeighbors(torch.nn.functional.normalize(torch.randn(3, clip.dim), dim=-1), embedder_hash="abc")
    with pytest.raises(ValueError, match="spaces differ"):
        cg.build_setup(clip, "x", "taesd", neighbors=other, **KNOBS)
    with pytest.raises(ValueError, match="no embeddings"):
        cg.build_setup(clip, "x", "taesd", neighbors=FakeNeighbors(torch.zeros(0, clip.dim)), **KNOBS)


def test_setup_needs_a_clip():
    with pytest.raises(ValueError, match="ATELIER_CLIP"):
        cg.build_setup(None, "x", "taesd", **KNOBS)


# ------------------------------------------------------------------ decoders from the host's objects
FORMAT = SimpleNamespace(latent_channels=4, taesd_decoder_name="taesd_decoder", process_out=lambda z: z * 2.0)


class FakeTAESD(torch.nn.Module):
    """ComfyUI's TAESD as the core uses it: a ``taesd_decoder`` whose "1.weight" has the latent channels."""

    def __init__(self, channels):
        super().__init__()
        self.taesd_decoder = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(channels, 3, 3, padding=1))
        self.taesd_encoder = torch.nn.Conv2d(3, channels, 1)

    def decode(self, latent):
        return self.taesd_decoder(latent)


def taesd_files(names=("taesd_decoder.safetensors",), channels=4):
    with torch.inference_mode():  # what ComfyUI's loader hands over
        state = {k: v.clone() for k, v in FakeTAESD(channels).taesd_decoder.state_dict().items()}
    return cg.TaesdFiles(names=lambda: list(names), folders=lambda: ["/models/vae_approx"],
                         load=lambda name: dict(state), new_taesd=FakeTAESD)


def test_taesd_decoder_is_grad_ready_even_inside_inference_mode():
    with torch.inference_mode():
        decode = cg.taesd_decoder(FORMAT, "cpu", taesd_files(names=("other.pth", "taesd_decoder.safetensors")))
    assert decode.net.taesd_encoder is None and not any(p.requires_grad for p in decode.net.parameters())
    assert not any(p.is_inference() for p in decode.net.parameters())
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(decode(z).square().sum(), [z])
    assert g.shape == z.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_taesd_errors_name_the_file_the_folder_and_the_fix():
    with pytest.raises(FileNotFoundError) as err:
        cg.taesd_decoder(FORMAT, "cpu", taesd_files(names=("taesdxl_decoder.safetensors",)))
    text = str(err.value)
    assert "taesd_decoder.safetensors" in text and "/models/vae_approx" in text and "madebyollin/taesd" in text
    with pytest.raises(ValueError, match="decodes 16-channel latents but the model's latents have 4"):
        cg.taesd_decoder(FORMAT, "cpu", taesd_files(channels=16))
    with pytest.raises(ValueError, match="no TAESD for this model's latent format"):
        cg.taesd_decoder(SimpleNamespace(latent_channels=4), "cpu", taesd_files())


class ToyStage(ToyDecoder):
    """A VAE's first_stage_model as the core uses it: ``decode(raw latent) -> pixels``."""

    def decode(self, z):
        return self(z)


def toy_vae(**attrs):
    with torch.inference_mode():  # ComfyUI's VAE weights are inference tensors
        stage = ToyStage()
    return SimpleNamespace(first_stage_model=stage, latent_channels=4, **attrs)


def test_vae_decoder_copies_the_decoder_and_applies_process_out():
    vae = toy_vae(vae_dtype=torch.float32)
    decode = cg.vae_decoder(vae, FORMAT, "cpu")
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        expected = vae.first_stage_model(z * 2.0)
    assert decode.net is not vae.first_stage_model and torch.allclose(decode(z), expected)
    (g,) = torch.autograd.grad(decode(z).sum(), [z])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    stage = vae.first_stage_model
    with pytest.raises(ValueError, match="16-channel latents but the model makes 4-channel"):
        cg.vae_decoder(SimpleNamespace(first_stage_model=stage, latent_channels=16), FORMAT, "cpu")


# ------------------------------------------------------------------ the guider on a stand-in CFGGuider
class FakeCFGGuider:
    """What the mixin uses of ComfyUI's CFGGuider: the constructor, conds, cfg, inner_sample, predict_noise."""

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.inner_model = SimpleNamespace(latent_format=FORMAT)

    def set_conds(self, positive, negative):
        self.conds = (positive, negative)

    def set_cfg(self, cfg):
        self.cfg = cfg

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return x * 0.5

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                     seed, *args, **kwargs):
        return [self.predict_noise(noise, sigma) for sigma in sigmas[:-1]]


class CountingProgress(Progress):
    def __init__(self, stop_after=None):
        self.checks, self.stop_after = 0, stop_after

    def check_interrupt(self):
        self.checks += 1
        if self.stop_after is not None and self.checks > self.stop_after:
            raise KeyboardInterrupt("cancelled")


def guided(clip, progress, **changes):
    inputs = dict(clip=clip, text_targets="a red barn", decoder="vae", vae=toy_vae(),
                  **dict(KNOBS, cutn=2, cut_batches=1))
    inputs.update(changes)
    return cg.make_guider(FakeCFGGuider, "model", "pos", "neg", 6.0, progress, None, **inputs)


def test_guider_class_extends_the_given_base_once():
    cls = cg.guider_class(FakeCFGGuider)
    assert cg.guider_class(FakeCFGGuider) is cls and issubclass(cls, FakeCFGGuider)
    assert issubclass(cls, cg.CLIPGuidedCFG) and cls.__mro__.index(cg.CLIPGuidedCFG) < cls.__mro__.index(FakeCFGGuider)


def test_guider_guides_every_model_call_of_a_run_and_checks_for_interrupts(clip):
    progress = CountingProgress()
    guider = guided(clip, progress)
    assert guider.conds == ("pos", "neg") and guider.cfg == 6.0 and "a red barn" in guider.setup.report
    noise, sigmas = torch.randn(1, 4, 4, 4), torch.tensor([5.0, 2.0, 0.0])
    assert torch.equal(guider.predict_noise(noise, 5.0), noise * 0.5)  # outside a run: plain CFG
    out = guider.inner_sample(noise, None, "cpu", None, sigmas, None, None, True, 3)
    assert progress.checks == 2 and guider.guidance is None  # one check per guided call; freed afterwards
    assert all(not torch.equal(x, noise * 0.5) for x in out)
    again = guided(clip, CountingProgress()).inner_sample(noise, None, "cpu", None, sigmas, None, None, True, 3)
    assert all(torch.equal(a, b) for a, b in zip(out, again))  # seeded cutouts: a run is reproducible
    off = guided(clip, CountingProgress(), clip_scale=0.0).inner_sample(noise, None, "cpu", None, sigmas, None, None,
                                                                        True, 3)
    assert all(torch.equal(x, noise * 0.5) for x in off)


def test_guider_interrupt_stops_the_run_and_frees_the_guidance(clip):
    guider = guided(clip, CountingProgress(stop_after=1))
    with pytest.raises(KeyboardInterrupt):
        guider.inner_sample(torch.randn(1, 4, 4, 4), None, "cpu", None, torch.tensor([5.0, 2.0, 1.0, 0.0]), None,
                            None, True, 0)
    assert guider.guidance is None


def test_guider_refuses_a_latent_of_another_format(clip):
    guider = guided(clip, CountingProgress())
    with pytest.raises(ValueError, match="latent has 16 channels, the model expects 4"):
        guider.inner_sample(torch.randn(1, 16, 4, 4), None, "cpu", None, torch.tensor([1.0, 0.0]), None, None, True, 0)
