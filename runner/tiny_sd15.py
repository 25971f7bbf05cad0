"""Build and check the tiny random-weight SD1.5-architecture checkpoint that ``--tiny`` and the tests use.

    python -m atelier.runner.tiny_sd15 OUT.safetensors [--seed N]   # build, then check (writes OUT.json)
    python -m atelier.runner.tiny_sd15 --check CKPT.safetensors     # check only; prints the report as JSON

Run with ComfyUI's Python and ComfyUI's folder as the working directory (runner/tiny.py does that): the UNet
and the VAE are ComfyUI's own classes (through the host seam), so the key layout is the one that ComfyUI's
checkpoint detection expects, and the text encoder is transformers' CLIP with its keys under
``text_model.`` (where ComfyUI's SD1 loader looks for them).

The UNet keeps SD1.5's detection keys (320 channels, context 768) with two resolution levels and one res
block each, so it runs on a CPU; the VAE and the CLIP text encoder are full size, because ComfyUI builds
both from fixed configs. ComfyUI's layers skip weight initialisation, so every tensor is set here: norms
weight 1 / bias 0, convolutions and linear layers N(0, 1/fan_in) with zero bias. The check loads the file
the way CheckpointLoaderSimple does and refuses it unless ComfyUI detects SD1.5, the UNet's ε has non-zero
variance, the VAE decodes finite values, and two prompts give different conditionings.
The weights are random: images are noise; this checks plumbing and speed only.
"""
import argparse
import json
import os
import sys

from ..host import models
from ..host.locate import attach

TINY_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1, 1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
    use_spatial_transformer=True, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
PROMPTS = ("a painting of a lighthouse at dusk", "a watercolour of red poppies")


def init_weights(module):
    """Give every parameter a sane value: ComfyUI's ``disable_weight_init`` layers leave memory as it was.

    Norms get weight 1 and bias 0; convolutions and linear layers N(0, 1/fan_in) weights and zero biases, so
    activations stay O(1) through the network; embeddings N(0, 0.02). Raises if a parameter was missed.
    """
    import torch

    seen = set()
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                mod.weight.normal_(0.0, mod.weight[0].numel() ** -0.5)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.normal_(0.0, 0.02)
            else:
                continue
            seen.update(id(p) for p in mod.parameters(recurse=False))
    missed = [name for name, p in module.named_parameters() if id(p) not in seen]
    if missed:
        raise RuntimeError(f"init_weights does not know how to initialise: {missed[:5]}")
    return module


def state_dict(seed=0):
    """The checkpoint's tensors (float16) in the SD1.5 single-file layout."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd = {}
    unet = init_weights(models.unet_model(TINY_UNET))
    sd.update(("model.diffusion_model." + k, v) for k, v in unet.state_dict().items())
    vae = init_weights(models.autoencoder_kl(SD_VAE, embed_dim=4))
    sd.update(("first_stage_model." + k, v) for k, v in vae.state_dict().items())
    config = {k: v for k, v in models.text_encoder_config("sd1_clip_config.json").items()
              if k in CLIPTextConfig().to_dict()}
    text = CLIPTextModel(CLIPTextConfig(**config))  # transformers initialises it (std 0.02 embeddings)
    for k, v in text.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # newer transformers drop the prefix
        sd["cond_stage_model.transformer." + k] = v
    return {k: v.detach().contiguous().to(torch.float16) for k, v in sd.items()}


def check(path):
    """Load ``path`` as CheckpointLoaderSimple does and measure what makes it usable; raise if it is not."""
    import torch

    model, clip, vae = models.load_checkpoint(path, embeddings=False)
    conds = [clip.encode_from_tokens(clip.tokenize(p)) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        sigma = torch.tensor([1.0])
        t = model.model.model_sampling.timestep(sigma).float()
        dtype = model.model.get_dtype()
        eps = model.model.diffusion_model(x.to(dtype), t.to(dtype), context=conds[0].to(dtype)).float()
        image = vae.decode(torch.randn(1, 4, 8, 8, generator=g))
    report = {
        "model_config": models.model_family(model),
        "eps_std": float(eps.std()),
        "eps_finite": bool(torch.isfinite(eps).all()),
        "vae_finite": bool(torch.isfinite(image).all()),
        "vae_std": float(image.float().std()),
        "image_shape": list(image.shape),
        "cond_shape": list(conds[0].shape),
        "cond_max_abs_diff": float((conds[0] - conds[1]).abs().max()),
    }
    problems = []
    if report["model_config"] != "SD15":
        problems.append(f"ComfyUI detects {report['model_config']}, not SD15")
    if not report["eps_finite"] or report["eps_std"] <= 1e-4:
        problems.append(f"the UNet's eps is constant or not finite (std {report['eps_std']:.3g})")
    if not report["vae_finite"]:
        problems.append("the VAE decodes non-finite values")
    if report["cond_max_abs_diff"] <= 1e-4:
        problems.append("two different prompts give the same conditioning")
    if problems:
        raise RuntimeError(f"the tiny checkpoint {path} is unusable: " + "; ".join(problems))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the .safetensors file to write (or to check, with --check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="only check an existing file; print the report")
    args = ap.parse_args(argv)
    attach(os.getcwd())
    if not args.check:
        from safetensors.torch import save_file

        tensors = state_dict(args.seed)
        save_file(tensors, args.out)
        print(f"wrote {args.out}: {sum(v.numel() for v in tensors.values()) / 1e6:.1f}M parameters", file=sys.stderr)
    report = check(args.out)
    if not args.check:
        with open(args.out + ".json", "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
