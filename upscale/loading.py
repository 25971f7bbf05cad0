"""Safe loading of upscale model files (for scripts, benchmarks and tests; ComfyUI users use the stock loader).

Mirrors ComfyUI's ``UpscaleModelLoader``: ``comfy.utils.load_torch_file(safe_load=True)`` reads
``.safetensors`` with safetensors and everything else with ``torch.load(weights_only=True)``, unwraps a
single-key wrapper (``params_ema`` in the official SwinIR releases), strips a ``module.`` prefix, and hands
the state dict to spandrel. A pickle that holds anything but tensors and plain containers is refused,
never executed.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net_g")


class UpscaleModelError(ValueError):
    """A model file that is unreadable, unsafe, or not a single-image upscale model."""


def read_state_dict(path: str) -> dict:
    """Tensors of a ``.safetensors``/``.pth``/``.pt``/``.ckpt`` file, refusing unsafe pickles."""
    if not os.path.isfile(path):
        raise UpscaleModelError(f"No such model file: {path}. Put upscale models in ComfyUI/models/upscale_models.")
    name = os.path.basename(path)
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise UpscaleModelError(f"{name} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refused class: the bytes are simply not a valid pickle
            raise UpscaleModelError(
                f"{name} could not be read as a PyTorch file (corrupt, truncated, or not a model file)."
            ) from exc
        raise UpscaleModelError(
            f"{name} was refused: it is a pickle that contains more than weights (loading it would run code). "
            f"Use a .safetensors file or a plain state-dict .pth from a trusted source."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise UpscaleModelError(f"{name} could not be read as a PyTorch file (corrupt or truncated?): {exc}") from exc
    return _unwrap(obj, name)


def _unwrap(obj, name: str) -> dict:
    if not isinstance(obj, dict):
        raise UpscaleModelError(f"{name} holds a {type(obj).__name__}, not a state dict of tensors.")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    else:
        if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            obj = next(iter(obj.values()))
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UpscaleModelError(f"{name} holds no tensors; it is not a model file.")
    return obj


def load_upscale_model(path: str):
    """A spandrel ``ImageModelDescriptor`` (eval mode, CPU, fp32) from a file, or ``UpscaleModelError``."""
    import spandrel

    state_dict = read_state_dict(path)
    if any(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    name = os.path.basename(path)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise UpscaleModelError(
            f"{name} is not an image model spandrel knows (a checkpoint, LoRA or VAE in the wrong folder?). "
            f"SwinIR files such as 003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth work."
        ) from exc
    except Exception as exc:  # spandrel raises plain errors on mismatched shapes
        raise UpscaleModelError(f"{name} looks like a known architecture but its weights do not fit: {exc}") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscaleModelError(
            f"{name} is a {descriptor.architecture.name} model ({descriptor.purpose}), which needs a mask; "
            f"an upscaler takes one image."
        )
    return descriptor.eval()


def is_swinir(model) -> bool:
    """True for a spandrel descriptor of the SwinIR architecture."""
    arch = getattr(model, "architecture", None)
    return getattr(arch, "id", None) == "SwinIR"
