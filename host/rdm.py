"""The retrieval-augmented diffusion model (RDM) as ComfyUI objects: its model config, its 16-channel latent
format and its KL-f16 VAE. ComfyUI 0.15.1 has none of them (its checkpoint detection matches no model class
for this UNet, and its VAE detection takes the f=8 SD branch), so they are built here from what
``rdm.checkpoint.prepare`` read off the file. The settings come from that core module."""

_CLASSES = {}


def _classes():
    """(latent format class, model config class), made once (their bases live in ComfyUI)."""
    if not _CLASSES:
        import comfy.latent_formats
        import comfy.supported_models_base

        from ..rdm import checkpoint as C

        class RDMLatent(comfy.latent_formats.LatentFormat):
            latent_channels = C.LATENT_CHANNELS
            spacial_downscale_ratio = C.DOWNSCALE
            latent_rgb_factors = None

            def __init__(self):
                self.scale_factor = C.SCALE_FACTOR

        class RDM(comfy.supported_models_base.BASE):
            unet_config = {"context_dim": C.CONTEXT_DIM, "in_channels": C.LATENT_CHANNELS,
                           "use_linear_in_transformer": False}
            unet_extra_config = {"num_heads": -1, "num_head_channels": C.HEAD_CHANNELS}
            sampling_settings = {"linear_start": C.LINEAR_START, "linear_end": C.LINEAR_END}
            latent_format = RDMLatent
            memory_usage_factor = 2.0

            def inpaint_model(self):  # 16 input channels are the latent, not latent + mask + masked image
                return False

        _CLASSES.update(latent=RDMLatent, config=RDM)
    return _CLASSES["latent"], _CLASSES["config"]


def model_config_class():
    """ComfyUI's model config class of the RDM (a ``supported_models_base.BASE``)."""
    return _classes()[1]


def build_model(unet_sd, prefix):
    """A MODEL (ModelPatcher) of the RDM UNet whose weights are ``unet_sd`` (keys under ``prefix``), as
    ``comfy.sd.load_state_dict_guess_config`` builds a detected checkpoint."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    unet_config = comfy.model_detection.detect_unet_config(unet_sd, prefix)
    config = model_config_class()(unet_config)
    params = comfy.utils.calculate_parameters(unet_sd, prefix)
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=config.supported_inference_dtypes,
                          weight_dtype=comfy.utils.weight_dtype(unet_sd, prefix))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model(unet_sd, prefix, device=mm.unet_inital_load_device(params, dtype))
    patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=load_device,
                                                   offload_device=mm.unet_offload_device())
    model.load_model_weights(unet_sd, prefix, assign=patcher.is_dynamic())
    return patcher


def build_vae(vae_sd, ddconfig, embed_dim, ratio):
    """A VAE of the KL autoencoder ``ddconfig`` with the weights ``vae_sd``, its ratios set to ``ratio`` (16 for the
    RDM) and its decode-memory estimate scaled to match (ComfyUI's formula assumes 8x8 pixels per latent)."""
    import comfy.sd

    vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"embed_dim": embed_dim, "ddconfig": ddconfig}})
    vae.downscale_ratio = vae.upscale_ratio = ratio
    vae.latent_channels = ddconfig["z_channels"]
    decode, encode, area = vae.memory_used_decode, vae.memory_used_encode, (ratio / 8) ** 2
    vae.memory_used_decode = lambda shape, dtype: decode(shape, dtype) * area
    vae.memory_used_encode = lambda shape, dtype: encode(shape, dtype)
    return vae


def build(prepared):
    """(MODEL, VAE) of a checked RDM checkpoint (``rdm.checkpoint.prepare``'s dict)."""
    from ..rdm import checkpoint as C

    return (build_model(prepared["unet"], C.UNET_PREFIX),
            build_vae(prepared["vae"], prepared["ddconfig"], prepared["embed_dim"], C.DOWNSCALE))
