"""Full-size RDM on this machine: the LAION-RDM 768's real config with random weights, through the RDM Checkpoint
Loader's path (``rdm.checkpoint.prepare`` + ``host.rdm.build``), one sampling step and a decode; prints the
parameter counts, build time, peak memory and the time of one UNet step (cond + uncond) and of the decode.

    COMFYUI_PATH=/path/to/ComfyUI python -m bench.bench_rdm [--size 256] [--steps 1]

Random weights: the picture is noise; the figures are what the model costs. The EMA copy is left out (it
would double the host memory while building; the loader takes the same path with it).
"""
import argparse
import resource
import time

from atelier.host.locate import attach


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (the paper samples 768)")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (each is one batched cond+uncond call)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: COMFYUI_PATH)")
    args = ap.parse_args(argv)
    attach(args.comfyui)
    import torch

    import nodes
    from atelier.host import rdm as host_rdm
    from atelier.rdm import checkpoint as C
    from atelier.tests.fixtures.tiny_rdm import FULL_UNET, FULL_VAE, build_state_dict

    t0 = time.perf_counter()
    sd = build_state_dict(FULL_UNET, FULL_VAE, ema=False)
    prepared = C.prepare(sd, "raw")
    del sd
    model, vae = host_rdm.build(prepared)
    s = prepared["summary"]
    vae_params = sum(int(v.numel()) for v in prepared["vae"].values())
    del prepared
    built = time.perf_counter() - t0
    print(f"UNet {s['unet_params']:,} parameters in {s['unet_tensors']} tensors; VAE {vae_params:,}")
    print(f"built in {built:.1f} s, peak RSS {peak_gb():.1f} GB")
    ctx = torch.nn.functional.normalize(torch.randn(1, 20, 768), dim=-1)
    pos = [[ctx, {}]]
    neg = [[torch.zeros_like(ctx), {}]]
    latent = nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = nodes.common_ksampler(model, 1, args.steps, 5.0, "ddim", "ddim_uniform", pos, neg, latent)[0]
        step = (time.perf_counter() - t0) / args.steps
        t0 = time.perf_counter()
        image = nodes.VAEDecode().decode(vae, out)[0]
        dec = time.perf_counter() - t0
    print(f"{args.size}²: latent {tuple(out['samples'].shape)}, one step (cond+uncond) {step:.1f} s, decode {dec:.1f} s "
          f"to {tuple(image.shape)}, finite {bool(torch.isfinite(image).all())}; peak RSS {peak_gb():.1f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
