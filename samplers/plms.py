"""PLMS with DDIM transfer in ComfyUI's σ-space: the sampler of "Creative Painting with Latent Diffusion Models"
(arXiv 2209.14697, Algorithm 1), which is CompVis Stable Diffusion's PLMS.

With x = x0 + σ·ε and ᾱ = 1/(1+σ²), a deterministic DDIM step from σ to σ' is exactly
x' = x + (σ'−σ)·ε̂ with ε̂ = (x − D(x, σ))/σ. PLMS replaces ε̂ by an Adams–Bashforth combination of the
raw ε̂ history (a pseudo improved Euler step starts it) and keeps the DDIM step. See docs/plms.md.
"""
import math

import torch
from tqdm.auto import trange

FIRST_STEPS = ("pseudo_improved_euler", "euler")

# Adams–Bashforth weights on (ε̂_i, ε̂_{i-1}, ε̂_{i-2}, ε̂_{i-3}) for a uniform step, per order.
AB_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ab_combine(eps, history):
    """Adams–Bashforth combination of the current ε̂ with the newest-last ``history``.

    The order is ``len(history) + 1``; one new tensor is allocated, the inputs are not touched.
    """
    coeffs = AB_COEFFS[len(history) + 1]
    out = eps * coeffs[0]
    for c, h in zip(coeffs[1:], reversed(history)):
        out.add_(h, alpha=c)
    return out


def ddim_ancestral_sigmas(sigma, sigma_next, eta):
    """(σ_down, σ_up) of a DDIM step with noise ``eta`` from ``sigma`` to ``sigma_next``, in σ-space.

    DDIM adds σ_t·z in x_t-space with σ_t = η·sqrt((1−ᾱ')/(1−ᾱ))·sqrt(1−ᾱ/ᾱ'); dividing by sqrt(ᾱ') and
    using ᾱ = 1/(1+σ²) gives σ_up = η·σ'·sqrt(σ²−σ'²)/σ and σ_down = sqrt(σ'² − σ_up²) (the
    deterministic part then steps to σ_down). σ_up is capped at σ' for η > 1, as k-diffusion does.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma ** 2 - sigma_next ** 2) / sigma)
    sigma_down = math.sqrt(max(sigma_next ** 2 - sigma_up ** 2, 0.0))
    return sigma_down, sigma_up


def _check_options(order, first_step, eta):
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"PLMS: order must be an integer 1, 2, 3 or 4 (got {order!r}); 4 is the CompVis PLMS")
    if first_step not in FIRST_STEPS:
        raise ValueError(f"PLMS: first_step must be one of {', '.join(FIRST_STEPS)} (got {first_step!r})")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"PLMS: eta must be a finite number >= 0 (got {eta!r}); 0 is the deterministic CompVis PLMS")


def _sigma_list(sigmas):
    """The schedule as Python floats (one device sync), checked: 1-D, non-empty, finite, >= 0, descending."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(
            f"PLMS: sigmas must be a non-empty 1-D schedule (got shape {tuple(sigmas.shape)}); "
            "build it with a scheduler node, e.g. BasicScheduler with ddim_uniform"
        )
    values = [float(s) for s in sigmas.tolist()]
    if not all(math.isfinite(s) and s >= 0 for s in values):
        raise ValueError(f"PLMS: sigmas must be finite and >= 0 (got {values})")
    bad = [i for i in range(len(values) - 1) if not values[i + 1] < values[i]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"PLMS: sigmas must be strictly descending (sigmas[{i}]={values[i]:.6g} is followed by "
            f"sigmas[{i + 1}]={values[i + 1]:.6g}); reverse or deduplicate the schedule"
        )
    return values


def _eps(model, x, sigma, s_in, extra_args, step, steps):
    """Call the denoiser once; return (D, ε̂) and refuse non-finite model output."""
    denoised = model(x, sigma * s_in, **extra_args)
    if not torch.isfinite(denoised).all():
        raise FloatingPointError(
            f"PLMS: the model returned NaN or Inf at step {step + 1}/{steps} (sigma={sigma:.6g}). The sampler "
            "only combines model outputs: check the model's precision (try fp32), the conditioning and the cfg"
        )
    return denoised, (x - denoised) / sigma


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4,
                first_step="pseudo_improved_euler", eta=0.0, noise_sampler=None):
    """PLMS with DDIM transfer (Rombach et al. 2021 code; Algorithm 1 of arXiv 2209.14697), k-diffusion convention.

    Step 1 is a pseudo improved Euler step (one extra model call: N steps cost N + 1 calls) or, with
    ``first_step="euler"``, a plain DDIM step. Later steps use Adams–Bashforth of order
    min(``order``, steps taken + 1) on the raw ε̂ history, then a DDIM step. A step to σ = 0 returns the
    denoised prediction. ``order=1`` is DDIM.

    ``eta`` > 0 makes every step a DDIM step with noise η (an ancestral step: deterministic part to σ_down,
    then ``noise_sampler(σ, σ')``·σ_up added). For a multistep method this is an extension CompVis refuses:
    the history then holds ε̂ measured on states that received fresh noise in between, so the
    extrapolation no longer follows one smooth trajectory and the method loses its high order; it behaves
    like ancestral DDIM with a smoothed ε. ``eta=0`` is the CompVis behaviour. Without a
    ``noise_sampler`` the noise is unseeded ``torch.randn_like``.

    Runs under ``no_grad`` so no autograd graph is built even outside ComfyUI's inference mode.
    """
    _check_options(order, first_step, eta)
    sig = _sigma_list(sigmas)
    extra_args = {} if extra_args is None else extra_args
    if eta > 0 and noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    s_in = x.new_ones([x.shape[0]])
    steps = len(sig) - 1
    history = []
    for i in trange(steps, disable=disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, eps = _eps(model, x, sigma, s_in, extra_args, i, steps)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma_next == 0:  # only ever the last step: sigmas are strictly descending
            x = denoised
            continue
        if not history and first_step == "pseudo_improved_euler":
            x_pred = torch.add(x, eps, alpha=sigma_next - sigma)
            _, eps_next = _eps(model, x_pred, sigma_next, s_in, extra_args, i, steps)
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = ab_combine(eps, history[len(history) - min(order - 1, len(history)):])
        history.append(eps)
        if len(history) > 3:
            history.pop(0)
        sigma_down, sigma_up = ddim_ancestral_sigmas(sigma, sigma_next, eta)
        x = torch.add(x, eps_prime, alpha=sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x
