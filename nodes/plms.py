"""PLMS sampler node: AtelierPLMSSampler (a SAMPLER) and the ``plms`` name in the stock sampler lists.

The maths is ``samplers/plms.py``; this module only adds ComfyUI's seeded noise (through ``host.sampling``)
and registers the name. Registration runs at import (ComfyUI imports the pack before it validates any
prompt, so a workflow saved with ``plms`` loads after a restart) and does nothing outside ComfyUI.
"""
import logging

from ..host import sampling
from ..samplers.plms import FIRST_STEPS, sample_plms

SAMPLER_NAME = "plms"
log = logging.getLogger(__name__)


def comfy_sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4,
                      first_step="pseudo_improved_euler", eta=0.0, noise_sampler=None):
    """``sample_plms`` with ComfyUI's seeded noise, as stock ancestral samplers build it from ``extra_args``."""
    if eta > 0 and noise_sampler is None:
        noise_sampler = sampling.default_noise_sampler(x, (extra_args or {}).get("seed"))
    return sample_plms(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, order=order,
                       first_step=first_step, eta=eta, noise_sampler=noise_sampler)


def register_sampler_name():
    """Add ``plms`` to ComfyUI's sampler lists once (``host.sampling.register_sampler``: never replaces an
    existing name or function). True when ``plms`` is usable by name, False outside ComfyUI."""
    return sampling.register_sampler(SAMPLER_NAME, comfy_sample_plms, log=log)


class AtelierPLMSSampler:
    DESCRIPTION = (
        "PLMS with DDIM transfer (CompVis Stable Diffusion's PLMS, the sampler of \"Creative Painting with Latent "
        "Diffusion Models\"): a pseudo improved Euler first step, then "
        "Adams-Bashforth 2/3/4 on the predicted noise. N steps cost N + 1 model calls. Use with SamplerCustom "
        "or SamplerCustomAdvanced and the ddim_uniform scheduler for the CompVis schedule."
    )
    CATEGORY = "atelier/sampling"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("A PLMS sampler for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "order": ("INT", {"default": 4, "min": 1, "max": 4, "step": 1,
                                  "tooltip": "Highest Adams-Bashforth order. 4 is CompVis PLMS; 2 is steadier at "
                                             "very few steps or high cfg; 1 is plain DDIM after the first step."}),
                "first_step": (list(FIRST_STEPS), {"default": FIRST_STEPS[0],
                               "tooltip": "pseudo_improved_euler: CompVis' start, one extra model call. euler: "
                                          "no extra call (then the sampler equals the stock ipndm)."}),
                "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": False,
                                  "tooltip": "DDIM noise per step. 0 = deterministic CompVis PLMS (neutral). > 0 "
                                             "adds seeded noise like DDIM eta; the multistep history then mixes "
                                             "states before and after each noise, so accuracy drops."}),
            }
        }

    def get_sampler(self, order, first_step, eta):
        options = {"order": int(order), "first_step": first_step, "eta": float(eta)}
        return (sampling.ksampler_object(comfy_sample_plms, options),)


NODE_CLASS_MAPPINGS = {"AtelierPLMSSampler": AtelierPLMSSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierPLMSSampler": "PLMS Sampler (Atelier)"}

register_sampler_name()
