"""SwinIR upscale node: ComfyUI's UPSCALE_MODEL + IMAGE through the pack's tiled core (``upscale/``)."""
import logging

import torch

from ..upscale.channels import merge, split
from ..upscale.loading import is_swinir
from ..upscale.resize import METHODS, resize
from ..upscale.tiled import TORCH_OOM, TileReport, count_tiles, requirements_of, upscale_tiled

log = logging.getLogger(__name__)


def _model_device_dtype(descriptor):
    param = next(descriptor.model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


class AtelierSwinIRUpscale:
    """Seamless, memory-bounded super-resolution with a SwinIR (or any spandrel image) model."""

    DESCRIPTION = (
        "Upscales an image with a model from 'Load Upscale Model' (made for SwinIR, e.g. "
        "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth in models/upscale_models). Runs in float32 "
        "(SwinIR overflows fp16), in window-aligned tiles cross-faded in their overlaps so no seams show, "
        "halving the tile when memory runs out. Alpha is resized separately; greyscale stays greyscale."
    )
    CATEGORY = "atelier/upscale"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = (
        "The upscaled image, values in 0..1, same channel layout as the input.",
        "What ran: architecture, scale, tile grid, out-of-memory retries and warnings.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "upscale_model": ("UPSCALE_MODEL", {
                    "tooltip": "From the stock 'Load Upscale Model' node. SwinIR is the target; other spandrel "
                               "image models run too, with a warning."}),
                "image": ("IMAGE", {"tooltip": "Images to upscale (RGB, RGBA or greyscale)."}),
                "tile_size": ("INT", {
                    "default": 512, "min": 16, "max": 4096, "step": 8,
                    "tooltip": "Tile edge in input pixels, rounded down to the model's window (8 for most "
                               "SwinIR). Smaller uses less memory; it is halved automatically on out-of-memory."}),
                "overlap": ("INT", {
                    "default": 64, "min": 0, "max": 1024, "step": 8,
                    "tooltip": "Overlap between neighbouring tiles in input pixels. The middle half of it is "
                               "cross-faded and the outer quarters dropped, so larger overlaps hide seams better."}),
                "tile_batch": ("INT", {
                    "default": 1, "min": 1, "max": 64,
                    "tooltip": "Tiles run together per model call (faster on a big GPU, more memory). "
                               "Halved first when memory runs out."}),
                "output_scale": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 16.0, "step": 0.25,
                    "tooltip": "Final size relative to the input. 0 keeps the model's own scale (x4 for a x4 "
                               "model); e.g. 2 with a x4 model resizes its output down with resize_method."}),
                "resize_method": (list(METHODS), {
                    "default": "lanczos",
                    "tooltip": "Filter for output_scale and for the alpha channel: lanczos (sharp, float "
                               "precision), area (box average, best for exact halving), bicubic (antialiased)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def upscale(self, upscale_model, image, tile_size, overlap, tile_batch, output_scale, resize_method,
                unique_id=None):
        import comfy.model_management as mm
        import comfy.utils
        from spandrel import ImageModelDescriptor

        if not isinstance(upscale_model, ImageModelDescriptor):
            raise ValueError("upscale_model must be a single-image model from 'Load Upscale Model'.")
        notes = []
        arch = upscale_model.architecture.name
        if not is_swinir(upscale_model):
            msg = (f"Model is {arch}, not SwinIR: it runs, but this node is tuned for SwinIR; "
                   f"the stock 'Upscale Image (using Model)' node also works.")
            log.warning("AtelierSwinIRUpscale: %s", msg)
            notes.append("WARNING: " + msg)

        x, layout = split(image, upscale_model.input_channels)
        req = requirements_of(upscale_model)
        tile = max(tile_size // req.align * req.align, req.smallest_tile)
        if tile != tile_size:
            notes.append(f"tile {tile_size} -> {tile} (multiple of window {req.align}, at least {req.smallest_tile})")
        overlap = min(overlap, tile - req.align)

        device = mm.get_torch_device()
        scale = upscale_model.scale
        memory = mm.module_size(upscale_model.model)
        # same rule of thumb as the stock node (384 bytes of activations per output value), per batched tile
        memory += tile * tile * 3 * 4 * max(scale, 1.0) * 384.0 * tile_batch
        memory += image.nelement() * 4
        mm.free_memory(memory, device)

        b, _, h, w = x.shape
        total = b * count_tiles(h, w, tile, overlap, req.align)
        pbar = comfy.utils.ProgressBar(total)
        # ComfyUI falls back to bare Exception when torch lacks the CUDA error type: never retry on every error
        oom = mm.OOM_EXCEPTION if mm.OOM_EXCEPTION is not Exception else TORCH_OOM
        report = TileReport(tile=tile, overlap=overlap, tile_batch=tile_batch, grid=(0, 0), tiles=0, model_calls=0)
        old_device, old_dtype = _model_device_dtype(upscale_model)
        try:
            upscale_model.model.to(device=device, dtype=torch.float32)
            y = upscale_tiled(
                upscale_model, x, tile=tile, overlap=overlap, tile_batch=tile_batch, min_tile=64,
                dtype=torch.float32, device=device, output_device=mm.intermediate_device(),
                oom_exceptions=(oom,), on_oom=mm.soft_empty_cache,
                progress=lambda done, tiles: pbar.update_absolute(done, tiles),
                check_interrupt=mm.throw_exception_if_processing_interrupted, report=report,
            )
        finally:
            upscale_model.model.to(device=old_device, dtype=old_dtype)
        y = y.clamp_(0.0, 1.0)

        out_h, out_w = h * scale, w * scale
        if output_scale > 0:
            out_h, out_w = max(1, round(h * output_scale)), max(1, round(w * output_scale))
            if (out_h, out_w) != tuple(y.shape[-2:]):
                y = resize(y, out_h, out_w, resize_method).clamp_(0.0, 1.0)
        alpha = None
        if layout.alpha is not None:
            alpha = resize(layout.alpha, out_h, out_w, resize_method).clamp_(0.0, 1.0)
            notes.append(f"alpha resized separately ({resize_method})")
        if layout.grey:
            notes.append("greyscale in, greyscale out")
        result = merge(y, layout, alpha)

        text = (f"{arch} x{scale} -> {out_w}x{out_h}; tiles {report.grid[0]}x{report.grid[1]} of {report.tile}px "
                f"(overlap {report.overlap}, batch {report.tile_batch}), {report.model_calls} model calls, "
                f"{report.oom_retries} out-of-memory retries")
        text = "\n".join([text] + notes)
        if unique_id is not None:
            try:
                from server import PromptServer

                PromptServer.instance.send_progress_text(text, unique_id)
            except Exception:  # no server in-process / older ComfyUI: the report output still carries it
                pass
        return {"ui": {"text": [text]}, "result": (result, text)}


NODE_CLASS_MAPPINGS = {"AtelierSwinIRUpscale": AtelierSwinIRUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierSwinIRUpscale": "SwinIR Upscale (Atelier)"}
