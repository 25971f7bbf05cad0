"""Sample images during training, rendered with the pack's PLMS (samplers/plms.py, the sampler of "Creative
Painting with Latent Diffusion Models") on the model being trained.

Pure: the UNet, the text encoder and the VAE decoder come in as callables, the noise schedule as the training
one. The denoiser is the k-diffusion one the sampler expects: x = x0 + σ·ε, the UNet sees x/√(1+σ²) at the
timestep of σ, classifier-free guidance against the empty prompt.
"""
from __future__ import annotations

import os

import torch

from ..common.files import atomic_write
from ..samplers.plms import sample_plms


def timestep_sigmas(schedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, σ's + a final 0) of ``steps`` evenly spaced training timesteps, highest first."""
    n = schedule.num_timesteps
    t = torch.linspace(n - 1, 0, steps).round().long()
    sig = schedule.sigmas()[t]
    return t, torch.cat([sig, sig.new_zeros(1)])


def make_denoiser(unet_fn, schedule, timesteps, sigmas, cond, uncond, cfg: float):
    """D(x, σ) for the PLMS sampler, with CFG: ε = ε_u + cfg·(ε_c − ε_u)."""
    table = {round(float(s), 6): int(t) for s, t in zip(sigmas[:-1], timesteps)}

    def denoise(x, sigma):
        s = float(sigma[0])
        t = torch.full((x.shape[0],), table[round(s, 6)], device=x.device)
        x_t = x / (1 + s * s) ** 0.5
        ctx = torch.cat([uncond.expand(x.shape[0], *uncond.shape[1:]), cond.expand(x.shape[0], *cond.shape[1:])])
        out = unet_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), ctx).float()
        if schedule.prediction == "v_prediction":  # ε = √ᾱ·v + √(1−ᾱ)·x_t
            ac = float(schedule.alphas_cumprod[table[round(s, 6)]])
            out = ac ** 0.5 * out + (1 - ac) ** 0.5 * torch.cat([x_t, x_t])
        eps_u, eps_c = out.chunk(2)
        return x - s * (eps_u + cfg * (eps_c - eps_u))

    return denoise


@torch.no_grad()
def render(unet_fn, encode_fn, decode_fn, schedule, prompts: list[str], size: tuple[int, int], steps: int = 20,
           cfg: float = 5.0, seed: int = 0, device="cpu", channels: int = 4) -> list[torch.Tensor]:
    """One [H, W, 3] uint8 image per prompt (width, height = ``size``), prompt i from noise seed ``seed + i``."""
    timesteps, sigmas = timestep_sigmas(schedule, steps)
    uncond = encode_fn([""])
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn((1, channels, size[1] // 8, size[0] // 8), generator=g).to(device) * float(sigmas[0])
        model = make_denoiser(unet_fn, schedule, timesteps, sigmas, encode_fn([prompt]), uncond, cfg)
        latent = sample_plms(model, x, sigmas.to(device), disable=True)
        pixels = decode_fn(latent)[0].float().clamp(0, 1)
        images.append((pixels * 255).round().to(torch.uint8).cpu())
    return images


def save_png(path: str, image: torch.Tensor, text: str = "") -> None:
    """An [H, W, 3] uint8 image as PNG (the prompt in its ``parameters`` text chunk), written atomically."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(image.numpy()).save(tmp, format="PNG", pnginfo=info))
