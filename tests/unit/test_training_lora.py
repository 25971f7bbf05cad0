"""LoRA wrappers, injection, kohya keys and the safetensors round trip."""
import pytest
import torch
from torch import nn
from safetensors import safe_open

from atelier.training import kohya
from atelier.training.lora import (LoRAModule, TEXT_ENCODER_TARGETS, inject_lora, kohya_key, load_lora_state_dict,
                           lora_state_dict, remove_lora, wrap_module)
from atelier.tests.fixtures.training_toys import ToyTextEncoder, ToyUNet, torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield



@pytest.mark.parametrize("base", [nn.Linear(7, 5), nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Conv2d(4, 2, 1)])
def test_zero_initialised_up_is_identity(base):
    torch.manual_seed(0)
    x = torch.randn(2, 7) if isinstance(base, nn.Linear) else torch.randn(2, base.in_channels, 9, 9)
    ref = base(x)
    lora = wrap_module(base, rank=3, alpha=3.0)
    assert torch.equal(lora.lora_up.weight, torch.zeros_like(lora.lora_up.weight))
    assert lora.lora_down.weight.abs().sum() > 0  # down is random, the product is still zero
    assert torch.equal(lora(x), ref)


@pytest.mark.parametrize("base", [nn.Linear(7, 5), nn.Conv2d(3, 6, 3, stride=2, padding=1)])
def test_trained_lora_equals_merged_weight(base):
    """base(x) + scale·up(down(x)) must equal the layer with W + scale·up@down (what ComfyUI applies)."""
    torch.manual_seed(1)
    x = torch.randn(2, 7) if isinstance(base, nn.Linear) else torch.randn(2, 3, 9, 9)
    lora = wrap_module(base, rank=2, alpha=4.0)
    nn.init.normal_(lora.lora_up.weight)
    w = base.weight.detach().clone()
    delta = (lora.lora_up.weight.flatten(1) @ lora.lora_down.weight.flatten(1)).reshape(w.shape) * 2.0
    if isinstance(base, nn.Linear):
        expected = torch.nn.functional.linear(x, w + delta, base.bias)
    else:
        expected = torch.nn.functional.conv2d(x, w + delta, base.bias, base.stride, base.padding)
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    parent = nn.Sequential(lora)
    assert remove_lora(parent, merge=True) == 1 and parent[0] is base
    torch.testing.assert_close(parent(x), expected, rtol=1e-5, atol=1e-5)


def test_inject_by_pattern_and_kohya_keys():
    te = ToyTextEncoder(layers=2)
    mods = inject_lora(te, TEXT_ENCODER_TARGETS, rank=4, alpha=2.0)
    assert sorted(mods) == sorted(f"text_model.encoder.layers.{i}.{n}" for i in range(2) for n in
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))
    assert all(isinstance(m, LoRAModule) for m in mods.values())
    assert not any(p.requires_grad for m in mods.values() for p in m.base.parameters())
    assert kohya_key("lora_te", "text_model.encoder.layers.1.mlp.fc2") == "lora_te_text_model_encoder_layers_1_mlp_fc2"
    # injecting again does not wrap the wrapped layers' bases
    with pytest.raises(ValueError, match="no Linear"):
        inject_lora(te, TEXT_ENCODER_TARGETS, rank=4, alpha=2.0)
    with pytest.raises(ValueError, match="rank"):
        inject_lora(ToyUNet(), (".*",), rank=0, alpha=1.0)


def test_save_load_round_trip_keys_and_metadata(tmp_path):
    torch.manual_seed(0)
    unet, te = ToyUNet(), ToyTextEncoder()
    groups = {"lora_unet": inject_lora(unet, (r"^(ctx|proj_out|conv_in)$",), 4, 2.0),
              "lora_te": inject_lora(te, TEXT_ENCODER_TARGETS, 4, 2.0)}
    for mods in groups.values():
        for m in mods.values():
            nn.init.normal_(m.lora_up.weight)
    sd = lora_state_dict(groups, torch.float32)
    assert set(sd) == {f"{kohya_key(p, n)}.{s}" for p, mods in groups.items() for n in mods
                       for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_conv_in.lora_down.weight" in sd and sd["lora_unet_conv_in.lora_down.weight"].ndim == 4
    md = kohya.build_metadata(artist="Claude Monet", styles=["Impressionism"], trigger="mnt",
                              caption_template="a painting by {artist}", base_model_name="v1-5.safetensors",
                              base_model_hash="ab" * 32, rank=4, alpha=2.0, training_args={"lr_unet": 1e-4},
                              num_images=3, steps=10, resolution=512)
    path = tmp_path / "monet.safetensors"
    kohya.save_lora(str(path), sd, md)
    assert kohya.read_metadata(str(path)) == md
    assert md["atelier.prompt"] == "mnt, a painting by Claude Monet, Impressionism"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    with safe_open(str(path), "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # into a fresh model with the same layout
    torch.manual_seed(5)
    unet2, te2 = ToyUNet(), ToyTextEncoder()
    groups2 = {"lora_unet": inject_lora(unet2, (r"^(ctx|proj_out|conv_in)$",), 4, 2.0),
               "lora_te": inject_lora(te2, TEXT_ENCODER_TARGETS, 4, 2.0)}
    load_lora_state_dict(groups2, loaded)
    assert all(torch.equal(lora_state_dict(groups2)[k], sd[k]) for k in sd)
    # a LoRA with extra keys (another model) is refused, not half-applied silently
    with pytest.raises(KeyError, match="match no module"):
        load_lora_state_dict(groups2, {**loaded, "lora_unet_other.lora_down.weight": torch.zeros(1)})


def test_metadata_must_be_strings_and_display_name(tmp_path):
    with pytest.raises(TypeError):
        kohya.save_lora(str(tmp_path / "x.safetensors"), {"a": torch.zeros(1)}, {"n": 1})
    assert not list(tmp_path.iterdir())
    assert kohya.display_name("monet.safetensors", {"atelier.artist": "Claude Monet"}) == \
        "Claude Monet — monet.safetensors"
    assert kohya.display_name("x.safetensors", {}) == "x.safetensors"
    assert kohya.artist_prompt({"atelier.artist": "Rembrandt", "atelier.styles": "[]"}) == "a painting by Rembrandt"
