"""Artist Loader nodes without ComfyUI: schemas, and their core (``training.artist_files``) on real
safetensors files: labels, resolving, the key-matching report, refusals, the file cache."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atelier.training import artist_files, kohya


def test_match_report_counts_unmatched_modules():
    keys = ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
            "lora_te_b.lora_down.weight", "lora_te_b.lora_up.weight", "lora_unet_zz.lora_down.weight",
            "unet.x.lora_A.weight", "unet.x.lora_B.weight"]
    assert kohya.lora_module_names(keys) == {"lora_unet_a", "lora_te_b", "lora_unet_zz", "unet.x"}
    matched, unmatched = kohya.match_report(keys, {"lora_unet_a": "w", "lora_te_b": "w2"})
    assert matched == ["lora_te_b", "lora_unet_a"] and unmatched == ["lora_unet_zz", "unet.x"]


def test_artist_node_schemas(pack):
    from atelier.nodes import artist

    for cls in (artist.AtelierArtistLoader, artist.AtelierArtistCheckpointLoader):
        spec = cls.INPUT_TYPES()["required"]
        assert all("tooltip" in opts for _, opts in spec.values())
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert cls.CATEGORY.startswith("atelier/")
        assert spec["prompt_template"][1]["default"] == kohya.DEFAULT_PROMPT_TEMPLATE
    assert artist.AtelierArtistLoader.RETURN_TYPES == ("MODEL", "CLIP", "STRING", "STRING")
    assert artist.AtelierArtistCheckpointLoader.RETURN_TYPES == ("MODEL", "CLIP", "VAE", "STRING")
    assert set(artist.NODE_CLASS_MAPPINGS) == {"AtelierArtistLoader", "AtelierArtistCheckpointLoader"}


# ------------------------------------------------------------------ training.artist_files (the nodes' core)
KEYS = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
        "lora_te_b.lora_down.weight": torch.zeros(2, 4), "lora_te_b.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_zz.lora_down.weight": torch.zeros(2, 4)}
KEY_MAP = {"lora_unet_a": "w", "lora_te_b": "w2"}


class Folders:
    """The two lookups of host.folders over one real folder."""

    def __init__(self, root):
        self.root = root

    def files(self, folder):
        return sorted(os.listdir(self.root))

    def full_path(self, folder, name):
        path = os.path.join(self.root, name)
        return path if os.path.isfile(path) else None


def load_file(path, metadata=False):
    with safe_open(path, framework="pt") as f:
        tensors, md = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    return (tensors, md) if metadata else tensors


@pytest.fixture()
def loras(tmp_path):
    md = kohya.build_metadata(artist="Claude Monet", styles=["Impressionism"], trigger="", caption_template="",
                              base_model_name="sd15.safetensors", base_model_hash="", rank=2, alpha=2.0,
                              training_args={}, num_images=1, steps=1, resolution=64)
    kohya.save_lora(str(tmp_path / "monet.safetensors"), KEYS, md)
    save_file(KEYS, str(tmp_path / "plain.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    return Folders(str(tmp_path))


def test_labels_name_the_artist_and_resolve_back(loras):
    labels = artist_files.choices("loras", loras)
    assert labels == ["broken.safetensors", "Claude Monet — monet.safetensors", "plain.safetensors"]
    assert artist_files.resolve("loras", labels[1], loras) == ("monet.safetensors", loras.full_path("", "monet.safetensors"))
    # a workflow saved elsewhere may hold the plain file name or another artist label for the same file
    assert artist_files.resolve("loras", "monet.safetensors", loras)[0] == "monet.safetensors"
    assert artist_files.resolve("loras", "Someone Else — monet.safetensors", loras)[0] == "monet.safetensors"
    with pytest.raises(FileNotFoundError, match=r"'gone.safetensors' is not in models/loras/ \(found 3 files\)"):
        artist_files.resolve("loras", "gone.safetensors", loras)


def test_artist_lora_report_prompt_and_strength_zero(loras):
    lora = artist_files.artist_lora("Claude Monet — monet.safetensors", loras, load_file, family="SD15",
                                    key_map=KEY_MAP, strengths=(1.0, 0.5), template=kohya.DEFAULT_PROMPT_TEMPLATE)
    assert lora.apply and lora.prompt == "a painting by Claude Monet, Impressionism"
    assert lora.report == ("monet.safetensors: loaded 2 LoRA modules (1 UNet, 1 text encoder); 1 NOT loaded "
                           "(no such layer in this model): lora_unet_zz")
    assert set(lora.tensors) == set(KEYS)
    off = artist_files.artist_lora("plain.safetensors", loras, load_file, family="SD15", key_map=KEY_MAP,
                                   strengths=(0, 0), template="{artist}")
    assert not off.apply and off.report.endswith(" (strengths 0: not applied)") and off.prompt == ""


def test_lora_for_another_family_or_with_no_matching_key_is_refused(loras):
    with pytest.raises(ValueError, match="monet.safetensors was trained for SD 1.x but the MODEL is SDXL"):
        artist_files.artist_lora("monet.safetensors", loras, load_file, family="SDXL", key_map=KEY_MAP,
                                 strengths=(1, 1), template="{artist}")
    with pytest.raises(ValueError, match=r"none of the 3 modules of plain.safetensors match this MODEL/CLIP \(SDXL\)"):
        artist_files.artist_lora("plain.safetensors", loras, load_file, family="SDXL", key_map={},
                                 strengths=(1, 1), template="{artist}")


def test_lora_file_cache_reads_again_only_when_the_file_changes(loras):
    calls = []

    def counting(path, metadata=False):
        calls.append(path)
        return load_file(path, metadata=metadata)

    cache = artist_files.LoraFileCache()
    path = loras.full_path("", "plain.safetensors")
    first = cache.load(path, counting)
    assert cache.load(path, counting) is not None and len(calls) == 1
    os.utime(path, ns=(1, 1))
    second = cache.load(path, counting)
    assert len(calls) == 2 and set(second[0]) == set(first[0]) and second[1] == {}


def test_checkpoint_prompt_from_metadata(loras):
    assert artist_files.prompt_of(artist_files.metadata(loras.full_path("", "monet.safetensors")), "{artist}") \
        == "Claude Monet"
    assert artist_files.metadata(loras.full_path("", "broken.safetensors")) == {}
    assert artist_files.metadata("model.ckpt") == {}
