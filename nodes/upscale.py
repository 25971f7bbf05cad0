"""SwinIR upscale node: ComfyUI's UPSCALE_MODEL + IMAGE through the pack's tiled core (``upscale.pipeline``)."""
from ..host import models
from ..host.progress import ComfyProgress, show_text
from ..upscale.pipeline import Resources, UpscaleOptions, upscale_image
from ..upscale.resize import METHODS
from ..upscale.tiled import TORCH_OOM


class AtelierSwinIRUpscale:
    """Seamless, memory-bounded super-resolution with a SwinIR (or any spandrel image) model."""

    DESCRIPTION = (
        "Upscales an image with a model from 'Load Upscale Model' (made for SwinIR, e.g. "
        "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth in models/upscale_models, the x4 model of "
        "'Generate Stunning Artworks with CLIP Guided Diffusion'). Runs in float32 "
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
        options = UpscaleOptions(tile_size, overlap, tile_batch, output_scale, resize_method)
        resources = Resources(device=models.torch_device(), output_device=models.intermediate_device(),
                              free_memory=models.free_memory, module_size=models.module_size,
                              oom_exceptions=models.oom_exceptions((TORCH_OOM,)), on_oom=models.soft_empty_cache)
        result, text = upscale_image(upscale_model, image, options, resources, ComfyProgress())
        show_text(text, unique_id)
        return {"ui": {"text": [text]}, "result": (result, text)}


NODE_CLASS_MAPPINGS = {"AtelierSwinIRUpscale": AtelierSwinIRUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierSwinIRUpscale": "SwinIR Upscale (Atelier)"}
