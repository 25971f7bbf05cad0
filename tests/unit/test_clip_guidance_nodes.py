"""Node layer of CLIP guidance without ComfyUI: schemas, input validation and target building."""
import pathlib
import sys
from dataclasses import dataclass, field

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from atelier.tests.fixtures.clip_guidance_toys import TinyClip  # noqa: E402


@pytest.fixture(scope="module")
def mod(pack):
    from atelier.nodes import clip_guidance
    return clip_guidance


@pytest.fixture(scope="module")
def clip():
    with torch.inference_mode():
        return TinyClip()


@dataclass
class FakeNeighbors:  # ATELIER_NEIGHBORS shape (COMMON.md contract)
    embeddings: torch.Tensor
    scores: list = field(default_factory=list)
    metadata: list = field(default_factory=list)
    embedder_name: str = "tiny-ViT"
    embedder_hash: str = "random"


KNOBS = dict(clip_scale=5000.0, tv_scale=100.0, range_scale=150.0, saturation_scale=0.0, scale_multiplier=50.0,
             cutn=16, cut_batches=4, cut_pow=1.0, clamp_max=0.05)


def test_schemas_have_tooltips_and_seed_defaults(mod):
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


def test_setup_embeds_weighted_text_and_neighbours(mod, clip):
    emb = clip.encode_text(["baroque", "impressionism"])
    setup = mod.build_setup(clip, "a red barn:3 | the sea", "taesd", neighbors=FakeNeighbors(emb), style_weight=2.0,
                            **KNOBS)
    assert setup.targets.embeddings.shape == (4, clip.dim)
    assert torch.allclose(setup.targets.weights, torch.tensor([3.0, 1.0, 1.0, 1.0]) / 6)
    assert "a red barn" in setup.report and setup.options.decoder_checkpoint is False
    only_style = mod.build_setup(clip, "", "taesd", neighbors=FakeNeighbors(emb), **KNOBS)
    assert torch.allclose(only_style.targets.weights, torch.tensor([0.5, 0.5]))


def test_setup_decoder_checkpoint_auto_follows_decoder(mod, clip):
    vae = object()
    assert mod.build_setup(clip, "x", "vae", vae=vae, **KNOBS).options.decoder_checkpoint is True
    assert mod.build_setup(clip, "x", "vae", vae=vae, decoder_checkpoint="off", **KNOBS).options.decoder_checkpoint is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_targets=" | \n", decoder="taesd"), "no target"),
    (dict(text_targets="x", decoder="vae"), "needs the 'vae' input"),
    (dict(text_targets="x", decoder="taesd", cutn=0), "cutn"),
    (dict(text_targets="a:1 | b:-1", decoder="taesd"), "sum to zero"),
])
def test_setup_bad_input_is_explained(mod, clip, kwargs, message):
    knobs = dict(KNOBS)
    knobs.update({k: v for k, v in kwargs.items() if k in knobs})
    args = {k: v for k, v in kwargs.items() if k not in knobs}
    with pytest.raises(ValueError, match=message):
        mod.build_setup(clip, **args, **knobs)


def test_setup_refuses_neighbours_from_another_clip(mod, clip):
    with pytest.raises(ValueError, match="64-d embeddings"):
        mod.build_setup(clip, "x", "taesd", neighbors=FakeNeighbors(torch.randn(3, 64)), **KNOBS)
    other = FakeNeighbors(torch.nn.functional.normalize(torch.randn(3, clip.dim), dim=-1), embedder_hash="abc")
    with pytest.raises(ValueError, match="spaces differ"):
        mod.build_setup(clip, "x", "taesd", neighbors=other, **KNOBS)
    with pytest.raises(ValueError, match="no embeddings"):
        mod.build_setup(clip, "x", "taesd", neighbors=FakeNeighbors(torch.zeros(0, clip.dim)), **KNOBS)


def test_setup_needs_a_clip(mod):
    with pytest.raises(ValueError, match="ATELIER_CLIP"):
        mod.build_setup(None, "x", "taesd", **KNOBS)
