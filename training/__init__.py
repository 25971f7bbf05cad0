"""Training: the trainer engine on accelerate (``engine``), the latent-diffusion task on it (``diffusion``), data,
captions (``caption``: machine captions), presets, LoRA modules and the kohya-format writer, the artist trainer
(``python -m training finetune``), and ``artist_files``, the Artist Loader nodes' work on the files it writes.

Everything here is pure except ``comfy_backend.py``, the one file that loads checkpoints with ComfyUI (through
the host seam, ``host/``).
"""
