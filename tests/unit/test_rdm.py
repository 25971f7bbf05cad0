"""The RDM core: what a checkpoint is (from its keys), its EMA weights, its autoencoder's config, safe reading,
and the knn2img conditioning against a reference written here from the paper's description."""
import os
import pickle

import pytest
import torch

from atelier.rdm import checkpoint as C
from atelier.rdm.conditioning import ConditioningError, knn_context, rdm_conditioning
from atelier.retrieval.neighbors import Neighbors
from atelier.tests.fixtures.tiny_rdm import fake_state_dict, fake_vae_keys


def test_ema_key_is_litema_name_without_dots():
    assert C.ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert C.ema_key("out.2.bias") == "model_ema.diffusion_modelout2bias"


def test_ema_weights_replace_raw_ones_and_raw_keeps_them():
    sd = fake_state_dict()
    ema, used, note = C.unet_state(sd, "ema")
    raw, used_raw, _ = C.unet_state(sd, "raw")
    assert used == "ema" and used_raw == "raw" and not note
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(ema[key], sd[C.ema_key("out.2.weight")])
    assert torch.equal(raw[key], sd[key]) and not torch.equal(ema[key], raw[key])
    assert set(ema) == set(raw) == {k for k in sd if k.startswith(C.UNET_PREFIX)}


def test_no_ema_copy_falls_back_to_raw_with_a_note():
    sd = fake_state_dict(ema=False)
    out, used, note = C.unet_state(sd, "ema")
    assert used == "raw" and "no EMA weights" in note
    assert torch.equal(out["model.diffusion_model.out.2.weight"], sd["model.diffusion_model.out.2.weight"])


def test_partial_ema_copy_is_an_error():
    sd = fake_state_dict()
    del sd[C.ema_key("out.2.bias")]
    with pytest.raises(C.RDMError, match="EMA copy is incomplete: 1 of 6"):
        C.unet_state(sd, "ema")


def test_vae_config_is_read_off_the_keys():
    vae = {k: torch.zeros(s) for k, s in fake_vae_keys(ch=128, num_res_blocks=2).items()}
    dd, embed = C.vae_config(vae)
    assert dd == {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
    assert embed == 16 and C.downscale(dd) == 16


def test_inspect_accepts_the_rdm_and_names_what_else_a_file_is():
    info = C.inspect(fake_state_dict())
    assert info["has_ema"] and info["model_channels"] == 64
    with pytest.raises(C.RDMError, match=r"an SD 1\.x checkpoint \(4 latent channels, context 768.*not an RDM"):
        C.inspect(fake_state_dict(channels=4))
    with pytest.raises(C.RDMError, match="an SD 2.x checkpoint"):
        C.inspect(fake_state_dict(channels=4, context=1024))
    with pytest.raises(C.RDMError, match="no autoencoder"):
        C.inspect(fake_state_dict(vae=False))
    with pytest.raises(C.RDMError, match="a VAE / autoencoder alone"):
        C.inspect({k: torch.zeros(s) for k, s in fake_vae_keys().items()})
    with pytest.raises(C.RDMError, match="autoencoder has 4 latent channels"):
        C.inspect(fake_state_dict(z=4))


def test_prepare_checks_everything_before_building():
    built = []
    with pytest.raises(C.RDMError):
        C.load_rdm(__file__.replace(".py", ".ckpt"), "ema", lambda p: fake_state_dict(channels=4),
                   lambda prepared: built.append(prepared))
    assert built == []
    prepared = C.prepare(fake_state_dict(), "ema")
    assert prepared["ddconfig"]["ch_mult"] == [1, 1, 2, 2, 4] and prepared["weights"] == "ema"
    assert all(k.startswith(C.UNET_PREFIX) for k in prepared["unet"])
    assert all(not k.startswith(C.VAE_PREFIX) for k in prepared["vae"])


class Evil:
    """Unpickling this runs code: it must be refused, never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_read_state_dict_errors(tmp_path):
    def weights_only(path):  # torch's weights-only unpickler, as ComfyUI's safe loader calls it
        return torch.load(path, map_location="cpu", weights_only=True)

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil(marker)}}, f)
    with pytest.raises(C.RDMError, match="refused: its pickle holds code"):
        C.read_state_dict(str(evil), weights_only)
    assert not marker.exists()

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": fake_state_dict(), "global_step": 3}, good)
    assert C.read_state_dict(str(good), weights_only)["model.diffusion_model.out.2.bias"].shape == (16,)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(C.RDMError, match="truncated or not a checkpoint"):
        C.read_state_dict(str(cut), weights_only)
    with pytest.raises(C.RDMError, match="not found"):
        C.read_state_dict(str(tmp_path / "nope.ckpt"), weights_only)


# -- conditioning ---------------------------------------------------------------------------------------------------
def reference_knn2img(text_emb, neighbour_emb):
    """knn2img as the paper and the script describe it: c = [text/|text|, nn_1/|nn_1|, ..., nn_k/|nn_k|]."""
    t = text_emb / text_emb.norm(dim=-1, keepdim=True)
    n = neighbour_emb / neighbour_emb.norm(dim=-1, keepdim=True)
    return torch.cat([t[:, None, :], n[None].expand(t.shape[0], -1, -1)], dim=1)


def test_knn_context_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    text, nn = torch.randn(1, 768, generator=g) * 3, torch.randn(19, 768, generator=g) * 7
    c = knn_context(text, nn)
    assert c.shape == (1, 20, 768)
    assert torch.allclose(c, reference_knn2img(text, nn), atol=1e-6)
    assert torch.allclose(knn_context(text, None), reference_knn2img(text, nn)[:, :1], atol=1e-6)
    assert torch.allclose(knn_context(None, nn), reference_knn2img(text, nn)[:, 1:], atol=1e-6)
    assert torch.allclose(knn_context(text, nn, text_weight=0.5)[:, 0], 0.5 * reference_knn2img(text, nn)[:, 0])


class FakeClip:
    """An ATELIER_CLIP stand-in with fixed text and image embeddings."""

    def __init__(self, dim=768, name="Atelier-Tiny-ViT-L", weights_hash="h"):
        g = torch.Generator().manual_seed(1)
        self.dim, self.name, self.weights_hash = dim, name, weights_hash
        self.text = torch.randn(dim, generator=g) * 2
        self.img = torch.randn(dim, generator=g)

    def encode_text(self, texts):
        return torch.nn.functional.normalize(self.text[None].repeat(len(texts), 1), dim=-1)

    def encode_image(self, images):
        return torch.nn.functional.normalize(self.img[None].repeat(images.shape[0], 1), dim=-1)


def neighbours(k=19, dim=768, name="Atelier-Tiny-ViT-L", h="h", reason=""):
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1)
    return Neighbors(emb, [1.0 - i / 100 for i in range(k)], [{"path": ""}] * k, name, h, reason=reason)


def test_rdm_conditioning_modes():
    clip, nn = FakeClip(), neighbours()
    c, info = rdm_conditioning(clip, "a stormy sea", nn, k=19)
    assert torch.allclose(c, reference_knn2img(clip.text[None], nn.embeddings), atol=1e-6)
    assert "(1, 20, 768)" in info
    c5, _ = rdm_conditioning(clip, "a stormy sea", nn, k=5)
    assert torch.allclose(c5, c[:, :6])
    text_only, _ = rdm_conditioning(clip, "a stormy sea", None, mode="text only")
    assert torch.allclose(text_only, c[:, :1])
    only_nn, _ = rdm_conditioning(clip, "", nn, k=19, mode="neighbours only")
    assert torch.allclose(only_nn, c[:, 1:])
    image = torch.rand(2, 32, 32, 3)
    replaced, _ = rdm_conditioning(clip, "a stormy sea", nn, k=3, image=image, image_use="replace text")
    assert torch.allclose(replaced, reference_knn2img(clip.img[None], nn.embeddings[:3]), atol=1e-6)
    beside, _ = rdm_conditioning(clip, "a stormy sea", nn, k=3, image=image, image_use="beside text", text_weight=2)
    assert beside.shape == (1, 5, 768)
    assert torch.allclose(beside[:, 0], 2 * c[:, 0]) and torch.allclose(beside[:, 1], replaced[:, 0])
    assert torch.allclose(beside[:, 2:], c[:, 1:4])


def test_rdm_conditioning_refuses_what_the_rdm_cannot_take():
    clip = FakeClip()
    with pytest.raises(ConditioningError, match="512-d .*768-d CLIP ViT-L/14"):
        rdm_conditioning(clip, "x", neighbours(dim=512))
    with pytest.raises(ConditioningError, match="512-d"):
        rdm_conditioning(FakeClip(dim=512), "x", None, mode="text only")
    with pytest.raises(ConditioningError, match="open_clip ViT-B-16"):
        rdm_conditioning(clip, "x", neighbours(name="ViT-B-16"))
    with pytest.raises(ConditioningError, match="asked for k = 19 neighbours but the retriever gave 4 \\(only 4"):
        rdm_conditioning(clip, "x", neighbours(k=4, reason="only 4 image(s) are in the database"))
    with pytest.raises(ConditioningError, match="returned no neighbours .*empty"):
        rdm_conditioning(clip, "x", neighbours(k=0, reason="database 'd' is empty"))
    with pytest.raises(ConditioningError, match="text and images must share one CLIP"):
        rdm_conditioning(clip, "x", neighbours(h="other"))
    with pytest.raises(ConditioningError, match="needs the Style Retriever's neighbors"):
        rdm_conditioning(clip, "x", None)
    with pytest.raises(ConditioningError, match="needs a text or an image prompt"):
        rdm_conditioning(clip, "  ", neighbours())
    assert rdm_conditioning(clip, "x", neighbours(h=""), k=2)[0].shape == (1, 3, 768)  # imported: no weights bound
