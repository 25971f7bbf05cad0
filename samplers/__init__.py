"""Sampling cores: PLMS, multistage plans, A1111 prompt editing and CLIP guidance, in the k-diffusion convention.
Pure: no ComfyUI import; the nodes pass ComfyUI's objects in (from ``host/``) as arguments."""
