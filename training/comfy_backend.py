"""An SD 1.x checkpoint loaded with ComfyUI's own loader (through the host seam), exposed to the pure training task as
plain callables.

Only the raw torch modules are used for training (``model.model.diffusion_model``, the CLIP-L
transformer, the VAE); ComfyUI's ModelPatcher is bypassed because training needs autograd through the
real weights, which its sampling paths (inference mode, weight patching) are not built for. Two things
ComfyUI's inference code does that break autograd are handled here: it samples under
``torch.inference_mode`` (we train outside it) and its CLIP layers add residuals in place (we give those
layers an out-of-place forward on *our* loaded copy only).
"""
from __future__ import annotations

import hashlib
import os
import types

import torch

from ..host import models
from ..host.locate import ComfyNotFound, attach
from .lora import TEXT_ENCODER_TARGETS, UNET_ALL_TARGETS, UNET_ATTENTION_TARGETS, inject_lora


class BackendError(RuntimeError):
    """ComfyUI could not be found or the checkpoint is not something this trainer can fine-tune."""


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    # same maths as comfy.clip_model.CLIPLayer.forward, without `x +=` (in-place ops break backward)
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


class SD1Backend:
    """An SD 1.x checkpoint loaded by ComfyUI, seen as ``unet_fn``, ``encode_fn``, ``vae_encode``, schedule."""

    def __init__(self, ckpt_path: str, comfyui: str | None = None, device: str | None = None,
                 weight_dtype: torch.dtype | None = None):
        try:
            attach(comfyui)
        except ComfyNotFound as e:
            raise BackendError(f"{e} Run the trainer with ComfyUI's own Python (its venv).") from None
        self.ckpt_path = ckpt_path
        if not os.path.isfile(ckpt_path):
            raise BackendError(f"checkpoint {ckpt_path!r} not found")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        opts = {"dtype": weight_dtype} if weight_dtype is not None else {}
        try:
            model, clip, vae = models.load_checkpoint(ckpt_path, embeddings=False, model_options=opts,
                                                      te_model_options=opts)
        except Exception as e:
            raise BackendError(f"ComfyUI could not load {ckpt_path!r} as a checkpoint: {e}") from e
        cfg = model.model.model_config
        if not models.is_sd15(model) or clip is None or vae is None or \
                not hasattr(clip.cond_stage_model, "clip_l") or hasattr(clip.cond_stage_model, "clip_g"):
            raise BackendError(f"{os.path.basename(ckpt_path)} is a {type(cfg).__name__} checkpoint; the artist "
                               "trainer fine-tunes SD 1.x single-file checkpoints (with UNet, CLIP-L and VAE), "
                               "e.g. v1-5-pruned-emaonly.safetensors")
        self.model, self.clip, self.vae = model, clip, vae
        self.unet = model.model.diffusion_model
        self._key_map = self._compute_key_map()
        self.te = clip.cond_stage_model.clip_l
        self.te_root = self.te.transformer  # paths below it: text_model.encoder.layers.N... (kohya lora_te_)
        for m in self.te.modules():
            if type(m).__name__ == "CLIPLayer":
                m.forward = types.MethodType(_clip_layer_forward, m)
        self.unet.to(self.device).requires_grad_(False)
        self.te.to(self.device).requires_grad_(False)
        self.te.execution_device = None
        ms = model.model.model_sampling
        from .diffusion import NoiseSchedule
        prediction = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}.get(model.model.model_type.name)
        if prediction is None:
            raise BackendError(f"unsupported prediction type {model.model.model_type.name} (need EPS or V_PREDICTION)")
        sigmas = ms.sigmas.detach().double().cpu()  # ComfyUI keeps σ_t = √((1−ᾱ_t)/ᾱ_t) per training timestep
        self.schedule = NoiseSchedule((1.0 / (1.0 + sigmas ** 2)).float(), prediction)

    # -- model calls
    def unet_fn(self, x_t, t, context):
        return self.unet(x_t, timesteps=t.float(), context=context)

    def tokenize(self, captions: list[str]) -> list[list[int]]:
        """First 77-token window of each caption, parentheses escaped (ComfyUI reads them as weights)."""
        out = []
        for c in captions:
            c = c.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            toks = self.clip.tokenize(c)["l"][0]
            out.append([int(tok) for tok, _w in toks])
        return out

    def encode_fn(self, captions: list[str]):
        z, _pooled = self.te(self.tokenize(captions))[:2]
        return z

    @torch.no_grad()
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] → scaled latents (what the UNet sees)."""
        lat = self.vae.encode(images.movedim(1, -1))
        return self.model.model.latent_format.process_in(lat.float())

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → [B,H,W,3] images in [0,1] (for the sample images)."""
        return self.vae.decode(self.model.model.latent_format.process_out(latents.float())).clamp(0, 1)

    def vae_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.vae.get_sd().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- what to train
    def inject(self, rank: int, alpha: float, unet_targets: str = "attention", train_text_encoder: bool = False,
               seed: int = 0):
        patterns = UNET_ALL_TARGETS if unet_targets == "all" else UNET_ATTENTION_TARGETS
        groups = {"lora_unet": inject_lora(self.unet, patterns, rank, alpha, seed=seed, prefix="lora_unet.")}
        for m in groups["lora_unet"].values():
            m.to(self.device)
        if train_text_encoder:
            groups["lora_te"] = inject_lora(self.te_root, TEXT_ENCODER_TARGETS, rank, alpha, seed=seed,
                                            prefix="lora_te.")
            for m in groups["lora_te"].values():
                m.to(self.device)
        return groups

    def checkpoint_modules(self):
        """Blocks whose activations gradient checkpointing recomputes (ResBlocks, transformers, CLIP layers)."""
        names = {"ResBlock", "SpatialTransformer", "CLIPLayer"}
        return [m for root in (self.unet, self.te) for m in root.modules() if type(m).__name__ in names]

    def lora_key_map(self) -> set[str]:
        """Every LoRA key prefix ComfyUI's LoraLoader maps for this model (comfy.lora's own key maps).

        Computed once before any LoRA is injected: the maps are built from state-dict names, which the
        wrappers change (``...fc1.base.weight``).
        """
        return self._key_map

    def _compute_key_map(self) -> set[str]:
        return set(models.lora_key_map(self.model, self.clip))

    def save_full_checkpoint(self, path: str, metadata: dict[str, str]) -> None:
        """Single-file checkpoint (UNet + CLIP + VAE) through ComfyUI's own saver, written atomically."""
        from ..common.files import atomic_write

        atomic_write(path, lambda tmp: models.save_checkpoint(tmp, self.model, self.clip, self.vae, metadata=metadata))
