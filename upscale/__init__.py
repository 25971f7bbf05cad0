"""Tiled super-resolution for spandrel image models (pure torch, no ComfyUI imports): ``pipeline`` is the SwinIR
Upscale node's one call, ``tiled`` the window-aligned tiling, ``channels`` and ``resize`` the colour layout and
the final resize, ``loading`` safe model-file loading for scripts."""
