"""Model files for workflows/artist_lora_plms.json: a small artist LoRA named as the workflow expects.

It carries Atelier metadata (artist "Claude Monet"), so the Artist Loader lists it as
"Claude Monet — claude_monet.safetensors", and a few kohya keys that exist in every SD1.x model (tiny or
full): one UNet projection and one text-encoder projection.
"""
import torch

from atelier.training import kohya


def prepare(server):
    g = torch.Generator().manual_seed(0)
    r = 4
    tensors = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(r, 320, 1, 1, generator=g) * 0.01,
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(320, r, 1, 1, generator=g) * 0.01,
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(float(r)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(r, 768, generator=g) * 0.01,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, r, generator=g) * 0.01,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(float(r)),
    }
    md = kohya.build_metadata(artist="Claude Monet", styles=["Impressionism"], trigger="",
                              caption_template="a {genre} painting by {artist}, {style}, {year}",
                              base_model_name="tiny_sd15.safetensors", base_model_hash="", rank=r, alpha=float(r),
                              training_args={"note": "host-test fixture, random weights"}, num_images=0, steps=0,
                              resolution=512)
    folder = server.base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claude_monet.safetensors"
    if not path.exists():  # test_artist_host may already have put a trained one there
        kohya.save_lora(str(path), tensors, md)
    return {}
