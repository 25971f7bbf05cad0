"""Tiled super-resolution for spandrel image models (pure torch, no ComfyUI imports)."""
