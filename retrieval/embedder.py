"""CLIP embedders for style retrieval and guidance (the ``ATELIER_CLIP`` type the nodes pass around).

``OpenClipEmbedder`` wraps an open_clip model built from an architecture name and a *local* weights file.
Nothing is ever downloaded: the architecture must be one open_clip knows (bundled or registered config),
the tokenizer is open_clip's bundled BPE, and weights load through safetensors (or ``torch.load`` with
``weights_only=True`` for .bin/.pt/.pth).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..common.files import file_sha256

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
AUTO_ARCHITECTURE = "auto from file name"
PREFERRED_ARCHITECTURES = ("ViT-H-14", "ViT-L-14", "ViT-B-32")  # first in the loader's combo, in this order
WEIGHTS_HELP = (
    "Put open_clip weights in ComfyUI/models/open_clip/, e.g. 'ViT-L-14-openai.safetensors' (ViT-L-14, "
    "the paper's LAION-RDM embedder; from the Hugging Face repo openai/clip-vit-large-patch14 converted, or "
    "open_clip's 'ViT-L-14/openai' release), 'ViT-B-32-openai.safetensors' (ViT-B-32, the paper's ImageNet-RDM "
    "embedder) or 'ViT-H-14-laion2b_s32b_b79k.safetensors' (ViT-H-14, the embedder of SD 2.1 unCLIP-H; "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K, file open_clip_model.safetensors). .safetensors preferred; "
    ".bin/.pt/.pth load with weights_only. Other architectures: put open_clip's config '<Arch-Name>.json' in the "
    "same folder."
)


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


# -- the open_clip Loader: weights files, architecture configs in the model folders, the architecture of a file --
_REGISTERED_CONFIGS = set()


def weight_files(names):
    """The open_clip weights files among a model folder's file names (by their ending)."""
    return [name for name in names if name.lower().endswith(WEIGHT_SUFFIXES)]


def register_folder_configs(folders):
    """Register the open_clip architecture configs (``*.json``) found in ``folders`` (each file once).

    Lets users (and the tests' tiny models) use architectures open_clip does not ship, e.g. a fine-tune with a
    changed config: put ``<Arch-Name>.json`` (open_clip's model-config format) next to the weights. Other JSON
    files are left alone; without open_clip nothing is registered.
    """
    try:
        import open_clip
    except ImportError:
        return
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not name.endswith(".json") or path in _REGISTERED_CONFIGS:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
                open_clip.add_model_config(path)
                _REGISTERED_CONFIGS.add(path)


def architectures(folders=()):
    """The loader's architecture choices: those buildable offline (after registering the configs in
    ``folders``), ViT-H-14 / ViT-L-14 / ViT-B-32 first; ["ViT-L-14"] when open_clip cannot be asked."""
    register_folder_configs(folders)
    try:
        names = offline_architectures()
    except Exception:  # open_clip missing or broken: the schema still loads, loading then says why
        names = []
    first = [n for n in PREFERRED_ARCHITECTURES if n in names]
    return first + [n for n in names if n not in first] or ["ViT-L-14"]


def guess_architecture(filename, names):
    """Longest known architecture name that prefixes the file name (e.g. ViT-L-14-openai → ViT-L-14)."""
    base = os.path.basename(filename)
    hits = [n for n in names if base.startswith(n)]
    return max(hits, key=len) if hits else None


def loader_device(choice, host_device=None):
    """The device of the loader's ``device`` choice: 'auto' is the host's torch device (``host_device()``,
    else CUDA when present), 'gpu' the same but refused on a CPU-only host, 'cpu' the CPU."""
    if choice == "cpu":
        return "cpu"
    device = host_device() if host_device is not None else pick_device("auto")
    if choice == "gpu" and torch.device(device).type == "cpu":
        raise RuntimeError("Atelier open_clip Loader: device 'gpu' asked but ComfyUI runs on CPU")
    return device


def load_embedder(weights, path, architecture=AUTO_ARCHITECTURE, device="auto", folders=(), host_device=None):
    """The open_clip Loader's work: the embedder of weights file ``weights`` (found at ``path``, None when it is
    not there) in the open_clip model ``folders``, its architecture given or guessed from the file name."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"Atelier open_clip Loader: weights file {weights!r} not found in "
                                f"{list(folders)}. {WEIGHTS_HELP}")
    register_folder_configs(folders)
    if architecture == AUTO_ARCHITECTURE:
        guess = guess_architecture(weights, architectures(folders))
        if guess is None:
            raise ValueError(f"Atelier open_clip Loader: cannot tell the architecture of {weights!r} from its "
                             "name; choose it in 'architecture' or rename the file to start with it "
                             "(e.g. ViT-L-14-openai.safetensors)")
        architecture = guess
    return OpenClipEmbedder(architecture, path, device=loader_device(device, host_device))
