"""Cost of CLIP guidance per step vs plain sampling (see docs/clip_guidance.md, "Cost").

Run from the pack root with ComfyUI's Python (it builds the SD1.5 UNet, the SD VAE and TAESD from ComfyUI's
classes, with random weights) and open_clip installed; ComfyUI is found via --comfyui, COMFYUI_PATH, or the
ComfyUI the pack is installed in:

    COMFYUI_PATH=/path/to/ComfyUI  /path/to/ComfyUI/.venv/bin/python -m bench.bench_clip_guidance --size 256

It prints, per configuration, the time and peak memory of: a plain step (UNet, cfg batch 2), the decoder
forward+backward, CLIP forward+backward on the cutouts, and a guided step (plain step + guidance), then
the guided step against the sum of its parts and against the plain step. Weights are random: this
measures cost only. Memory ("mem"): the CUDA allocator's peak above the resting state on a GPU; on CPU,
where allocator peaks cannot be observed, the bytes autograd saves for backward during the run.
"""
import argparse
import contextlib
import time

import torch

from atelier.host.locate import attach
from atelier.samplers import clip_guidance as cg


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """CUDA allocator peak above the memory allocated when the block starts."""

    def __init__(self, device):
        self.device, self.peak, self.extra = device, 0, 0

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()
        self.extra = self.peak - self.base


class SavedForBackward:
    """Bytes autograd keeps for backward inside a block (distinct storages): the memory guidance adds
    that grows with cutn and resolution. Reported on CPU, where allocator peaks are not observable."""

    def __enter__(self):
        self.bytes, self._seen = 0, set()

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def timed(fn, device, repeats, warmup=1):
    """Median wall time of fn() over repeats (after warm-up runs) and the peak extra memory of one run:
    CUDA allocator peak on a GPU, bytes saved for backward on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            fn()
        return sorted(times)[len(times) // 2], mem.extra
    with SavedForBackward() as saved:
        fn()
    return sorted(times)[len(times) // 2], saved.bytes


# ---------------------------------------------------------------------------------------------- models
def random_init(module):
    """ComfyUI's disable_weight_init layers start uninitialised: give every weight small random values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module


def build_unet(dtype, device):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
               channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
               transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], use_spatial_transformer=True,
               context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, legacy=False,
               adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)
    return random_init(UNetModel(**cfg, operations=comfy.ops.disable_weight_init)).eval().to(device, dtype)


def build_vae(dtype, device):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = random_init(AutoencoderKL(ddconfig=dd, embed_dim=4)).eval().requires_grad_(False)
    vae.encoder = None
    return vae.to(device, dtype)


def build_taesd(device):
    from comfy.taesd.taesd import TAESD

    t = TAESD(latent_channels=4)
    t.taesd_encoder = None
    return random_init(t).eval().requires_grad_(False).to(device)


def build_clip(arch, dtype, device):
    import open_clip

    model = open_clip.create_model(arch, pretrained=None).eval().requires_grad_(False).to(device, dtype)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return model, int(size)


# ---------------------------------------------------------------------------------------------- bench
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=[256], help="image side(s) in pixels")
    ap.add_argument("--cutn", type=int, nargs="+", default=[16, 64], help="cutouts per CLIP batch")
    ap.add_argument("--clip", nargs="+", default=["ViT-B-16", "ViT-L-14"], help="open_clip architectures")
    ap.add_argument("--decoder", nargs="+", default=["taesd", "vae"], choices=["taesd", "vae"])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per figure (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--configs", default="", help="comma-separated decoder:arch:cutn triples instead of the full "
                                                    "product of --decoder, --clip and --cutn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint-decoder", action="store_true", help="recompute the decoder (less memory)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--comfyui", default=None,
                    help="ComfyUI checkout (default: COMFYUI_PATH, or the ComfyUI the pack is installed in)")
    args = ap.parse_args()
    args.wanted = set()
    for triple in filter(None, args.configs.split(",")):
        d, a, c = triple.split(":")
        args.wanted.add((d, a, int(c)))
    if args.wanted:
        args.decoder = sorted({d for d, _, _ in args.wanted}, reverse=True)
        args.clip = sorted({a for _, a, _ in args.wanted})
        args.cutn = sorted({c for _, _, c in args.wanted})
    return args


class Bench:
    """The models shared by every figure and the timed pieces: plain step, decoder, CLIP, guided step."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.unet = build_unet(self.dtype, self.device)
        self.decoders = {}
        if "taesd" in args.decoder:
            taesd = build_taesd(self.device)
            self.decoders["taesd"] = lambda z: taesd.decode(z.float())
        if "vae" in args.decoder:
            vae = build_vae(self.dtype, self.device)
            self.decoders["vae"] = lambda z: vae.decode((z / 0.18215).to(self.dtype)).float()
        self.context = torch.randn(2, 77, 768, device=self.device, dtype=self.dtype)
        self.rows = []

    def timed(self, fn):
        return timed(fn, self.device, self.args.repeats, self.args.warmup)

    def plain(self, x):
        with torch.no_grad():
            xin = torch.cat([x, x]).to(self.dtype) / (1 + 25) ** 0.5
            eps = self.unet(xin, torch.tensor([600.0, 600.0], device=self.device), context=self.context)
            cond, uncond = (x - eps.float() * 5).chunk(2)
            return uncond + (cond - uncond) * 7.0

    def size(self, size):
        """Every decoder x CLIP x cutn figure at one image size."""
        x = torch.randn(1, 4, size // 8, size // 8, device=self.device)
        t_plain, m_plain = self.timed(lambda: self.plain(x))
        print(f"\n{size}x{size}: plain step (UNet, cfg batch 2): {t_plain * 1e3:9.1f} ms  "
              f"mem {m_plain / 2**20:7.0f} MiB", flush=True)
        for dname, decode in self.decoders.items():
            def dec_fb():
                z = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    torch.autograd.grad(decode(z).float().square().mean(), [z])

            t_dec, m_dec = self.timed(dec_fb)
            print(f"  {dname:5s} decode fwd+bwd:           {t_dec * 1e3:9.1f} ms  mem {m_dec / 2**20:7.0f} MiB",
                  flush=True)
            for arch in self.args.clip:
                cutns = [c for c in self.args.cutn if not self.args.wanted or (dname, arch, c) in self.args.wanted]
                if cutns:
                    self.clip(size, x, dname, decode, arch, cutns, t_plain, t_dec)

    def clip(self, size, x, dname, decode, arch, cutns, t_plain, t_dec):
        """CLIP fwd+bwd and the guided step for one CLIP architecture (the model is freed on return)."""
        model, csize = build_clip(arch, self.dtype, self.device)
        target = torch.nn.functional.normalize(torch.randn(1, model.text_projection.shape[1]), dim=-1)
        targets = cg.build_targets(target.to(self.device), [1.0])

        def embed(p):
            return model.encode_image(torch.nn.functional.interpolate(p, size=(csize, csize)).to(self.dtype))

        sigma = torch.tensor([5.0], device=self.device)
        for cutn in cutns:
            cuts = torch.rand(cutn, 3, csize, csize, device=self.device)

            def clip_fb():
                c = cuts.clone().requires_grad_(True)
                with torch.enable_grad():
                    torch.autograd.grad(embed(c).float().sum(), [c])

            t_clip, m_clip = self.timed(clip_fb)
            opts = cg.GuidanceOptions(cutn=cutn, cut_batches=1, decoder_checkpoint=self.args.checkpoint_decoder)
            guidance = cg.CLIPGuidance(embed, csize, targets, decode, opts, seed=0)

            def guided():
                with torch.inference_mode():
                    return guidance(self.plain(x), sigma)

            t_g, m_g = self.timed(guided)
            parts = t_plain + t_dec + t_clip
            print(f"  {dname:5s} + {arch:8s} x{cutn:3d} cuts: CLIP fwd+bwd {t_clip * 1e3:8.1f} ms "
                  f"mem {m_clip / 2**20:5.0f} MiB  guided step {t_g * 1e3:9.1f} ms  mem {m_g / 2**20:6.0f} MiB  "
                  f"guided/parts {t_g / parts:5.2f}  guided/plain {t_g / t_plain:5.2f}", flush=True)
            self.rows.append((size, dname, arch, cutn, t_plain, t_dec, t_clip, t_g, m_g))

    def summary(self):
        print("\nsummary (ms): size decoder clip cutn | plain decode clip | guided (mem MiB) | "
              "guided/parts guided/plain")
        for size, dname, arch, cutn, tp, td, tc, tg, mg in self.rows:
            print(f"  {size:4d} {dname:5s} {arch:8s} {cutn:3d} | {tp * 1e3:8.1f} {td * 1e3:8.1f} {tc * 1e3:8.1f} | "
                  f"{tg * 1e3:8.1f} ({mg / 2**20:6.0f}) | {tg / (tp + td + tc):5.2f} {tg / tp:5.2f}")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    attach(args.comfyui, cpu=device.type == "cpu")  # ComfyUI's model management then uses the bench's device
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({where}), dtype {torch.float16 if device.type == 'cuda' else torch.float32}, "
          f"random weights, cut_batches 1, repeats {args.repeats}", flush=True)
    bench = Bench(args)
    for size in args.size:
        bench.size(size)
    bench.summary()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
