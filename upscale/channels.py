"""Colour layout between ComfyUI images and a model: RGB in/out, alpha and greyscale handled (pure torch).

Super-resolution models see only colour; an alpha channel is not an image they were trained on, so it is
resized on its own (``upscale.resize``) and put back. A greyscale image goes through an RGB model as three
equal channels and comes back as luma.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" conversion


@dataclass
class Layout:
    """How an input image was split, to rebuild the same layout after the model."""

    grey: bool
    alpha: torch.Tensor | None  # [B, 1, H, W]


def luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]."""
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def split(image_bhwc: torch.Tensor, model_channels: int = 3) -> tuple[torch.Tensor, Layout]:
    """ComfyUI IMAGE [B, H, W, C] (C = 1, 2, 3 or 4) -> model input [B, model_channels, H, W] and layout."""
    if image_bhwc.ndim != 4:
        raise ValueError(f"Expected an IMAGE [B, H, W, C], got shape {tuple(image_bhwc.shape)}.")
    c = image_bhwc.shape[-1]
    if c not in (1, 2, 3, 4):
        raise ValueError(f"Images with {c} channels are not supported (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).")
    x = image_bhwc.movedim(-1, 1).float()
    alpha = x[:, -1:] if c in (2, 4) else None
    colour = x[:, :3] if c >= 3 else x[:, :1]
    grey = colour.shape[1] == 1
    if model_channels == 3 and grey:
        colour = colour.expand(-1, 3, -1, -1)
    elif model_channels == 1 and not grey:
        colour = luma(colour)
    elif model_channels not in (1, 3):
        raise ValueError(f"Models with {model_channels} input channels are not supported (1 or 3).")
    return colour.contiguous(), Layout(grey=grey, alpha=alpha)


def merge(output_bchw: torch.Tensor, layout: Layout, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Model output [B, C, H, W] (+ resized alpha [B, 1, H, W]) -> IMAGE [B, H, W, C] in the input's layout."""
    y = output_bchw
    if layout.grey and y.shape[1] == 3:
        y = luma(y)
    elif not layout.grey and y.shape[1] == 1:
        y = y.expand(-1, 3, -1, -1)
    if layout.alpha is not None:
        if alpha is None or alpha.shape[-2:] != y.shape[-2:]:
            raise ValueError("The resized alpha channel must match the output size.")
        y = torch.cat([y, alpha.to(y)], 1)
    return y.movedim(1, -1).contiguous()
