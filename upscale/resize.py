"""High-quality resizing after the model (e.g. x2 output from a x4 model); pure torch + Pillow.

Downscaling a x4 result to x2 with plain bilinear aliases the fine detail the model just made; these
methods low-pass first. Lanczos goes through Pillow's 32-bit float mode ("F") per channel, so it does not
quantise to 8 bits the way ``comfy.utils.lanczos`` does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("lanczos", "area", "bicubic")


def resize(image: torch.Tensor, height: int, width: int, method: str = "lanczos") -> torch.Tensor:
    """Resize [B, C, H, W] float images to (height, width); returns float32 on the input's device."""
    if method not in METHODS:
        raise ValueError(f"Unknown resize method {method!r}; choose one of {', '.join(METHODS)}.")
    if height < 1 or width < 1:
        raise ValueError(f"Target size {width}x{height} is empty.")
    if tuple(image.shape[-2:]) == (height, width):
        return image.float()
    x = image.float()
    if method == "area":
        # adaptive average pooling: exact box filter when shrinking; for enlarging fall back to bicubic
        if height <= x.shape[-2] and width <= x.shape[-1]:
            return F.interpolate(x, size=(height, width), mode="area")
        method = "bicubic"
    if method == "bicubic":
        return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    from PIL import Image

    arr = x.detach().cpu().numpy()
    out = np.empty(arr.shape[:2] + (height, width), dtype=np.float32)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            plane = Image.fromarray(np.ascontiguousarray(arr[b, c]))  # float32 -> mode "F"
            out[b, c] = np.asarray(plane.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    return torch.from_numpy(out).to(image.device)
