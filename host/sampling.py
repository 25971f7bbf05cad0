"""ComfyUI's sampling machinery as the pack uses it: sampler/scheduler lists, sigma schedules, SAMPLER
objects, the CFG guider to subclass, conditioning copies, noise, previews."""
import sys

# ComfyUI 0.15.1's lists, used only when ComfyUI is absent (schema checks); inside ComfyUI the live lists
# are returned, so samplers added later (``plms`` too) show up.
FALLBACK_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2", "plms",
]
FALLBACK_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                       "linear_quadratic", "kl_optimal"]


def _samplers_module():
    try:
        import comfy.samplers
    except ImportError:
        return None
    return comfy.samplers


def sampler_names():
    """The KSampler's sampler list (live inside ComfyUI: the node schemas hold references to it)."""
    mod = _samplers_module()
    return mod.KSampler.SAMPLERS if mod is not None else FALLBACK_SAMPLERS


def scheduler_names():
    mod = _samplers_module()
    return mod.KSampler.SCHEDULERS if mod is not None else FALLBACK_SCHEDULERS


def sampler_sigmas(model, sampler_name, scheduler, steps, denoise=1.0, device="cpu"):
    """The σ the stock KSampler evaluates for these settings (denoise truncation and the penultimate-σ rule of
    dpm_2/uni_pc included), as a 1-D tensor."""
    import comfy.samplers

    ks = comfy.samplers.KSampler(model, steps=steps, device=device, sampler=sampler_name, scheduler=scheduler,
                                 denoise=denoise, model_options=model.model_options)
    return ks.sigmas


def percent_to_sigma(model):
    """(function percent → σ of the model's sampling, name of the sampling type)."""
    ms = model.get_model_object("model_sampling")
    # ComfyUI builds the class on the fly ("ModelSampling"); name the sampling type it derives from
    name = next((c.__name__ for c in type(ms).__mro__ if c.__name__ != "ModelSampling"), type(ms).__name__)
    fn = getattr(ms, "percent_to_sigma", None)
    return (None if fn is None else (lambda p: float(fn(p)))), name


def ksampler_object(sample_fn, options=None):
    """A SAMPLER (comfy.samplers.KSAMPLER) running ``sample_fn(model, x, sigmas, extra_args, callback, disable,
    **options)``."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_fn, extra_options=dict(options or {}))


def sampler_object(name):
    import comfy.samplers

    return comfy.samplers.sampler_object(name)


def register_sampler(name, sample_fn, log=None):
    """Add a sampler by name to ComfyUI's lists once (KSAMPLER_NAMES, SAMPLER_NAMES, KSampler.SAMPLERS, in
    place) and its function as ``k_diffusion.sampling.sample_<name>``; never replace an existing one.
    False outside ComfyUI."""
    samplers_module = sys.modules.get("comfy.samplers")
    k_sampling = sys.modules.get("comfy.k_diffusion.sampling")
    if samplers_module is None or k_sampling is None:
        return False
    attr = f"sample_{name}"
    existing = getattr(k_sampling, attr, None)
    if existing is None:
        setattr(k_sampling, attr, sample_fn)
    elif existing is not sample_fn and getattr(existing, "__name__", "") != sample_fn.__name__ and log:
        log.warning("Atelier: comfy.k_diffusion.sampling.%s already exists; keeping it, the stock lists use it", attr)
    seen = set()
    for owner, list_name in ((samplers_module, "KSAMPLER_NAMES"), (samplers_module, "SAMPLER_NAMES"),
                             (getattr(samplers_module, "KSampler", None), "SAMPLERS")):
        names = getattr(owner, list_name, None)
        if not isinstance(names, list) or id(names) in seen:
            continue
        seen.add(id(names))
        if name not in names:
            names.append(name)
    return True


def default_noise_sampler(x, seed):
    from comfy.k_diffusion.sampling import default_noise_sampler as make

    return make(x, seed=seed)


def cfg_guider_class():
    """ComfyUI's CFGGuider, the base of the pack's guiders."""
    import comfy.samplers

    return comfy.samplers.CFGGuider


def conditioning_with(cond, values, append=False):
    """A copy of a CONDITIONING with ``values`` set on every entry (node_helpers: inputs are never mutated)."""
    import node_helpers

    return node_helpers.conditioning_set_values(cond, values, append=append)


def prepare_latent_and_noise(model, latent_image, seed):
    """(latent samples with the model's channel count, seeded noise) as the stock KSampler prepares them."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"],
                                                    latent_image.get("downscale_ratio_spacial"))
    return latent, comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))


def preview_callback(model, steps):
    """The stock latent-preview callback (and progress bar) for ``steps`` sampling steps."""
    import latent_preview

    return latent_preview.prepare_callback(model, steps)


def progress_bar_enabled():
    import comfy.utils

    return comfy.utils.PROGRESS_BAR_ENABLED
