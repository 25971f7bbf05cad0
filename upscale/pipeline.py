"""The SwinIR Upscale node's job as one call (pure torch + spandrel, no ComfyUI).

:func:`upscale_image` takes a spandrel model and a ComfyUI-layout image ([B, H, W, C], 0..1) and does
everything between them: the model check, tile rounding to the model's window, the memory reservation,
the colour layout (alpha resized on its own, greyscale kept greyscale), tiled inference in float32 with
the model moved and put back, the optional resize to ``output_scale`` and the report text. What only the
host knows (devices, how to free memory, its out-of-memory exception types) comes in as
:class:`Resources`; progress and interrupts go through a ``common.progress.Progress``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..common.progress import NO_PROGRESS
from .channels import merge, split
from .loading import is_swinir
from .resize import resize
from .tiled import TORCH_OOM, TileReport, requirements_of, upscale_tiled

log = logging.getLogger(__name__)

# the stock upscale node's rule of thumb: bytes of activations per output value of one tile
ACTIVATION_BYTES = 384.0


@dataclass(frozen=True)
class UpscaleOptions:
    """The node's settings (input pixels for tile and overlap; ``output_scale`` 0 keeps the model's scale)."""

    tile_size: int = 512
    overlap: int = 64
    tile_batch: int = 1
    output_scale: float = 0.0
    resize_method: str = "lanczos"
    min_tile: int = 64


def _state_bytes(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


@dataclass
class Resources:
    """What the host lends: where to run, and its memory functions (defaults: plain torch, nothing freed)."""

    device: torch.device | str = "cpu"
    output_device: torch.device | str = "cpu"
    free_memory: Callable[[float, object], None] | None = None  # free_memory(nbytes, device)
    module_size: Callable[[torch.nn.Module], int] = _state_bytes
    oom_exceptions: tuple = (TORCH_OOM,)
    on_oom: Callable[[], None] | None = None  # e.g. empty the allocator's cache before a retry


@dataclass
class _Plan:
    tile: int
    overlap: int
    notes: list = field(default_factory=list)


def check_image_model(model):
    """Refuse anything that is not a single-image spandrel model; the arch's warning when it is not SwinIR."""
    from spandrel import ImageModelDescriptor

    if not isinstance(model, ImageModelDescriptor):
        raise ValueError("upscale_model must be a single-image model from 'Load Upscale Model'.")
    if is_swinir(model):
        return []
    msg = (f"Model is {model.architecture.name}, not SwinIR: it runs, but this node is tuned for SwinIR; "
           f"the stock 'Upscale Image (using Model)' node also works.")
    log.warning("AtelierSwinIRUpscale: %s", msg)
    return ["WARNING: " + msg]


def plan_tiles(model, tile_size, overlap):
    """The tile rounded down to the model's window (at least its smallest tile) and an overlap that fits."""
    req = requirements_of(model)
    tile = max(tile_size // req.align * req.align, req.smallest_tile)
    notes = []
    if tile != tile_size:
        notes.append(f"tile {tile_size} -> {tile} (multiple of window {req.align}, at least {req.smallest_tile})")
    return _Plan(tile, min(overlap, tile - req.align), notes)


def memory_needed(model, image, tile, tile_batch, module_size=_state_bytes):
    """Bytes to reserve: the weights, the activations of one batch of tiles, and the float32 image."""
    activations = tile * tile * 3 * 4 * max(model.scale, 1.0) * ACTIVATION_BYTES * tile_batch
    return module_size(model.model) + activations + image.nelement() * 4


def _run_float32(model, x, plan, options, resources, progress, report):
    """Tiled inference with the model moved to the compute device in float32, then put back as it was."""
    param = next(model.model.parameters(), None)
    old = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    try:
        model.model.to(device=resources.device, dtype=torch.float32)
        return upscale_tiled(
            model, x, tile=plan.tile, overlap=plan.overlap, tile_batch=options.tile_batch,
            min_tile=options.min_tile, dtype=torch.float32, device=resources.device,
            output_device=resources.output_device, oom_exceptions=resources.oom_exceptions,
            on_oom=resources.on_oom, progress=progress, report=report,
        ).clamp_(0.0, 1.0)
    finally:
        model.model.to(device=old[0], dtype=old[1])


def _finish(y, layout, h, w, options, notes):
    """Resize to ``output_scale`` (when set) and rebuild the input's layout; the alpha is resized on its own."""
    out_h, out_w = y.shape[-2:]
    if options.output_scale > 0:
        out_h, out_w = max(1, round(h * options.output_scale)), max(1, round(w * options.output_scale))
        if (out_h, out_w) != tuple(y.shape[-2:]):
            y = resize(y, out_h, out_w, options.resize_method).clamp_(0.0, 1.0)
    alpha = None
    if layout.alpha is not None:
        alpha = resize(layout.alpha, out_h, out_w, options.resize_method).clamp_(0.0, 1.0)
        notes.append(f"alpha resized separately ({options.resize_method})")
    if layout.grey:
        notes.append("greyscale in, greyscale out")
    return merge(y, layout, alpha), (out_w, out_h)


def report_text(model, size, report, notes):
    """The node's report: architecture, scale, output size, tile grid, model calls, retries, then notes."""
    text = (f"{model.architecture.name} x{model.scale} -> {size[0]}x{size[1]}; tiles {report.grid[0]}x"
            f"{report.grid[1]} of {report.tile}px (overlap {report.overlap}, batch {report.tile_batch}), "
            f"{report.model_calls} model calls, {report.oom_retries} out-of-memory retries")
    return "\n".join([text] + notes)


def upscale_image(model, image, options=UpscaleOptions(), resources=None, progress=NO_PROGRESS):
    """Upscale a ComfyUI IMAGE [B, H, W, C] (1-4 channels) with a spandrel image model.

    Returns (IMAGE in the input's channel layout, values 0..1; report text). The input is not changed.
    """
    resources = resources or Resources()
    warnings = check_image_model(model)
    x, layout = split(image, model.input_channels)
    plan = plan_tiles(model, options.tile_size, options.overlap)
    notes = warnings + plan.notes
    if resources.free_memory is not None:
        resources.free_memory(memory_needed(model, image, plan.tile, options.tile_batch, resources.module_size),
                              resources.device)
    report = TileReport(tile=plan.tile, overlap=plan.overlap, tile_batch=options.tile_batch, grid=(0, 0), tiles=0,
                        model_calls=0)
    y = _run_float32(model, x, plan, options, resources, progress, report)
    result, size = _finish(y, layout, x.shape[-2], x.shape[-1], options, notes)
    return result, report_text(model, size, report, notes)
