"""The papers' recipes as ``--preset`` settings: what each paper states, and what it left open that we chose.

Order of precedence: defaults < preset < ``--config`` file < flags typed on the command line.
"""
from __future__ import annotations

PRESETS = {
    "transfer-learning-2023": {
        "paper": "Novel Paintings from the Latent Diffusion Model through Transfer Learning (Applied Sciences 2023)",
        "stated": {
            "method": ("full", "the latent diffusion model is retrained from the SD 1.5 weights"),
            "lr": (1e-5, "learning rate 1 × 10⁻⁵"),
            "batch_size": (1, "batch size 1"),
            "epochs": (50, "50 epochs per artist"),
            "resolution": (512, "512 × 512"),
            "buckets": (False, "square 512² images"),
            "mixed_precision": ("fp16", "16-bit and 32-bit mixed precision"),
            "clip_threshold": (0.2, "image–text pairs with CLIP similarity below 0.2 removed"),
        },
        "chosen": {
            "train_text_encoder": (False, "not stated; the UNet alone is trained"),
            "optimizer": ("adamw", "not stated; SD's own optimiser"),
            "lr_scheduler": ("constant", "not stated; constant"),
            "warmup_steps": (0, "not stated"),
            "weight_decay": (1e-2, "not stated; AdamW's usual value"),
            "max_grad_norm": (1.0, "not stated"),
            "ema_decay": (0.0, "not stated; off"),
            "caption_mode": ("both", "machine captions (python -m training caption) after the metadata template"),
            "save_dtype": ("fp16", "not stated; fp16 files"),
        },
    },
    "creative-painting-2022": {
        "paper": "Creative Painting with Latent Diffusion Models (arXiv 2209.14697)",
        "stated": {
            "method": ("full", "the checkpoint is retrained"),
            "train_text_encoder": (True, "the CLIP text encoder is retrained"),
            "text_encoder_only_fraction": (0.1, "text encoder first with the LDM fixed, then both jointly "
                                                "(the split, 10 %, is ours)"),
            "caption_mode": ("template", "artist, year, style and genre as the text condition"),
            "caption_template": ("a {genre} painting by {artist}, {style}, {year}", "the WikiArt labels"),
            "resolution": (512, "the SD v1 settings, 512²"),
            "buckets": (False, "the SD v1 settings: square crops"),
            "optimizer": ("adamw", "the SD v1 settings: AdamW"),
            "ema_decay": (0.9999, "the SD v1 settings: EMA of the weights"),
            "lr_scheduler": ("constant", "the SD v1 settings: linear warm-up, then constant"),
        },
        "chosen": {
            "lr": (1e-5, "not stated for the fine-tune (SD v1's 1e-4 was for batch 2048)"),
            "lr_text_encoder": (1e-5, "not stated"),
            "warmup_steps": (500, "SD v1 warmed up 10 000 steps at batch 2048; shortened for a fine-tune"),
            "epochs": (2, "not stated"),
            "batch_size": (4, "not stated; per process (the paper used 8 GPUs)"),
            "mixed_precision": ("bf16", "not stated; bf16 on the A100s the paper used"),
            "gradient_checkpointing": (True, "not stated; fits 512² full fine-tunes in less memory"),
            "small_images": ("skip", "whole-WikiArt runs skip images below 512² (counted)"),
        },
    },
}


def preset_settings(name: str) -> dict:
    """{setting: value} of a preset (stated and chosen)."""
    if name not in PRESETS:
        raise SystemExit(f"error: unknown --preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return {k: v for part in ("stated", "chosen") for k, (v, _) in p[part].items()}


def describe(name: str, overridden: dict | None = None) -> str:
    """The preset as printed at the start of a run: each setting, stated by the paper or chosen by us."""
    p = PRESETS[name]
    overridden = overridden or {}
    lines = [f"preset {name}: {p['paper']}"]
    for part, label in (("stated", "stated by the paper"), ("chosen", "left open by the paper; our choice")):
        lines.append(f"  {label}:")
        for k, (v, why) in p[part].items():
            note = f"  [overridden: {overridden[k]!r}]" if k in overridden and overridden[k] != v else ""
            lines.append(f"    --{k.replace('_', '-')} {v!r}: {why}{note}")
    return "\n".join(lines)
