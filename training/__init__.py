"""Artist fine-tuning: data, LoRA modules, loop and kohya-format writer (``python -m training finetune``), and
``artist_files``, the Artist Loader nodes' work on the files it writes.

Everything here is pure except ``comfy_backend.py``, the one file that loads checkpoints with ComfyUI (through
the host seam, ``host/``).
"""
