"""CLIP guidance for k-diffusion-style denoisers ("Generate Stunning Artworks with CLIP Guided Diffusion", 2022).

At every model call the denoised prediction x0 is decoded to pixels (full VAE decoder or TAESD: any
callable), cut into ``cutn`` random crops, embedded by CLIP, and the gradient of

    clip_scale * spherical_distance(crops, weighted targets) + tv_scale * TV + range_scale * range
    (+ saturation_scale * saturation)

with respect to the *latent* x0 is used to move x0. The gradient is taken on the decoded prediction only,
never through the UNet: with the UNet Jacobian dx0/dx replaced by its Gaussian-prior value
sigma_data^2 / (sigma^2 + sigma_data^2), k-diffusion's conditioned denoiser D + sigma^2 * grad_x log p becomes

    D'(x, sigma) = D(x, sigma) - w(sigma) * clamp(grad_x0 L),   w = sigma^2 / (sigma^2 + sigma_data^2)

so a guided step costs a plain step + decoder forward/backward + CLIP forward/backward, instead of the
~10x of guidance that backpropagates through the UNet (AUTOMATIC1111 PR #5902; see docs/clip_guidance.md).
w is below 1, so with clamping on, ``clamp_max`` bounds the RMS change of x0 per model call.

Everything runs under ``torch.inference_mode(False)`` on cloned tensors (ComfyUI samples in inference
mode) and gradients are requested for the latent only (``torch.autograd.grad(..., inputs=[latent])``), so
weights that happen to have ``requires_grad=True`` never accumulate ``.grad``.

No ComfyUI import here: the decoder, the pixel embedder and the denoiser are plain callables, and the nodes
pass ComfyUI's objects in from the host (the CFGGuider class to extend, the TAESD files, the VAE, a
``common.progress.Progress`` for interrupts); see the setup, decoder and guider sections at the end.
"""
from __future__ import annotations

import copy
import contextlib
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..common.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

LOSS_FNS = ("spherical", "cos_spherical")
SCHEDULES = ("constant", "linear", "cosine")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------- options
@dataclass
class GuidanceOptions:
    """Knobs of CLIP guidance; defaults are the article's ("Generate Stunning Artworks with CLIP Guided
    Diffusion", 2022, after clip-diffusion-art).

    The article multiplies clip/tv/range (not saturation) by ``scale_multiplier`` (50); we keep that so its
    numbers can be typed in unchanged.
    """

    clip_scale: float = 5000.0
    tv_scale: float = 100.0
    range_scale: float = 150.0
    saturation_scale: float = 0.0
    scale_multiplier: float = 50.0
    cutn: int = 16
    cut_batches: int = 4
    cut_pow: float = 1.0
    augment: bool = True
    clamp_max: float = 0.05  # RMS bound of the latent gradient per sample; 0 disables clamping
    loss_fn: str = "spherical"
    start_percent: float = 0.0  # fraction of the steps where guidance starts
    end_percent: float = 1.0  # ... and where it stops
    schedule: str = "constant"  # scale per step inside [start, end)
    sigma_data: float = 1.0  # std of the (scaled) latents; SD latents are ~1
    decoder_checkpoint: bool = False  # recompute the decoder instead of keeping its graph (less memory)
    autocast: bool = True  # run CLIP in half precision on CUDA

    def validate(self):
        """Raise ValueError naming the bad knob and the fix."""
        if int(self.cutn) < 1:
            raise ValueError(f"cutn must be at least 1 (got {self.cutn}): CLIP guidance needs at least one cutout")
        if int(self.cut_batches) < 1:
            raise ValueError(f"cut_batches must be at least 1 (got {self.cut_batches})")
        if self.cut_pow <= 0:
            raise ValueError(f"cut_pow must be > 0 (got {self.cut_pow}); 1.0 spreads cut sizes uniformly")
        if self.clamp_max < 0:
            raise ValueError(f"clamp_max must be >= 0 (got {self.clamp_max}); 0 disables clamping")
        if self.loss_fn not in LOSS_FNS:
            raise ValueError(f"loss_fn must be one of {LOSS_FNS} (got {self.loss_fn!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} (got {self.schedule!r})")
        if not (0.0 <= self.start_percent <= 1.0 and 0.0 <= self.end_percent <= 1.0):
            raise ValueError("start_percent and end_percent must lie in [0, 1]")
        if self.start_percent > self.end_percent:
            raise ValueError(
                f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent}): swap them"
            )
        for name in ("clip_scale", "tv_scale", "range_scale", "saturation_scale", "scale_multiplier"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (got {value})")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0 (got {self.sigma_data})")
        return self

    @property
    def is_off(self):
        """clip_scale 0 (or multiplier 0) turns guidance off: TV/range/saturation only regularise it."""
        return self.clip_scale * self.scale_multiplier == 0


# ----------------------------------------------------------------------------------------------- targets
_WEIGHT_RE = re.compile(r"^(.*):\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.S)


def parse_weighted_prompts(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (prompt, weight) pairs.

    Prompts are separated by new lines or ``|``; ``"a red barn:2"`` has weight 2, a prompt without a
    numeric ``:weight`` tail has weight 1 (so ``"style: baroque"`` stays one prompt). Negative weights push
    away from a prompt.
    """
    pairs = []
    for chunk in re.split(r"[\n|]", text or ""):
        chunk = chunk.strip()
        if not chunk:
            continue
        match = _WEIGHT_RE.match(chunk)
        if match and match.group(1).strip():
            pairs.append((match.group(1).strip(), float(match.group(2))))
        else:
            pairs.append((chunk, 1.0))
    return pairs


@dataclass
class Targets:
    """Target embeddings (L2-normalised rows) and their weights, normalised by |sum of weights|."""

    embeddings: torch.Tensor
    weights: torch.Tensor
    labels: list = field(default_factory=list)

    def to(self, device):
        return replace(self, embeddings=self.embeddings.to(device), weights=self.weights.to(device))


def build_targets(text_embeds: Optional[torch.Tensor] = None, text_weights: Sequence[float] = (),
                  image_embeds: Optional[torch.Tensor] = None, image_weight: float = 1.0,
                  labels: Sequence[str] = ()) -> Targets:
    """Combine text targets (one weight each) and image targets (``image_weight`` shared equally).

    Weights are divided by |sum|, as in the article, so the clip scale means the same for any number of
    targets; a list whose weights cancel out is refused.
    """
    rows, weights, names = [], [], list(labels)
    if text_embeds is not None and len(text_embeds):
        if len(text_weights) != len(text_embeds):
            raise ValueError(f"{len(text_embeds)} text embeddings but {len(text_weights)} weights")
        rows.append(text_embeds.float())
        weights.extend(float(w) for w in text_weights)
    if image_embeds is not None and len(image_embeds) and image_weight != 0:
        rows.append(image_embeds.float().to(rows[0].device if rows else image_embeds.device))
        weights.extend([float(image_weight) / len(image_embeds)] * len(image_embeds))
        names.extend(f"image {i}" for i in range(len(image_embeds)))
    if not rows:
        raise ValueError(
            "CLIP guidance has no target: give at least one text target (one per line or separated by '|', "
            "optionally 'text:weight') or connect style neighbours with a non-zero style weight"
        )
    emb = F.normalize(torch.cat(rows), dim=-1)
    w = torch.tensor(weights, dtype=torch.float32, device=emb.device)
    total = w.sum().abs()
    if total < 1e-3:
        raise ValueError(f"the target weights {weights} sum to zero: make their sum non-zero")
    return Targets(emb, w / total, names)


# ----------------------------------------------------------------------------------------------- cutouts
def _affine_augment(cuts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Seeded, differentiable augmentations like the article's: flip (p .5), rotation ±15°, shift ±10%, grey (p .15)."""
    n = cuts.shape[0]
    dev, dtype = cuts.device, cuts.dtype
    r = torch.rand(n, 5, generator=generator)
    angle = (r[:, 0] * 2 - 1) * math.radians(15)
    flip = torch.where(r[:, 1] < 0.5, -1.0, 1.0)
    shift = (r[:, 2:4] * 2 - 1) * 0.2  # grid units are [-1, 1]: 0.2 == 10% of the side
    grey = (r[:, 4] < 0.15).to(torch.float32)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
    ], dim=1).to(dev, dtype)
    grid = F.affine_grid(theta, list(cuts.shape), align_corners=False)
    out = F.grid_sample(cuts, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    lum = (out * torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    g = grey.to(dev, dtype).view(n, 1, 1, 1)
    return out * (1 - g) + lum.expand_as(out) * g


def make_cutouts(pixels: torch.Tensor, cut_size: int, cutn: int, cut_pow: float = 1.0,
                 generator: Optional[torch.Generator] = None, augment: bool = False) -> torch.Tensor:
    """Random square crops of ``pixels`` [B,3,H,W], resized to ``cut_size``: returns [cutn*B, 3, s, s].

    Row ``k*B + b`` is cut k of sample b (the same crop box for every sample). Side lengths are
    lo + (hi - lo) * u**cut_pow with hi = min(H, W), lo = min(hi, cut_size), u ~ U(0,1): cut_pow > 1
    favours small (detail) crops, < 1 large (composition) ones. Random numbers come from ``generator``
    (CPU) so cutouts are reproducible for a seed on any device.
    """
    if cutn < 1:
        raise ValueError(f"cutn must be at least 1 (got {cutn})")
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be [B, C, H, W], got shape {tuple(pixels.shape)}")
    b, _, h, w = pixels.shape
    hi = min(h, w)
    lo = min(hi, cut_size)
    u = torch.rand(cutn, 3, generator=generator)
    cuts = []
    for k in range(cutn):
        size = int(lo + (hi - lo) * float(u[k, 0]) ** cut_pow)
        size = max(1, min(size, hi))
        oy = int(float(u[k, 1]) * (h - size + 1))
        ox = int(float(u[k, 2]) * (w - size + 1))
        crop = pixels[:, :, oy:oy + size, ox:ox + size]
        if size > cut_size:
            crop = F.interpolate(crop, size=(cut_size, cut_size), mode="area")
        elif size < cut_size:
            crop = F.interpolate(crop, size=(cut_size, cut_size), mode="bilinear", align_corners=False)
        cuts.append(crop)
    out = torch.cat(cuts)
    if augment:
        out = _affine_augment(out, generator)
    return out


# ----------------------------------------------------------------------------------------------- losses
def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance / 2 between directions: 2 * arcsin(|a^ - b^| / 2)^2 (0 .. pi^2/2)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def cos_spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The article's ``cos_spherical``: spherical distance + 0.5 * exp(2 * (1 - cos))."""
    cos = F.cosine_similarity(a, b, dim=-1)
    return spherical_distance(a, b) + 0.5 * torch.exp((1 - cos) / 0.5)


def clip_loss(image_embeds: torch.Tensor, targets: Targets, batch: int, loss_fn: str = "spherical") -> torch.Tensor:
    """Per-sample loss [B]: weighted sum over targets of the distance, averaged over the cuts."""
    dist = spherical_distance if loss_fn == "spherical" else cos_spherical_distance
    d = dist(image_embeds.float().unsqueeze(1), targets.embeddings.unsqueeze(0))  # [cutn*B, N]
    d = d.view(-1, batch, d.shape[-1])
    return (d * targets.weights).sum(-1).mean(0)


def tv_loss(pixels: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 total variation: mean of dx^2 + dy^2 with the last row/column replicated."""
    p = F.pad(pixels, (0, 1, 0, 1), mode="replicate")
    dx = p[..., :-1, 1:] - p[..., :-1, :-1]
    dy = p[..., 1:, :-1] - p[..., :-1, :-1]
    return (dx ** 2 + dy ** 2).mean(dim=(1, 2, 3))


def range_loss(pixels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared excess outside [-1, 1]."""
    return (pixels - pixels.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))


def saturation_loss(pixels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute excess outside [-1, 1] (the article's saturation term: an L1 range loss)."""
    return (pixels - pixels.clamp(-1, 1)).abs().mean(dim=(1, 2, 3))


def clamp_grad(grad: torch.Tensor, max_rms: float) -> torch.Tensor:
    """Scale each sample's gradient so its RMS is at most ``max_rms`` (0 disables), keeping its direction."""
    if max_rms <= 0:
        return grad
    rms = grad.float().pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
    factor = torch.where(rms > max_rms, max_rms / rms.clamp(min=1e-30), torch.ones_like(rms))
    return grad * factor.to(grad.dtype)


# ----------------------------------------------------------------------------------------------- schedule
class GuidanceSchedule:
    """Which model calls are guided and how strongly (0..1), from the sampler's sigma list.

    A call at sigma belongs to step i when sigmas[i] >= sigma > sigmas[i+1] (calls between steps, e.g.
    Heun's or PLMS' extra evaluation, belong to the step they land in). Guidance is on for
    start_percent <= i/steps < end_percent (end_percent 1 includes the last step); inside, the weight is
    constant, or falls linearly / along a quarter cosine to 0 at end_percent.
    """

    def __init__(self, sigmas: Optional[torch.Tensor], start_percent=0.0, end_percent=1.0, schedule="constant"):
        self.sigmas = None if sigmas is None else torch.as_tensor(sigmas).detach().float().cpu()
        self.start, self.end, self.shape = float(start_percent), float(end_percent), schedule

    def step_index(self, sigma: float) -> tuple[int, int]:
        """(step the call at ``sigma`` belongs to, number of steps)."""
        if self.sigmas is None or len(self.sigmas) < 2:
            return 0, 1
        steps = len(self.sigmas) - 1
        at_or_above = int((self.sigmas[:-1] >= sigma * (1 - 1e-4)).sum())
        return max(0, min(steps - 1, at_or_above - 1)), steps

    def weight(self, sigma: float) -> float:
        i, steps = self.step_index(float(sigma))
        f = i / steps
        if f < self.start or (f >= self.end and self.end < 1.0) or self.end <= self.start:
            return 0.0
        if self.shape == "constant":
            return 1.0
        t = (f - self.start) / max(self.end - self.start, 1e-12)
        t = min(max(t, 0.0), 1.0)
        return 1.0 - t if self.shape == "linear" else math.cos(t * math.pi / 2)


# ----------------------------------------------------------------------------------------------- embedders
def _has_inference_params(module: torch.nn.Module) -> bool:
    return any(t.is_inference() for t in list(module.parameters()) + list(module.buffers()))


def grad_ready_copy(module: torch.nn.Module, skip: Sequence[str] = ()) -> torch.nn.Module:
    """A copy of ``module`` that autograd can differentiate through.

    Modules built or loaded inside ``torch.inference_mode()`` (everything ComfyUI loads) hold inference
    tensors, which "cannot be saved for backward"; a deepcopy made outside inference mode holds normal
    tensors. Submodules named in ``skip`` (e.g. a VAE's encoder) are left out to save memory. Parameters of
    the copy do not require grad, so no weight gradient is ever computed.
    """
    memo = {id(getattr(module, name)): None for name in skip if getattr(module, name, None) is not None}
    with torch.inference_mode(False):
        out = copy.deepcopy(module, memo)
        out.requires_grad_(False)
    return out


def _first_stat(clip, visual, names, default):
    """Mean/std as a [1,3,1,1] tensor from the embedder or its tower (OpenAI's when neither says)."""
    for owner in (clip, visual):
        for name in names:
            value = getattr(owner, name, None)
            if value is not None:
                with torch.inference_mode(False):
                    return torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(1, 3, 1, 1)
    return torch.tensor(default, dtype=torch.float32).view(1, 3, 1, 1)


def make_pixel_embedder(clip) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable ``pixels [B,3,H,W] in [0,1] -> CLIP image embedding`` for an ATELIER_CLIP.

    Uses the contract's ``clip.embed_pixels`` when its weights are normal tensors. When they are
    inference tensors (the model was loaded inside ComfyUI's inference mode), it embeds with a
    grad-ready copy of the image tower, resizing to ``clip.image_size`` and normalising with the model's
    mean/std (OpenAI's when it does not say).
    """
    visual = getattr(getattr(clip, "model", None), "visual", None)
    if visual is None or not _has_inference_params(visual):
        return clip.embed_pixels
    tower = grad_ready_copy(visual)
    size = int(clip.image_size)
    mean = _first_stat(clip, visual, ("mean", "image_mean"), OPENAI_MEAN)
    std = _first_stat(clip, visual, ("std", "image_std"), OPENAI_STD)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        p = next(tower.parameters())
        x = pixels.to(p.device)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        m = mean.to(device=x.device, dtype=x.dtype)
        s = std.to(device=x.device, dtype=x.dtype)
        return tower(((x - m) / s).to(p.dtype))

    embed.tower = tower  # kept for tests and for freeing
    return embed


# ----------------------------------------------------------------------------------------------- guidance
class CLIPGuidance:
    """Turns a denoised prediction into a CLIP-guided one (see the module docstring for the formula).

    ``decode(latent) -> pixels in [-1, 1]`` must be differentiable; ``embed(pixels in [0,1]) -> [N, dim]``
    likewise (not normalised). ``seed`` seeds the cutouts and augmentations, so a run is reproducible.
    """

    def __init__(self, embed: Callable, cut_size: int, targets: Targets, decode: Callable,
                 options: Optional[GuidanceOptions] = None, sigmas: Optional[torch.Tensor] = None,
                 seed: int = 0):
        self.options = (options or GuidanceOptions()).validate()
        self.embed, self.decode, self.cut_size = embed, decode, int(cut_size)
        self.targets = targets
        self.generator = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.set_sigmas(sigmas)
        self.last = {}  # loss terms of the last guided call, for reports

    def set_sigmas(self, sigmas):
        o = self.options
        self.schedule = GuidanceSchedule(sigmas, o.start_percent, o.end_percent, o.schedule)

    def reseed(self, seed: int):
        self.generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)

    def _autocast(self, device: torch.device):
        if self.options.autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def loss_grad(self, x0: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Gradient of the total loss w.r.t. the latent ``x0`` (unclamped), and the loss terms (floats)."""
        o = self.options
        m = o.scale_multiplier
        with torch.inference_mode(False), torch.enable_grad():
            latent = x0.detach().clone().requires_grad_(True)
            if o.decoder_checkpoint:
                with torch.no_grad():
                    pixels = self.decode(latent)
            else:
                pixels = self.decode(latent)
            if pixels.ndim != 4 or pixels.shape[1] != 3:
                raise ValueError(f"the decoder must return [B, 3, H, W] pixels, got {tuple(pixels.shape)}")
            if not torch.isfinite(pixels).all():
                raise FloatingPointError(
                    "the decoder returned NaN/inf pixels: check the VAE/TAESD weights, or decode in fp32")
            pix = pixels.detach().float().requires_grad_(True)
            batch = pix.shape[0]
            pix_grad = torch.zeros_like(pix)
            terms = {"clip": 0.0, "tv": 0.0, "range": 0.0, "saturation": 0.0}
            targets = self.targets.to(pix.device)  # clones: targets made in inference mode are inference tensors
            targets = replace(targets, embeddings=targets.embeddings.clone(), weights=targets.weights.clone())
            if o.clip_scale * m != 0:
                for _ in range(o.cut_batches):
                    cuts = make_cutouts((pix + 1) / 2, self.cut_size, o.cutn, o.cut_pow, self.generator, o.augment)
                    with self._autocast(pix.device):
                        emb = self.embed(cuts)
                    loss = clip_loss(emb.float().to(pix.device), targets, batch, o.loss_fn)
                    terms["clip"] += float(loss.detach().sum()) / o.cut_batches
                    (g,) = torch.autograd.grad(loss.sum() * (o.clip_scale * m / o.cut_batches), [pix])
                    pix_grad += g
            aux = pix.new_zeros(())
            for name, fn, scale in (("tv", tv_loss, o.tv_scale * m), ("range", range_loss, o.range_scale * m),
                                    ("saturation", saturation_loss, o.saturation_scale)):
                if scale != 0:
                    value = fn(pix).sum()
                    terms[name] = float(value.detach())
                    aux = aux + value * scale
            if aux.requires_grad:
                (g,) = torch.autograd.grad(aux, [pix])
                pix_grad += g
            if o.decoder_checkpoint:
                pixels = self.decode(latent)
            (grad,) = torch.autograd.grad(pixels, [latent], grad_outputs=pix_grad.to(pixels.dtype))
        if not torch.isfinite(grad).all():
            raise FloatingPointError(
                "CLIP guidance produced a non-finite gradient: lower the scales, turn clamping on, or decode in fp32"
            )
        return grad.detach(), terms

    def __call__(self, denoised: torch.Tensor, sigma) -> torch.Tensor:
        """Guided denoised prediction; returns ``denoised`` itself when guidance is off at this sigma."""
        o = self.options
        s = float(torch.as_tensor(sigma).reshape(-1)[0]) if not isinstance(sigma, (int, float)) else float(sigma)
        weight = self.schedule.weight(s)
        if weight == 0 or o.is_off or s <= 0:
            return denoised
        grad, terms = self.loss_grad(denoised)
        sd2 = o.sigma_data ** 2
        grad_vp = grad * (math.sqrt(1 + s * s) * sd2 / (s * s + sd2))  # dL/dx_t, Gaussian-prior Jacobian
        grad_vp = clamp_grad(grad_vp, o.clamp_max)
        w = weight * s * s / math.sqrt(1 + s * s)
        self.last = dict(terms, sigma=s, weight=w, grad_rms=float(grad_vp.float().pow(2).mean().sqrt()))
        return denoised - (grad_vp * w).to(denoised.dtype)


def make_guided_denoiser(model: Callable, guidance: CLIPGuidance) -> Callable:
    """Wrap a k-diffusion denoiser ``model(x, sigma, **extra) -> x0`` so every call is CLIP-guided."""

    def guided(x, sigma, **extra):
        return guidance(model(x, sigma, **extra), sigma)

    return guided


# ----------------------------------------------------------------------------------------------- setup
DECODERS = ("taesd", "vae")
TAESD_URL = "https://github.com/madebyollin/taesd (file taesd_decoder.safetensors for SD1.x)"


@dataclass(frozen=True)
class TaesdFiles:
    """Where the TAESD decoders come from, as the host sees ComfyUI's ``models/vae_approx``: the file names
    there, the folder paths (for messages), a safe loader (file name -> state dict) and an empty TAESD for a
    latent channel count."""

    names: Callable[[], Sequence[str]]
    folders: Callable[[], Sequence[str]]
    load: Callable[[str], dict]
    new_taesd: Callable[[int], torch.nn.Module]


@dataclass
class GuidanceSetup:
    """Everything a guided run needs except the model-dependent parts built at sampling time (the decoder
    for the model's latent format, the embedder, the sigma schedule)."""

    clip: object
    targets: Targets
    options: GuidanceOptions
    decoder: str
    vae: object = None
    report: str = ""
    taesd: Optional[TaesdFiles] = None

    def start(self, latent_format, channels: int, device, sigmas, seed) -> "CLIPGuidance":
        """The guidance of one sampling run: decoder for ``latent_format`` on ``device``, embedder, schedule."""
        if channels != latent_format.latent_channels:
            raise ValueError(f"latent has {channels} channels, the model expects {latent_format.latent_channels}")
        if self.decoder == "taesd":
            decode = taesd_decoder(latent_format, device, self.taesd)
        else:
            decode = vae_decoder(self.vae, latent_format, device)
        return CLIPGuidance(make_pixel_embedder(self.clip), self.clip.image_size, self.targets, decode, self.options,
                            sigmas=sigmas, seed=seed or 0)


def build_setup(clip, text_targets, decoder, vae=None, neighbors=None, style_weight=1.0, decoder_checkpoint="auto",
                taesd=None, **knobs) -> GuidanceSetup:
    """Validate the nodes' inputs and embed the targets once (not per step); ``knobs`` are GuidanceOptions
    fields. ``taesd`` says where TAESD files are found (needed for ``decoder = 'taesd'`` at sampling time)."""
    if clip is None or not hasattr(clip, "encode_text"):
        raise ValueError("connect an ATELIER_CLIP (Atelier open_clip Loader) to the 'clip' input")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}")
    if decoder == "vae" and vae is None:
        raise ValueError("decoder = 'vae' needs the 'vae' input connected (or choose decoder = 'taesd')")
    ckpt = {"on": True, "off": False}.get(decoder_checkpoint, decoder == "vae")
    options = GuidanceOptions(decoder_checkpoint=ckpt, **knobs).validate()
    pairs = parse_weighted_prompts(text_targets)
    text_embeds = clip.encode_text([p for p, _ in pairs]).float().cpu() if pairs else None
    image_embeds = None
    if neighbors is not None:
        image_embeds = _neighbor_embeddings(clip, neighbors)
    targets = build_targets(text_embeds, [w for _, w in pairs], image_embeds, style_weight,
                            labels=[p for p, _ in pairs])
    report = "CLIP guidance targets ({}): ".format(getattr(clip, "name", "clip")) + ", ".join(
        f"{name} ({w:+.3f})" for name, w in zip(targets.labels, targets.weights.tolist()))
    return GuidanceSetup(clip, targets, options, decoder, vae, report, taesd)


def _neighbor_embeddings(clip, neighbors):
    emb = getattr(neighbors, "embeddings", None)
    if emb is None or len(emb) == 0:
        raise ValueError("the connected ATELIER_NEIGHBORS holds no embeddings: retrieve at least one neighbour")
    if emb.shape[-1] != clip.dim:
        raise ValueError(
            f"the style neighbours are {emb.shape[-1]}-d embeddings but the CLIP model '{clip.name}' is {clip.dim}-d: "
            "load the open_clip model the style database was built with")
    n_hash, c_hash = getattr(neighbors, "embedder_hash", None), getattr(clip, "weights_hash", None)
    if n_hash and c_hash and n_hash != c_hash:
        raise ValueError(
            f"the style neighbours were embedded with '{getattr(neighbors, 'embedder_name', '?')}' ({n_hash}) but the "
            f"guidance CLIP is '{clip.name}' ({c_hash}): their spaces differ; load the database's model")
    return emb.float().cpu()


# ----------------------------------------------------------------------------------------------- decoders
def taesd_file(latent_format, files: TaesdFiles) -> str:
    """The vae_approx file name of the TAESD decoder for the model's latent format (what ComfyUI's previews
    load); the errors say which file to download and where to put it."""
    name = getattr(latent_format, "taesd_decoder_name", None)
    if name is None:
        raise ValueError(f"ComfyUI has no TAESD for this model's latent format ({type(latent_format).__name__}): "
                         "choose decoder = 'vae' and connect its VAE")
    found = [f for f in files.names() if f.startswith(name + ".")]
    if not found:
        folders = ", ".join(files.folders())
        raise FileNotFoundError(
            f"TAESD decoder '{name}.safetensors' not found in models/vae_approx ({folders}). Download it from "
            f"{TAESD_URL} into that folder, or choose decoder = 'vae'.")
    return found[0]


def taesd_decoder(latent_format, device, files: TaesdFiles) -> Callable:
    """TAESD decoder for the model's latent space (model-space latent -> pixels in [-1, 1], scale 1 and shift 0
    as for previews), loaded and built outside inference mode so autograd can go through it."""
    if files is None:
        raise ValueError("decoder = 'taesd' needs the host's TAESD files (TaesdFiles); or choose decoder = 'vae'")
    name = taesd_file(latent_format, files)
    with torch.inference_mode(False):
        sd = files.load(name)
        first = sd.get("1.weight")
        channels = latent_format.latent_channels
        if first is None or first.shape[1] != channels:
            got = None if first is None else first.shape[1]
            raise ValueError(f"'{name}' decodes {got}-channel latents but the model's latents have {channels} "
                             "channels: use the TAESD made for this model family, or decoder = 'vae'")
        taesd = files.new_taesd(channels)
        taesd.taesd_decoder.load_state_dict(sd)
        taesd.taesd_encoder = None  # only decoding is needed
        taesd.requires_grad_(False)
        taesd = taesd.to(device=device, dtype=torch.float32)

    def decode(latent):
        return taesd.decode(latent.float())

    decode.net = taesd
    return decode


def vae_decoder(vae, latent_format, device) -> Callable:
    """Grad-ready copy of a ComfyUI VAE's decoder (its weights are inference tensors): model-space latent ->
    pixels in [-1, 1]."""
    channels = latent_format.latent_channels
    if getattr(vae, "latent_channels", channels) != channels:
        raise ValueError(f"the VAE takes {vae.latent_channels}-channel latents but the model makes {channels}-channel "
                         "ones: connect the VAE of the same model family")
    if getattr(vae, "latent_dim", 2) != 2:
        raise ValueError("CLIP guidance needs an image VAE (2-D latents), not a video or audio VAE")
    dtype = getattr(vae, "vae_dtype", torch.float32)
    net = grad_ready_copy(vae.first_stage_model, skip=("encoder", "taesd_encoder")).to(device=device, dtype=dtype)

    def decode(latent):
        raw = latent_format.process_out(latent)
        return net.decode(raw.to(dtype)).float()

    decode.net = net
    return decode


# ----------------------------------------------------------------------------------------------- guider
class CLIPGuidedCFG:
    """Mixed into ComfyUI's CFGGuider by :func:`guider_class`: CFG (positive/negative) whose combined denoised
    prediction is CLIP-guided at every model call, so every SAMPLER (PLMS included) is guided.

    Guidance acts on the CFG-combined prediction, i.e. on the conditional direction: applying it to the
    unconditional branch would be multiplied by (1 - cfg) and push *away* from the target (the bug diffusers'
    CLIP-guided pipeline had, huggingface/diffusers#596). ``progress.check_interrupt()`` runs before every
    guided call, so a cancel stops the run between model calls.
    """

    def __init__(self, model_patcher, setup: GuidanceSetup, progress: Progress = NO_PROGRESS):
        super().__init__(model_patcher)
        self.setup, self.progress = setup, progress
        self.guidance = None

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                     seed, *args, **kwargs):
        self.guidance = self.setup.start(self.inner_model.latent_format, noise.shape[1], device, sigmas, seed)
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, *args, **kwargs)
        finally:
            if self.guidance.last:
                log.info("Atelier CLIP guidance, last guided call: %s", self.guidance.last)
            self.guidance = None  # frees the decoder copy

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        denoised = super().predict_noise(x, timestep, model_options, seed)
        if self.guidance is None:
            return denoised
        self.progress.check_interrupt()
        return self.guidance(denoised, timestep)


_GUIDER_CLASSES = {}


def guider_class(cfg_guider: type) -> type:
    """The CLIP-guided subclass of ComfyUI's CFGGuider (``cfg_guider``, from the host), made once per base."""
    cls = _GUIDER_CLASSES.get(cfg_guider)
    if cls is None:
        cls = _GUIDER_CLASSES[cfg_guider] = type("AtelierCLIPGuiderObject", (CLIPGuidedCFG, cfg_guider), {})
    return cls


def make_guider(cfg_guider: type, model, positive, negative, cfg, progress: Progress = NO_PROGRESS,
                taesd: Optional[TaesdFiles] = None, **inputs):
    """A CLIP-guided GUIDER from the nodes' inputs (``inputs``: see :func:`build_setup`); its ``setup.report``
    lists the targets and their normalised weights."""
    guider = guider_class(cfg_guider)(model, build_setup(taesd=taesd, **inputs), progress)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider
