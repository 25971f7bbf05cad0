"""The FID Inception network from a local weights file, through torchmetrics (torch-fidelity's port of the
TensorFlow Inception graph of 2015-12-05 that every FID implementation uses).

The file: ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's GitHub release v0.2.0, the file
torchmetrics would download); pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` has the same tensors
under the same names (torchvision's Inception3 layout, 1008 classes) and loads as well. A ``.safetensors``
conversion of either also works. Nothing is downloaded.

torch-fidelity reads the file with ``torch.load(weights_only=False)``, which would run code hidden in a
pickle. So the file is first read safely here (safetensors, or ``torch.load(weights_only=True)``), and
torchmetrics is handed a copy written by this module that holds nothing but those tensors; a file of another
layout is refused with the keys that differ.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..common.files import cache_dir, file_sha256
from .frechet import MetricsError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (f"Put the FID Inception weights {WEIGHTS_FILE} (torch-fidelity's GitHub release v0.2.0; the "
                "same file as pytorch-fid's pt_inception-2015-12-05-6726825d.pth) in ComfyUI/models/atelier_fid/, "
                "or pass its path with --inception.")
FEATURE_DIMS = (64, 192, 768, 2048)
RESIZES = ("tf-bilinear", "antialias")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_LOADED = {}


def read_state_dict(path):
    """A state dict of tensors, read without running pickled code."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsError(f"Inception weights not found: '{path}'. {WEIGHTS_HELP}")
    if not path.lower().endswith(WEIGHT_SUFFIXES):
        raise MetricsError(f"Inception weights must be one of {WEIGHT_SUFFIXES}, got '{os.path.basename(path)}'")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricsError(f"cannot read '{os.path.basename(path)}' as a weights file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}). {WEIGHTS_HELP}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricsError(f"'{os.path.basename(path)}' does not hold a plain state dict of tensors")
    return state


def _layout_error(exc, name):
    """torch's strict load_state_dict message, shortened to what differs."""
    import re

    text = str(exc)
    missing = re.search(r'Missing key\(s\) in state_dict: (.*?)(?:\.\s|$)', text, re.S)
    unexpected = re.search(r'Unexpected key\(s\) in state_dict: (.*?)(?:\.\s|$)', text, re.S)
    shape = re.search(r'size mismatch for ([^:]+): (.*?)(?:\.\s|$)', text, re.S)
    parts = []
    for label, match in (("missing", missing), ("unexpected", unexpected)):
        if match:
            keys = [k.strip().strip('"') for k in match.group(1).split(",") if k.strip()]
            parts.append(f"{len(keys)} {label} tensor(s) (e.g. {keys[0]})")
    if shape:
        parts.append(f"tensors of another shape (e.g. {shape.group(1).strip()}: {shape.group(2).strip()[:160]})")
    detail = "; ".join(parts) or text.splitlines()[0][:300]
    return MetricsError(f"'{name}' is not the FID Inception: {detail}. {WEIGHTS_HELP}")


class InceptionExtractor:
    """uint8 [B, 3, H, W] → float32 [B, dim] Inception features (pool3 for dim 2048), resized inside the
    network to 299² ("tf-bilinear": TensorFlow 1.x's bilinear resize, as the original FID and pytorch-fid's
    published statistics; "antialias": torchmetrics' default antialiased bilinear)."""

    def __init__(self, net, weights_hash, dim, resize, device):
        self.net, self.dim, self.resize, self.device = net, int(dim), resize, device
        self.weights_hash = weights_hash
        self.key = f"inception-{weights_hash}-{dim}-{resize}"

    def __call__(self, batch_uint8):
        import torch

        with torch.inference_mode():
            feats = self.net(batch_uint8.to(self.device))
        return feats.float().cpu().numpy()

    def __repr__(self):
        return f"InceptionExtractor({self.key}, device={self.device})"


def load_inception(weights_path, dim=2048, resize="tf-bilinear", device="cpu"):
    """The FID Inception of ``weights_path`` (checked, see the module docstring), kept loaded per file."""
    import torch
    from torchmetrics.image.fid import NoTrainInceptionV3

    if dim not in FEATURE_DIMS:
        raise MetricsError(f"Inception features come in {FEATURE_DIMS} dimensions, not {dim}")
    if resize not in RESIZES:
        raise MetricsError(f"resize must be one of {RESIZES}, got {resize!r}")
    device = torch.device(device)
    if not os.path.isfile(os.fspath(weights_path)):
        raise MetricsError(f"Inception weights not found: '{os.fspath(weights_path)}'. {WEIGHTS_HELP}")
    sha = file_sha256(weights_path)[:16]
    key = (sha, dim, resize, str(device))
    if key in _LOADED:
        return _LOADED[key]
    state = read_state_dict(weights_path)
    clean = {k: v.detach().contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix="inception-", suffix=".pth", dir=cache_dir("metrics"))
    os.close(fd)
    try:
        torch.save(clean, tmp)
        net = NoTrainInceptionV3("inception-v3-compat", [str(dim)], feature_extractor_weights_path=tmp,
                                 antialias=(resize == "antialias"))
    except RuntimeError as exc:
        raise _layout_error(exc, os.path.basename(os.fspath(weights_path))) from None
    finally:
        os.unlink(tmp)
    net = net.to(device)
    extractor = InceptionExtractor(net, sha, dim, resize, device)
    _LOADED.clear()  # one Inception at a time: ~95 MB each
    _LOADED[key] = extractor
    return extractor


def module_extractor(module, key, dim=None):
    """Any torch module mapping uint8 [B, 3, H, W] to [B, d] features as an extractor (torchmetrics' custom
    ``feature`` modules; the tests' tiny Inception). ``key`` must change when the module's weights do."""
    import torch

    class _Module:
        def __init__(self):
            self.key, self.module = key, module
            probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
            with torch.inference_mode():
                self.dim = int(dim or module(probe).shape[-1])

        def __call__(self, batch_uint8):
            with torch.inference_mode():
                return np.asarray(module(batch_uint8).float().cpu().numpy())

    return _Module()
