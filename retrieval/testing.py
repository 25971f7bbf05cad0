"""Tiny random open_clip models and generated image folders, for tests, benches and demos (no downloads)."""
from __future__ import annotations

import json
import os
import pathlib

TINY_NAME = "Atelier-Tiny-ViT"


def tiny_config(embed_dim=64, image_size=32, width=32, layers=1):
    """A real open_clip ViT config, shrunk: real BPE tokenizer (vocab 49408), 77-token context."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }


def register_tiny_config(config_dir, name=TINY_NAME, **kwargs):
    """Write ``<name>.json`` into config_dir and register it with open_clip; returns the name."""
    import open_clip

    config_dir = pathlib.Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(tiny_config(**kwargs)))
    open_clip.add_model_config(config_dir / f"{name}.json")
    return name


def make_tiny_open_clip(weights_path, name=TINY_NAME, seed=0, config_dir=None, **kwargs):
    """Register a tiny architecture and save random weights as safetensors; returns (name, path)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    weights_path = pathlib.Path(weights_path)
    register_tiny_config(config_dir or weights_path.parent / "open_clip_configs", name, **kwargs)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights_path))
    return name, weights_path


STYLES = ("Impressionism", "Cubism", "Ukiyo_e")
ARTISTS = {"Impressionism": ("claude-monet", "berthe-morisot"), "Cubism": ("pablo-picasso", "juan-gris"),
           "Ukiyo_e": ("hokusai", "hiroshige")}


def make_pattern(i, size=48):
    """A distinct deterministic picture per index: coloured stripes / checks / gradients."""
    import numpy as np

    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = i % 3
    freq = 1 + (i // 3) % 5
    base = rng.uniform(0, 1, 3)
    if kind == 0:
        pat = (np.sin(2 * np.pi * freq * x) > 0).astype(np.float32)
    elif kind == 1:
        pat = ((np.floor(x * freq * 2) + np.floor(y * freq * 2)) % 2).astype(np.float32)
    else:
        pat = (x * np.cos(freq) + y * np.sin(freq)) % 1.0
    img = base[None, None, :] * pat[..., None] + (1 - base[None, None, :]) * (1 - pat[..., None])
    img = img + rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_wikiart_folder(root, n=12, size=48, with_csv=True):
    """A WikiArt-layout folder ``Style/artist_title-year.png`` with n generated images and a genre CSV."""
    from PIL import Image

    root = pathlib.Path(root)
    rows = []
    for i in range(n):
        style = STYLES[i % len(STYLES)]
        artist = ARTISTS[style][(i // len(STYLES)) % 2]
        year = 1850 + 7 * i
        rel = f"{style}/{artist}_picture-{i:03d}-{year}.png"
        os.makedirs(root / style, exist_ok=True)
        Image.fromarray(make_pattern(i, size)).save(root / rel)
        rows.append({"path": rel, "genre": ("landscape", "portrait")[i % 2]})
    if with_csv:
        lines = ["path,genre"] + [f"{r['path']},{r['genre']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return rows
