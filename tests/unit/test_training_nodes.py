"""Artist Loader nodes without ComfyUI: schemas and the key-matching report they rely on."""
from atelier.training import kohya


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
