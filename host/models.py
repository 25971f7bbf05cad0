"""Devices, memory and model files through ComfyUI: safe loading, checkpoints, LoRA key maps, TAESD."""


def torch_device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def text_encoder_device():
    """Where ComfyUI runs text encoders ("cpu" outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return "cpu"
    return mm.text_encoder_device()


def intermediate_device():
    import comfy.model_management as mm

    return mm.intermediate_device()


def free_memory(nbytes, device):
    """Ask ComfyUI to unload models until ``nbytes`` are free on ``device``."""
    import comfy.model_management as mm

    mm.free_memory(nbytes, device)


def module_size(module):
    import comfy.model_management as mm

    return mm.module_size(module)


def oom_exceptions(fallback):
    """ComfyUI's out-of-memory exception types; ``fallback`` where ComfyUI only knows the bare Exception (a torch
    without the CUDA error type): never retry on every error."""
    import comfy.model_management as mm

    return (mm.OOM_EXCEPTION,) if mm.OOM_EXCEPTION is not Exception else tuple(fallback)


def soft_empty_cache():
    import comfy.model_management as mm

    mm.soft_empty_cache()


def load_file(path, metadata=False):
    """A state dict from .safetensors or a weights-only pickle (ComfyUI's safe loader: code in a pickle is
    refused, never run); with ``metadata``, (state dict, header metadata or None)."""
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True, return_metadata=metadata)


def load_checkpoint(path, embeddings=True, model_options=None, te_model_options=None):
    """(MODEL, CLIP, VAE) of a single-file checkpoint, loaded as CheckpointLoaderSimple does."""
    import comfy.sd

    kwargs = {}
    if embeddings:
        import folder_paths

        kwargs["embedding_directory"] = folder_paths.get_folder_paths("embeddings")
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                model_options=model_options or {},
                                                te_model_options=te_model_options or {}, **kwargs)
    return out[0], out[1], out[2]


def save_checkpoint(path, model, clip, vae, metadata=None):
    import comfy.sd

    comfy.sd.save_checkpoint(path, model, clip, vae, metadata=metadata)


def model_family(model):
    """The model config's class name (SD15, SD20, SDXL, Flux, ...); "" for no model."""
    return type(model.model.model_config).__name__ if model is not None else ""


def is_sd15(model):
    import comfy.supported_models

    return isinstance(model.model.model_config, comfy.supported_models.SD15)


def lora_key_map(model=None, clip=None):
    """{LoRA key prefix: model key} that ComfyUI's LoRA loader maps for this MODEL and CLIP."""
    import comfy.lora

    key_map = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def apply_lora(model, clip, lora, strength_model, strength_clip):
    """(patched MODEL clone, patched CLIP clone), as the stock LoraLoader does."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


def taesd(latent_channels):
    """An empty TAESD (encoder and decoder) for latents with this many channels."""
    from comfy.taesd.taesd import TAESD

    return TAESD(latent_channels=latent_channels)


def clip_vision_output(image_embeds):
    """A CLIP_VISION_OUTPUT carrying only image embeddings (what unCLIP conditioning reads)."""
    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    output["image_embeds"] = image_embeds
    return output


def unet_model(config):
    """ComfyUI's LDM UNet (openaimodel.UNetModel) with uninitialised weights (``disable_weight_init`` layers)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config, operations=comfy.ops.disable_weight_init)


def autoencoder_kl(ddconfig, embed_dim):
    """ComfyUI's KL autoencoder (the SD VAE family) for ``ddconfig``."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=ddconfig, embed_dim=embed_dim)


def text_encoder_config(name):
    """One of ComfyUI's bundled text-encoder configs as a dict (e.g. "sd1_clip_config.json")."""
    import json
    import os

    import comfy.sd1_clip

    here = os.path.dirname(comfy.sd1_clip.__file__)
    for folder in (here, os.path.join(here, "text_encoders")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
    raise FileNotFoundError(f"ComfyUI has no text-encoder config {name!r}")


def unclip_embedding_dim(model):
    """Size of the CLIP image embedding an unCLIP MODEL takes (its noise augmentor's statistics); None for a
    model without that augmentor (not unCLIP)."""
    augmentor = getattr(getattr(model, "model", None), "noise_augmentor", None)
    return None if augmentor is None else int(augmentor.data_mean.shape[-1])
