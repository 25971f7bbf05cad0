"""CLIP-guided sampling nodes ("Generate Stunning Artworks with CLIP Guided Diffusion", 2022): a GUIDER for
SamplerCustomAdvanced and a KSampler-like node.

The maths, the decoders and the guider live in ``samplers/clip_guidance.py``; the nodes hand it ComfyUI's
objects from the host (the CFGGuider class, the TAESD files of models/vae_approx, a progress object for
interrupts) and, for the KSampler node, prepare noise, sigmas and previews as the stock KSampler does.
"""
from ..common.folders import VAE_APPROX
from ..host import folders, models, sampling
from ..host.progress import ComfyProgress
from ..samplers import clip_guidance as cg

D = cg.GuidanceOptions()  # the article's defaults, one source of truth
TAESD_FILES = cg.TaesdFiles(names=lambda: folders.files(VAE_APPROX), folders=lambda: folders.paths(VAE_APPROX),
                            load=lambda name: models.load_file(folders.full_path(VAE_APPROX, name)),
                            new_taesd=models.taesd)

GUIDANCE_INPUTS = {
    "clip": ("ATELIER_CLIP", {"tooltip": "open_clip model from the Atelier open_clip Loader; its image tower "
                                         "scores the cutouts and its text tower embeds the text targets."}),
    "text_targets": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "What CLIP should see: one prompt per line or separated by '|', "
                                           "optionally 'text:weight' (negative weights push away). May be empty "
                                           "when style neighbours are connected."}),
    "decoder": (list(cg.DECODERS), {"default": "taesd",
                                    "tooltip": "How the denoised latent is turned into pixels for CLIP: 'taesd' "
                                               "(fast, models/vae_approx/taesd_decoder.safetensors) or 'vae' (the "
                                               "VAE input; exact but slower and heavier)."}),
    "clip_scale": ("FLOAT", {"default": D.clip_scale, "min": 0.0, "max": 1e7, "step": 100.0,
                             "tooltip": "Weight of the CLIP spherical-distance loss (5000 is the article's value). 0 "
                                        "turns guidance off: the result is then exactly the unguided sampler's."}),
    "tv_scale": ("FLOAT", {"default": D.tv_scale, "min": 0.0, "max": 1e6, "step": 10.0,
                           "tooltip": "Total-variation weight: smooths the image (the article: 100). 0 = off."}),
    "range_scale": ("FLOAT", {"default": D.range_scale, "min": 0.0, "max": 1e6, "step": 10.0,
                              "tooltip": "Penalty on decoded values outside [-1, 1], L2 (the article: 150). 0 = off."}),
    "saturation_scale": ("FLOAT", {"default": D.saturation_scale, "min": 0.0, "max": 1e6, "step": 10.0,
                                   "tooltip": "L1 penalty on values outside [-1, 1] against over-saturation "
                                              "(0 = off, as in the article). Not multiplied by scale_multiplier."}),
    "scale_multiplier": ("FLOAT", {"default": D.scale_multiplier, "min": 0.0, "max": 1e4, "step": 1.0,
                                   "tooltip": "Multiplies clip, tv and range scales, as the article does (50)."}),
    "cutn": ("INT", {"default": D.cutn, "min": 1, "max": 256,
                     "tooltip": "Random crops per batch that CLIP scores (the article: 16). Time and memory grow "
                                "linearly with cutn x cut_batches."}),
    "cut_batches": ("INT", {"default": D.cut_batches, "min": 1, "max": 64,
                            "tooltip": "Batches of cutouts per model call, gradients averaged (the article: 4). "
                                       "More batches = less noisy guidance at the same peak memory."}),
    "cut_pow": ("FLOAT", {"default": D.cut_pow, "min": 0.05, "max": 10.0, "step": 0.05,
                          "tooltip": "Cut size spread: 1 uniform; >1 favours small detail crops; <1 large "
                                     "composition crops."}),
    "clamp_max": ("FLOAT", {"default": D.clamp_max, "min": 0.0, "max": 10.0, "step": 0.005,
                            "tooltip": "RMS bound on the guidance gradient per sample and call (the article: 0.05). "
                                       "0 disables clamping (strong, can blow up)."}),
}

OPTIONAL_INPUTS = {
    "vae": ("VAE", {"tooltip": "VAE used when decoder = 'vae' (a VAELoader 'taesd' VAE works too)."}),
    "neighbors": ("ATELIER_NEIGHBORS", {"tooltip": "Style neighbours from the Style Retriever: their CLIP image "
                                                    "embeddings become image targets."}),
    "style_weight": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05,
                               "tooltip": "Total weight of the neighbour image targets, shared equally; text "
                                          "targets have their own weights (1 by default)."}),
    "augment": ("BOOLEAN", {"default": D.augment,
                            "tooltip": "Random flips, rotations, shifts and grey cuts (seeded), as in the article."}),
    "loss_fn": (list(cg.LOSS_FNS), {"default": D.loss_fn,
                                    "tooltip": "spherical: squared great-circle distance (the article's); "
                                               "cos_spherical: adds 0.5*exp(2(1-cos)), pushes harder when far."}),
    "start_percent": ("FLOAT", {"default": D.start_percent, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "Fraction of the steps after which guidance starts (0 = first step)."}),
    "end_percent": ("FLOAT", {"default": D.end_percent, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Fraction of the steps where guidance stops (1 = through the last step)."}),
    "schedule": (list(cg.SCHEDULES), {"default": D.schedule,
                                      "tooltip": "Scale per step inside the range: constant, or falling linearly "
                                                 "/ along a cosine to 0 at end_percent."}),
    "decoder_checkpoint": (["auto", "on", "off"], {"default": "auto",
                                                   "tooltip": "Recompute the decoder for its backward instead of "
                                                              "keeping its activations: less memory, one more "
                                                              "decoder forward. auto = on for the VAE, off for "
                                                              "TAESD."}),
}


class AtelierCLIPGuider:
    DESCRIPTION = ("CFG guider with CLIP guidance (\"Generate Stunning Artworks with CLIP Guided Diffusion\", "
                   "2022): at every model call the denoised latent is decoded (TAESD or VAE), cut into random crops "
                   "and pulled towards the text and style targets in CLIP space. Use with SamplerCustomAdvanced "
                   "and any SAMPLER (PLMS too). Costs about one decoder and one CLIP forward+backward per model "
                   "call; see docs/clip_guidance.md.")
    CATEGORY = "atelier/sampling"
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER", "STRING")
    RETURN_NAMES = ("guider", "report")
    OUTPUT_TOOLTIPS = ("GUIDER for SamplerCustomAdvanced.", "The targets and their normalised weights.")

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x/SD2/SDXL latents)."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive conditioning for CFG."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning for CFG."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (1 = no CFG)."}),
        }
        required.update(GUIDANCE_INPUTS)
        return {"required": required, "optional": dict(OPTIONAL_INPUTS)}

    def get_guider(self, model, positive, negative, cfg, **guidance):
        guider = cg.make_guider(sampling.cfg_guider_class(), model, positive, negative, cfg, ComfyProgress(),
                                TAESD_FILES, **guidance)
        return (guider, guider.setup.report)


class AtelierCLIPGuidedKSampler:
    DESCRIPTION = ("KSampler with CLIP guidance (\"Generate Stunning Artworks with CLIP Guided Diffusion\", "
                   "2022): same inputs as the stock KSampler plus the CLIP guidance knobs. For custom sigmas or "
                   "samplers use Atelier CLIP Guider with SamplerCustomAdvanced.")
    CATEGORY = "atelier/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    OUTPUT_TOOLTIPS = ("The guided latent.", "The targets and their normalised weights.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = sampling.sampler_names(), sampling.scheduler_names()
        required = {
            "model": ("MODEL", {"tooltip": "The diffusion model."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the noise and of the cutouts."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "Denoising steps (the article: 50)."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale."}),
            "sampler_name": (samplers, {"default": "ddim" if "ddim" in samplers else samplers[0],
                                        "tooltip": "Sampler (ddim as in the article; plms, euler, ... all work)."}),
            "scheduler": (schedulers, {"default": "ddim_uniform" if "ddim_uniform" in schedulers else schedulers[0],
                                       "tooltip": "Sigma schedule."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning."}),
            "latent_image": ("LATENT", {"tooltip": "Latent to denoise (Empty Latent Image for txt2img)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Fraction of the schedule to run (img2img below 1)."}),
        }
        required.update(GUIDANCE_INPUTS)
        return {"required": required, "optional": dict(OPTIONAL_INPUTS)}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               **guidance):
        guider = cg.make_guider(sampling.cfg_guider_class(), model, positive, negative, cfg, ComfyProgress(),
                                TAESD_FILES, **guidance)
        latent, noise = sampling.prepare_latent_and_noise(model, latent_image, seed)
        sigmas = sampling.sampler_sigmas(model, sampler_name, scheduler, steps, denoise, device=model.load_device)
        samples = guider.sample(noise, latent, sampling.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"),
                                callback=sampling.preview_callback(model, sigmas.shape[-1] - 1),
                                disable_pbar=not sampling.progress_bar_enabled(), seed=seed)
        out = latent_image.copy()  # the input is never mutated
        out.pop("downscale_ratio_spacial", None)
        out["samples"] = samples.to(models.intermediate_device())
        return (out, guider.setup.report)


NODE_CLASS_MAPPINGS = {
    "AtelierCLIPGuider": AtelierCLIPGuider,
    "AtelierCLIPGuidedKSampler": AtelierCLIPGuidedKSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierCLIPGuider": "CLIP Guider (Atelier)",
    "AtelierCLIPGuidedKSampler": "CLIP-Guided KSampler (Atelier)",
}
