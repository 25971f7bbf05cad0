"""Images as the metrics read them: RGB uint8 arrays, from files (any common mode) or ComfyUI IMAGE tensors.

Modes: RGBA/LA/PA lose their alpha (as pytorch-fid and clean-fid do: ``convert("RGB")``), greyscale is
repeated over three channels, 16-bit and 32-bit greyscale are scaled to 8 bits by their full range (PIL's
own conversion would clip them to white), palette and CMYK images are converted by PIL. A file that cannot
be decoded raises :class:`UnreadableImage` naming it; the folder readers skip and list such files.
"""
from __future__ import annotations

import os

import numpy as np

from ..common.artdata import image_files


class UnreadableImage(ValueError):
    """A file that is not a decodable image."""


def to_rgb8(img):
    """A PIL image → uint8 [H, W, 3]."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_rgb8(path):
    """uint8 [H, W, 3] of an image file; :class:`UnreadableImage` naming the file when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            arr = to_rgb8(img)
    except Exception as exc:  # PIL raises many types for damaged files
        reason = "not a readable image (unknown or damaged format)" if type(exc).__name__ == "UnidentifiedImageError" \
            else f"{type(exc).__name__}: {exc}"
        raise UnreadableImage(f"{os.fspath(path)}: {reason}"[:400]) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UnreadableImage(f"{os.fspath(path)}: decoded to an unexpected shape {arr.shape}")
    return arr


def folder_images(folder):
    """Sorted relative paths of the image files under ``folder`` (hidden files left out)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: '{folder}'")
    return image_files(folder)[0]


def comfy_to_uint8(images):
    """ComfyUI IMAGE [B, H, W, C] floats in 0..1 → uint8 [B, 3, H, W], rounded as SaveImage writes PNGs
    (``clip(255 · x).astype(uint8)``), so an in-graph batch scores like its saved files; greyscale repeated,
    alpha dropped."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected images [B, H, W, C] with 1-4 channels, got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 2):
        x = x[..., :1].expand(*x.shape[:-1], 3)
    x = x[..., :3]
    return (x.detach().float().cpu() * 255.0).clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()
