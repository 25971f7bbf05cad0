"""CLIP embedders for style retrieval and guidance (the ``ATELIER_CLIP`` type the nodes pass around).

``OpenClipEmbedder`` wraps an open_clip model built from an architecture name and a *local* weights file.
Nothing is ever downloaded: the architecture must be one open_clip knows (bundled or registered config),
the tokenizer is open_clip's bundled BPE, and weights load through safetensors (or ``torch.load`` with
``weights_only=True`` for .bin/.pt/.pth).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..common.files import file_sha256

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def pick_device(device="auto"):
    """'auto' is CUDA when present, else CPU (MPS is left to explicit requests: open_clip ops vary there)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_offline_architecture(name):
    """Refuse architectures whose creation would reach the network (HF text towers, hub/local-dir schemas)."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"open_clip architecture {name!r}: give a plain architecture name such as 'ViT-L-14'; "
                         "hub and directory schemas are not used (no downloads)")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"open_clip does not know the architecture {name!r}. Known ones include "
                         f"{', '.join(open_clip.list_models()[:8])}... (see open_clip.list_models())")
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"open_clip architecture {name!r} uses a Hugging Face text tower/tokenizer, which would "
                         "be downloaded; choose an architecture with open_clip's own text tower (ViT-B-32, "
                         "ViT-L-14, ViT-H-14, ...)")
    return cfg


def offline_architectures():
    """open_clip architectures that can be built without any download (for the loader's combo)."""
    import open_clip

    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        text_cfg = cfg.get("text_cfg", {})
        if "multimodal_cfg" in cfg or text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            continue
        names.append(name)
    return names


class OpenClipEmbedder:
    """open_clip text and image towers with the ATELIER_CLIP interface.

    ``encode_text``/``encode_image`` return float32 L2-normalised rows without grad; ``embed_pixels`` is the
    differentiable path (resize, mean/std, image tower, *not* normalised) used by CLIP guidance;
    ``encode_image_raw`` keeps the projection's magnitude (the unCLIP noise augmentor expects it).
    """

    def __init__(self, name, weights_path, device="auto", precision="auto"):
        import open_clip

        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"open_clip weights file not found: {weights_path}")
        if not str(weights_path).lower().endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"open_clip weights must be one of {WEIGHT_SUFFIXES}: got {weights_path}")
        _check_offline_architecture(name)
        self.device = pick_device(device)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                name, pretrained=str(weights_path), device=self.device, precision=precision, weights_only=True)
        except RuntimeError as e:
            raise RuntimeError(f"could not load {os.path.basename(weights_path)} as open_clip {name!r}: the file "
                               f"does not match that architecture ({str(e).splitlines()[0][:300]})") from e
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(name)
        self.name = name
        self.weights_path = str(weights_path)
        self.weights_hash = file_sha256(weights_path)[:16]
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(cfg.get("mean", OPENAI_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", OPENAI_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self.dtype = next(model.parameters()).dtype
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device, dtype=self.dtype)
            self.dim = int(model.encode_image(probe).shape[-1])

    def __repr__(self):
        return f"OpenClipEmbedder({self.name}, hash={self.weights_hash}, dim={self.dim}, device={self.device})"

    # -- text --------------------------------------------------------------------------------------------------
    def encode_text(self, texts, batch_size=64):
        """Normalised text embeddings [N, dim] float32 on CPU-or-device (the embedder's device)."""
        if isinstance(texts, str):
            texts = [texts]
        outs = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
                outs.append(self.model.encode_text(tokens).float())
        out = torch.cat(outs) if outs else torch.zeros(0, self.dim, device=self.device)
        return F.normalize(out, dim=-1)

    # -- images ------------------------------------------------------------------------------------------------
    def preprocess(self, images):
        """[B,3,H,W] in [0,1] → model input: shorter side to image_size, centre crop, mean/std (like open_clip)."""
        images = images.to(self.device, torch.float32)
        h, w = images.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - s) // 2, (nw - s) // 2
            images = images[..., top:top + s, left:left + s]
        return self.normalize_pixels(images.clamp(0, 1))

    def normalize_pixels(self, images):
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def encode_image_raw(self, images, batch_size=64):
        """Un-normalised image embeddings [B, dim] float32 (no grad)."""
        outs = []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                x = self.preprocess(images[i:i + batch_size]).to(self.dtype)
                outs.append(self.model.encode_image(x).float())
        return torch.cat(outs) if outs else torch.zeros(0, self.dim, device=self.device)

    def encode_image(self, images, batch_size=64):
        """Normalised image embeddings [B, dim] float32 (no grad)."""
        return F.normalize(self.encode_image_raw(images, batch_size), dim=-1)

    def encode_preprocessed(self, pixels):
        """Raw embeddings of already resized/cropped [B,3,S,S] pixels in [0,1] (the DB builder's path)."""
        with torch.no_grad():
            x = self.normalize_pixels(pixels.to(self.device, torch.float32)).to(self.dtype)
            return self.model.encode_image(x).float()

    def embed_pixels(self, images):
        """Differentiable embedding of [B,3,H,W] pixels in [0,1]: square resize, mean/std, image tower."""
        s = self.image_size
        x = images.to(self.device)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        x = self.normalize_pixels(x.float()).to(self.dtype)
        return self.model.encode_image(x).float()


def load_open_clip(name, weights_path, device="auto", precision="auto"):
    """Convenience constructor (the loader node and the CLI use it)."""
    return OpenClipEmbedder(name, weights_path, device=device, precision=precision)
