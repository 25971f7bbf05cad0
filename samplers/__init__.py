"""Sampling maths in the k-diffusion convention (pure torch, no ComfyUI imports)."""
