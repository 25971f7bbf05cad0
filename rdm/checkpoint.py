"""CompVis RDM checkpoints: what the file holds, the EMA weights, and the configs the host needs to build it.

The LAION-RDM 768 checkpoint (CompVis latent-diffusion, configs/retrieval-augmented-diffusion/768x768.yaml) is
a Lightning pickle whose ``state_dict`` holds

    model.diffusion_model.*       the UNet (448 channels, mult 1/2/3/4, attention heads of 32 channels, context 768,
                                  16 latent channels): SD 1.x key names
    model_ema.<key without dots>  the EMA copy of every UNet tensor ("model_ema.diffusion_modelinput_blocks00weight"),
                                  plus model_ema.decay / model_ema.num_updates
    first_stage_model.*           the KL autoencoder, f = 16 (ch_mult 1/1/2/2/4), 16 latent channels
    betas, alphas_cumprod, ...    the DDPM buffers of the linear 0.0015-0.015 schedule (ComfyUI recomputes them)

and no ``cond_stage_model.*`` (the CLIP embeddings are computed outside the model). Everything here is read
off the keys and shapes, never the file name, so renamed files and smaller models of the same family load too.
"""
from __future__ import annotations

import os
import re

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
# the model's fixed settings (768x768.yaml and LDM's DDPM defaults)
LATENT_CHANNELS = 16
CONTEXT_DIM = 768
HEAD_CHANNELS = 32  # num_head_channels of the yaml; not detectable from the weights
LINEAR_START, LINEAR_END = 0.0015, 0.015
SCALE_FACTOR = 0.22765929
DOWNSCALE = 16
WEIGHT_CHOICES = ("ema", "raw")
FILE_ENDINGS = (".ckpt", ".safetensors", ".pt", ".pth")
WHAT_IT_LOADS = ("the RDM Checkpoint Loader loads CompVis retrieval-augmented diffusion models (the LAION-RDM "
                 "'model.ckpt' of latent-diffusion, 16 latent channels, context 768, a KL-f16 autoencoder), as "
                 "the Lightning .ckpt, a .safetensors conversion of it, or the diffusers layout (unet/, vae/)")


class RDMError(ValueError):
    """A file that is not an RDM checkpoint, or a damaged one; the message says what it is and what to do."""


# -- keys -------------------------------------------------------------------------------------------------------
def ema_key(unet_key):
    """The LitEma name of a UNet tensor: "model_ema." + the full model key without "model." and without dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def unet_keys(sd):
    return [k[len(UNET_PREFIX):] for k in sd if k.startswith(UNET_PREFIX)]


def ema_state(sd):
    """{unet key: EMA tensor} for every UNet tensor; {} when the file has no EMA copy. A partial copy (some
    tensors missing) is an error: the file is damaged."""
    keys = unet_keys(sd)
    found = {k: sd[ema_key(k)] for k in keys if ema_key(k) in sd}
    if found and len(found) != len(keys):
        missing = [k for k in keys if k not in found]
        raise RDMError(f"the checkpoint's EMA copy is incomplete: {len(missing)} of {len(keys)} UNet tensors have "
                       f"no model_ema entry (first: {missing[0]}); load it with weights 'raw', or get a complete "
                       "file")
    return found


def unet_state(sd, weights="ema"):
    """(the UNet's state dict under UNET_PREFIX, which weights were used: "ema" or "raw", a note).

    ``weights`` "ema" takes the EMA tensors (what knn2img samples with, inside ``ema_scope``), falling back to
    the raw ones with a note when the file has no EMA copy; "raw" takes the trained weights as they are."""
    if weights not in WEIGHT_CHOICES:
        raise RDMError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    out = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if weights == "raw":
        return out, "raw", ""
    ema = ema_state(sd)
    if not ema:
        return out, "raw", "the file has no EMA weights (no model_ema.* keys): the raw weights are used"
    for k, v in ema.items():
        if tuple(v.shape) != tuple(out[UNET_PREFIX + k].shape):
            raise RDMError(f"EMA tensor {ema_key(k)} has shape {tuple(v.shape)} but {UNET_PREFIX + k} has "
                           f"{tuple(out[UNET_PREFIX + k].shape)}: the file is damaged")
        out[UNET_PREFIX + k] = v
    return out, "ema", ""


def vae_state(sd):
    return {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}


# -- what a file is ------------------------------------------------------------------------------------------------
def _shape(sd, key):
    v = sd.get(key)
    return tuple(v.shape) if v is not None else None


def describe_foreign(sd):
    """A short description of a checkpoint that is not an RDM (for the error message)."""
    conv_in = _shape(sd, UNET_PREFIX + "input_blocks.0.0.weight")
    ctx = next((tuple(v.shape) for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
               None)
    if conv_in is None:
        if any(k.startswith("model.diffusion_model.") for k in sd) or any(k.startswith("double_blocks.") for k in sd):
            return "a diffusion model of another architecture (no SD-style UNet input block)"
        if any(k.startswith(("encoder.", "decoder.")) for k in sd):
            return "a VAE / autoencoder alone"
        return f"not a diffusion checkpoint ({len(sd)} tensors, none under {UNET_PREFIX})"
    channels = conv_in[1]
    context = ctx[1] if ctx else None
    has_clip = any(k.startswith(CLIP_PREFIXES) for k in sd)
    if channels == 4 and context == 768:
        return "an SD 1.x checkpoint (4 latent channels, context 768" + (", with its CLIP text encoder)" if has_clip else ")")
    if channels == 4 and context == 1024:
        return "an SD 2.x checkpoint (4 latent channels, context 1024)"
    if channels == 4 and context == 2048:
        return "an SDXL checkpoint (4 latent channels, context 2048)"
    if channels in (8, 9):
        return f"an inpainting or instruct checkpoint ({channels} input channels)"
    return f"a latent diffusion checkpoint with {channels} latent channels and context {context}"


def inspect(sd):
    """Check that ``sd`` (the checkpoint's state dict) is an RDM: returns a dict describing it, or raises RDMError
    saying what the file is instead and what the loader loads."""
    conv_in = _shape(sd, UNET_PREFIX + "input_blocks.0.0.weight")
    out = _shape(sd, UNET_PREFIX + "out.2.weight")
    ctx = sorted({tuple(v.shape)[1] for k, v in sd.items()
                  if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")})
    z = _shape(sd, VAE_PREFIX + "decoder.conv_in.weight")
    if conv_in is None or out is None or conv_in[1] != LATENT_CHANNELS or out[0] != LATENT_CHANNELS or ctx != [CONTEXT_DIM]:
        raise RDMError(f"this file is {describe_foreign(sd)}, not an RDM; {WHAT_IT_LOADS}. Load other checkpoints "
                       "with ComfyUI's Load Checkpoint.")
    if z is None:
        raise RDMError("the file has the RDM's UNet but no autoencoder (no first_stage_model.* keys): it is not a "
                       f"complete RDM checkpoint; {WHAT_IT_LOADS}")
    if z[1] != LATENT_CHANNELS:
        raise RDMError(f"the file's autoencoder has {z[1]} latent channels but its UNet takes {LATENT_CHANNELS}: "
                       "the file is damaged or mixed")
    unet = unet_keys(sd)
    has_ema = any(ema_key(k) in sd for k in unet[:8])
    return {"unet_tensors": len(unet), "unet_params": sum(int(sd[UNET_PREFIX + k].numel()) for k in unet),
            "model_channels": conv_in[0], "has_ema": has_ema,
            "vae_tensors": sum(1 for k in sd if k.startswith(VAE_PREFIX))}


def vae_config(vae_sd):
    """(ddconfig, embed_dim) of a KL autoencoder state dict (keys without "first_stage_model."), read off its keys:
    ch from conv_in, ch_mult from the down blocks, res blocks per level, attention levels, z channels."""
    try:
        ch = int(vae_sd["encoder.conv_in.weight"].shape[0])
        in_ch = int(vae_sd["encoder.conv_in.weight"].shape[1])
        out_ch = int(vae_sd["decoder.conv_out.weight"].shape[0])
        z = int(vae_sd["decoder.conv_in.weight"].shape[1])
        embed_dim = int(vae_sd["post_quant_conv.weight"].shape[0])
        double_z = int(vae_sd["encoder.conv_out.weight"].shape[0]) == 2 * z
    except KeyError as e:
        raise RDMError(f"the autoencoder lacks {e.args[0]}: the file is damaged or not a KL autoencoder") from None
    levels = sorted({int(m.group(1)) for k in vae_sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    mult, blocks, attn = [], 0, []
    for i in levels:
        last = max(int(m.group(1)) for k in vae_sd for m in [re.match(rf"encoder\.down\.{i}\.block\.(\d+)\.", k)] if m)
        blocks = last + 1
        mult.append(int(vae_sd[f"encoder.down.{i}.block.{last}.conv2.weight"].shape[0]) // ch)
        if any(k.startswith(f"encoder.down.{i}.attn.") for k in vae_sd):
            attn.append(i)
    resolution = 256
    ddconfig = {"double_z": double_z, "z_channels": z, "resolution": resolution, "in_channels": in_ch, "out_ch": out_ch,
                "ch": ch, "ch_mult": mult, "num_res_blocks": blocks,
                "attn_resolutions": [resolution // 2 ** i for i in attn], "dropout": 0.0}
    return ddconfig, embed_dim


def downscale(ddconfig):
    return 2 ** (len(ddconfig["ch_mult"]) - 1)


# -- loading ---------------------------------------------------------------------------------------------------------
def read_state_dict(path, load_file):
    """The state dict of ``path`` through ``load_file`` (the host's safe loader: safetensors, or a weights-only
    pickle whose code is refused, never run), with errors that say what was wrong."""
    if not path or not os.path.isfile(path):
        raise RDMError(f"RDM checkpoint not found: {path!r}. Put model.ckpt (or a .safetensors conversion) in "
                       "ComfyUI/models/rdm/.")
    if not path.lower().endswith(FILE_ENDINGS):
        raise RDMError(f"{os.path.basename(path)}: not a checkpoint file ({', '.join(FILE_ENDINGS)})")
    try:
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001  the loader's own types vary (UnpicklingError, RuntimeError, ValueError, ...)
        text = f"{type(e).__name__}: {e}"
        if "weights only" in text.lower() or "weights_only" in text or "Unsupported global" in text:
            raise RDMError(f"{os.path.basename(path)} was refused: its pickle holds code or objects other than "
                           "tensors (nothing in it was run). Use the original CompVis model.ckpt, or a .safetensors "
                           f"conversion made with a trusted tool. ({text.splitlines()[0][:300]})") from None
        raise RDMError(f"{os.path.basename(path)} cannot be read: it is truncated or not a checkpoint "
                       f"({text.splitlines()[0][:300]}). Check its size against the source and copy it again.") from None
    if not isinstance(sd, dict) or not sd:
        raise RDMError(f"{os.path.basename(path)} holds no tensors: not a checkpoint")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # a Lightning dict the host did not unwrap
        sd = sd["state_dict"]
    return sd


def prepare(sd, weights="ema"):
    """Everything the host needs to build the model from a checkpoint's state dict: a dict with ``unet`` (state
    dict under UNET_PREFIX), ``vae`` (state dict without prefix), ``ddconfig``, ``embed_dim``, ``weights``
    (used), ``notes`` and ``summary`` (from :func:`inspect`). Checks everything before anything is built."""
    summary = inspect(sd)
    unet, used, note = unet_state(sd, weights)
    vae = vae_state(sd)
    ddconfig, embed_dim = vae_config(vae)
    if downscale(ddconfig) != DOWNSCALE or ddconfig["z_channels"] != LATENT_CHANNELS:
        raise RDMError(f"the file's autoencoder downsamples by {downscale(ddconfig)} with {ddconfig['z_channels']} "
                       f"latent channels; the RDM's is f={DOWNSCALE} with {LATENT_CHANNELS}: not an RDM checkpoint")
    return {"unet": unet, "vae": vae, "ddconfig": ddconfig, "embed_dim": embed_dim, "weights": used,
            "notes": [note] if note else [], "summary": summary}


def info_text(name, prepared):
    s, dd = prepared["summary"], prepared["ddconfig"]
    lines = [f"RDM {name}: UNet {s['unet_params'] / 1e6:.1f}M parameters ({s['model_channels']} channels, heads of "
             f"{HEAD_CHANNELS}), {prepared['weights']} weights",
             f"autoencoder: KL f={downscale(dd)}, {dd['z_channels']} latent channels, ch {dd['ch']} x {dd['ch_mult']}",
             f"schedule: linear {LINEAR_START}-{LINEAR_END}, eps prediction; latent scale {SCALE_FACTOR}",
             "conditioning: RDM Conditioning (CLIP ViT-L/14 text + k neighbours, 768-d); negative: ConditioningZeroOut"]
    return "\n".join(lines + [f"note: {n}" for n in prepared["notes"]])


def load_rdm(path, weights, load_file, build):
    """The RDM Checkpoint Loader's work: (MODEL, VAE, info text). ``load_file(path)`` is the host's safe loader,
    ``build(prepared)`` the host's builder (``host.rdm.build``). Nothing is built before every check passed."""
    prepared = prepare(read_state_dict(path, load_file), weights)
    model, vae = build(prepared)
    return model, vae, info_text(os.path.basename(path), prepared)
