"""CLIP-guided sampling nodes (seed 004): a GUIDER for SamplerCustomAdvanced and a KSampler-like node.

The maths lives in ``samplers/clip_guidance.py``; this module turns ComfyUI objects into the callables it
needs (a grad-ready decoder copy, a differentiable CLIP image embedder, weighted targets) and hooks the
guidance into ``CFGGuider.predict_noise``, so every SAMPLER (PLMS included) is guided at every model call.
"""
import logging

from ..samplers import clip_guidance as cg

log = logging.getLogger(__name__)

DECODERS = ["taesd", "vae"]
TAESD_URL = "https://github.com/madebyollin/taesd (file taesd_decoder.safetensors for SD1.x)"
_FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc", "ipndm", "plms"]
_FALLBACK_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]

D = cg.GuidanceOptions()  # the seed's defaults, one source of truth

GUIDANCE_INPUTS = {
    "clip": ("ATELIER_CLIP", {"tooltip": "open_clip model from the Atelier open_clip Loader; its image tower "
                                         "scores the cutouts and its text tower embeds the text targets."}),
    "text_targets": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "What CLIP should see: one prompt per line or separated by '|', "
                                           "optionally 'text:weight' (negative weights push away). May be empty "
                                           "when style neighbours are connected."}),
    "decoder": (DECODERS, {"default": "taesd",
                           "tooltip": "How the denoised latent is turned into pixels for CLIP: 'taesd' (fast, "
                                      "models/vae_approx/taesd_decoder.safetensors) or 'vae' (the VAE input; "
                                      "exact but slower and heavier)."}),
    "clip_scale": ("FLOAT", {"default": D.clip_scale, "min": 0.0, "max": 1e7, "step": 100.0,
                             "tooltip": "Weight of the CLIP spherical-distance loss (seed: 5000). 0 turns guidance "
                                        "off: the result is then exactly the unguided sampler's."}),
    "tv_scale": ("FLOAT", {"default": D.tv_scale, "min": 0.0, "max": 1e6, "step": 10.0,
                           "tooltip": "Total-variation weight: smooths the image (seed: 100). 0 = off."}),
    "range_scale": ("FLOAT", {"default": D.range_scale, "min": 0.0, "max": 1e6, "step": 10.0,
                              "tooltip": "Penalty on decoded values outside [-1, 1], L2 (seed: 150). 0 = off."}),
    "saturation_scale": ("FLOAT", {"default": D.saturation_scale, "min": 0.0, "max": 1e6, "step": 10.0,
                                   "tooltip": "L1 penalty on values outside [-1, 1] against over-saturation "
                                              "(seed: 0 = off). Not multiplied by scale_multiplier."}),
    "scale_multiplier": ("FLOAT", {"default": D.scale_multiplier, "min": 0.0, "max": 1e4, "step": 1.0,
                                   "tooltip": "Multiplies clip, tv and range scales, as the seed does (50)."}),
    "cutn": ("INT", {"default": D.cutn, "min": 1, "max": 256,
                     "tooltip": "Random crops per batch that CLIP scores (seed: 16). Time and memory grow "
                                "linearly with cutn x cut_batches."}),
    "cut_batches": ("INT", {"default": D.cut_batches, "min": 1, "max": 64,
                            "tooltip": "Batches of cutouts per model call, gradients averaged (seed: 4). "
                                       "More batches = less noisy guidance at the same peak memory."}),
    "cut_pow": ("FLOAT", {"default": D.cut_pow, "min": 0.05, "max": 10.0, "step": 0.05,
                          "tooltip": "Cut size spread: 1 uniform; >1 favours small detail crops; <1 large "
                                     "composition crops."}),
    "clamp_max": ("FLOAT", {"default": D.clamp_max, "min": 0.0, "max": 10.0, "step": 0.005,
                            "tooltip": "RMS bound on the guidance gradient per sample and call (seed: 0.05). "
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
                            "tooltip": "Random flips, rotations, shifts and grey cuts (seeded), as in the seed."}),
    "loss_fn": (list(cg.LOSS_FNS), {"default": D.loss_fn,
                                    "tooltip": "spherical: squared great-circle distance (seed default); "
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
                                                              "decoder forward. auto = on for the VAE, off for TAESD."}),
}


def _comfy_lists():
    try:
        import comfy.samplers
        return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS
    except ImportError:  # schema checks without ComfyUI
        return _FALLBACK_SAMPLERS, _FALLBACK_SCHEDULERS


# ---------------------------------------------------------------------------------------------- setup
class GuidanceSetup:
    """Everything a guided run needs except the model-dependent parts built at sampling time."""

    def __init__(self, clip, targets, options, decoder, vae, report):
        self.clip, self.targets, self.options = clip, targets, options
        self.decoder, self.vae, self.report = decoder, vae, report


def build_setup(clip, text_targets, decoder, vae=None, neighbors=None, style_weight=1.0, decoder_checkpoint="auto",
                **knobs):
    """Validate the inputs and embed the targets once (not per step)."""
    if clip is None or not hasattr(clip, "encode_text"):
        raise ValueError("connect an ATELIER_CLIP (Atelier open_clip Loader) to the 'clip' input")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "vae" and vae is None:
        raise ValueError("decoder = 'vae' needs the 'vae' input connected (or choose decoder = 'taesd')")
    ckpt = {"on": True, "off": False}.get(decoder_checkpoint, decoder == "vae")
    options = cg.GuidanceOptions(decoder_checkpoint=ckpt, **knobs).validate()
    pairs = cg.parse_weighted_prompts(text_targets)
    text_embeds = clip.encode_text([p for p, _ in pairs]).float().cpu() if pairs else None
    image_embeds = None
    if neighbors is not None:
        image_embeds = _neighbor_embeddings(clip, neighbors)
    targets = cg.build_targets(text_embeds, [w for _, w in pairs], image_embeds, style_weight,
                               labels=[p for p, _ in pairs])
    report = "CLIP guidance targets ({}): ".format(getattr(clip, "name", "clip")) + ", ".join(
        f"{name} ({w:+.3f})" for name, w in zip(targets.labels, targets.weights.tolist()))
    return GuidanceSetup(clip, targets, options, decoder, vae, report)


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


# ---------------------------------------------------------------------------------------------- decoders
def make_taesd_decoder(latent_format, device):
    """TAESD decoder for the model's latent space, loaded from models/vae_approx the way ComfyUI's previews do."""
    import torch
    import folder_paths
    import comfy.utils
    from comfy.taesd.taesd import TAESD

    name = getattr(latent_format, "taesd_decoder_name", None)
    if name is None:
        raise ValueError(f"ComfyUI has no TAESD for this model's latent format ({type(latent_format).__name__}): "
                         "choose decoder = 'vae' and connect its VAE")
    files = [f for f in folder_paths.get_filename_list("vae_approx") if f.startswith(name + ".")]
    if not files:
        folders = ", ".join(folder_paths.get_folder_paths("vae_approx"))
        raise FileNotFoundError(
            f"TAESD decoder '{name}.safetensors' not found in models/vae_approx ({folders}). Download it from "
            f"{TAESD_URL} into that folder, or choose decoder = 'vae'.")
    path = folder_paths.get_full_path_or_raise("vae_approx", files[0])
    with torch.inference_mode(False):
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        first = sd.get("1.weight")
        channels = latent_format.latent_channels
        if first is None or first.shape[1] != channels:
            got = None if first is None else first.shape[1]
            raise ValueError(f"'{files[0]}' decodes {got}-channel latents but the model's latents have {channels} "
                             "channels: use the TAESD made for this model family, or decoder = 'vae'")
        taesd = TAESD(latent_channels=channels)
        taesd.taesd_decoder.load_state_dict(sd)
        taesd.taesd_encoder = None  # only decoding is needed
        taesd.requires_grad_(False)
        taesd = taesd.to(device=device, dtype=torch.float32)

    def decode(latent):  # model-space latent -> pixels in [-1, 1] (scale 1, shift 0, as for previews)
        return taesd.decode(latent.float())

    decode.net = taesd
    return decode


def make_vae_decoder(vae, latent_format, device):
    """Grad-ready copy of the VAE's decoder (ComfyUI's weights are inference tensors): raw latent -> [-1, 1]."""
    import torch

    channels = latent_format.latent_channels
    if getattr(vae, "latent_channels", channels) != channels:
        raise ValueError(f"the VAE takes {vae.latent_channels}-channel latents but the model makes {channels}-channel "
                         "ones: connect the VAE of the same model family")
    if getattr(vae, "latent_dim", 2) != 2:
        raise ValueError("CLIP guidance needs an image VAE (2-D latents), not a video or audio VAE")
    dtype = getattr(vae, "vae_dtype", torch.float32)
    net = cg.grad_ready_copy(vae.first_stage_model, skip=("encoder", "taesd_encoder")).to(device=device, dtype=dtype)

    def decode(latent):
        raw = latent_format.process_out(latent)
        return net.decode(raw.to(dtype)).float()

    decode.net = net
    return decode


# ---------------------------------------------------------------------------------------------- guider
_GUIDER_CLASS = None


def guider_class():
    """The CFGGuider subclass, made on first use so this module imports without ComfyUI."""
    global _GUIDER_CLASS
    if _GUIDER_CLASS is not None:
        return _GUIDER_CLASS
    import comfy.samplers
    import comfy.model_management

    class AtelierCLIPGuiderObject(comfy.samplers.CFGGuider):
        """CFG (positive/negative) whose combined denoised prediction is CLIP-guided.

        Guidance acts on the CFG-combined prediction, i.e. on the conditional direction: applying it to
        the unconditional branch would be multiplied by (1 - cfg) and push *away* from the target (the
        bug diffusers had, ANCHORS 6.2).
        """

        def __init__(self, model_patcher, setup):
            super().__init__(model_patcher)
            self.setup = setup
            self.guidance = None

        def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                         seed, *args, **kwargs):
            s = self.setup
            fmt = self.inner_model.latent_format
            if noise.shape[1] != fmt.latent_channels:
                raise ValueError(f"latent has {noise.shape[1]} channels, the model expects {fmt.latent_channels}")
            if s.decoder == "taesd":
                decode = make_taesd_decoder(fmt, device)
            else:
                decode = make_vae_decoder(s.vae, fmt, device)
            embed = cg.make_pixel_embedder(s.clip)
            self.guidance = cg.CLIPGuidance(embed, s.clip.image_size, s.targets, decode, s.options,
                                            sigmas=sigmas, seed=seed or 0)
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
            comfy.model_management.throw_exception_if_processing_interrupted()
            return self.guidance(denoised, timestep)

    _GUIDER_CLASS = AtelierCLIPGuiderObject
    return _GUIDER_CLASS


def make_guider(model, positive, negative, cfg, setup):
    guider = guider_class()(model, setup)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


# ---------------------------------------------------------------------------------------------- nodes
class AtelierCLIPGuider:
    DESCRIPTION = ("CFG guider with CLIP guidance (seed 004): at every model call the denoised latent is decoded "
                   "(TAESD or VAE), cut into random crops and pulled towards the text and style targets in CLIP "
                   "space. Use with SamplerCustomAdvanced and any SAMPLER (PLMS too). Costs about one decoder "
                   "and one CLIP forward+backward per model call; see docs/clip_guidance.md.")
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

    def get_guider(self, model, positive, negative, cfg, clip, text_targets, decoder, vae=None, neighbors=None,
                   style_weight=1.0, decoder_checkpoint="auto", **knobs):
        setup = build_setup(clip, text_targets, decoder, vae, neighbors, style_weight, decoder_checkpoint, **knobs)
        return (make_guider(model, positive, negative, cfg, setup), setup.report)


class AtelierCLIPGuidedKSampler:
    DESCRIPTION = ("KSampler with CLIP guidance (seed 004): same inputs as the stock KSampler plus the CLIP "
                   "guidance knobs. For custom sigmas or samplers use Atelier CLIP Guider with "
                   "SamplerCustomAdvanced.")
    CATEGORY = "atelier/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    OUTPUT_TOOLTIPS = ("The guided latent.", "The targets and their normalised weights.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _comfy_lists()
        required = {
            "model": ("MODEL", {"tooltip": "The diffusion model."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the noise and of the cutouts."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "Denoising steps (seed: 50)."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale."}),
            "sampler_name": (samplers, {"default": "ddim" if "ddim" in samplers else samplers[0],
                                        "tooltip": "Sampler (ddim as in the seed; plms, euler, ... all work)."}),
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
               clip, text_targets, decoder, vae=None, neighbors=None, style_weight=1.0, decoder_checkpoint="auto",
               **knobs):
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        setup = build_setup(clip, text_targets, decoder, vae, neighbors, style_weight, decoder_checkpoint, **knobs)
        guider = make_guider(model, positive, negative, cfg, setup)
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(model, latent, latent_image.get("downscale_ratio_spacial"))
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out.pop("downscale_ratio_spacial", None)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return (out, setup.report)


NODE_CLASS_MAPPINGS = {
    "AtelierCLIPGuider": AtelierCLIPGuider,
    "AtelierCLIPGuidedKSampler": AtelierCLIPGuidedKSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierCLIPGuider": "CLIP Guider (Atelier)",
    "AtelierCLIPGuidedKSampler": "CLIP-Guided KSampler (Atelier)",
}
