"""Artist fine-tuning: data, LoRA modules, loop and kohya-format writer.

Everything here is pure except ``comfy_backend.py``, the one file that loads checkpoints with ComfyUI.
"""
