"""Time per step of `plms` vs ComfyUI's `ipndm` on the same model, conditioning and sigmas.

Run from the pack root with ComfyUI's Python (ComfyUI found via --comfyui, COMFYUI_PATH, or the ComfyUI the
pack is installed in):

    COMFYUI_PATH=/path/to/ComfyUI  /path/to/ComfyUI/.venv/bin/python -m bench.bench_plms \\
        --ckpt tiny_sd15.safetensors [--steps 20 --reps 7]
    COMFYUI_PATH=/path/to/ComfyUI  /path/to/ComfyUI/.venv/bin/python -m bench.bench_plms --overhead

The two samplers are interleaved (ABBA order) over repetitions and medians are reported. PLMS makes one
extra model call (N steps = N + 1 calls), so the fair ratio is per model call:
(t_plms / (N+1)) / (t_ipndm / N). The sampler's own overhead (total time minus time inside the model) is
printed too. Peak memory: CUDA max_memory_allocated, or on CPU the peak RSS above the pre-run level.
``--outside-inference`` adds one run of each outside inference mode with parameters requiring grad (a
script's situation), where a sampler without no_grad keeps the autograd graph of every step.
"""
import argparse
import os
import statistics
import threading
import time

from atelier.host.locate import attach


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="SD1.x checkpoint (.safetensors), e.g. the tiny random one")
    ap.add_argument("--overhead", action="store_true",
                    help="instead of a checkpoint, time the samplers' own work with a one-conv model at 512^2 latents")
    ap.add_argument("--comfyui", default=None,
                    help="ComfyUI checkout (default: COMFYUI_PATH, or the ComfyUI the pack is installed in)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (ddim_uniform; pick a divisor of 1000)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions per sampler (interleaved)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--batch", type=int, default=1, help="batch size")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument("--outside-inference", action="store_true",
                    help="also run once outside inference mode with parameters requiring grad")
    return ap.parse_args()


def setup_comfyui(path=None):
    """ComfyUI importable (CPU without CUDA), then the pack, which registers `plms` in ComfyUI's lists."""
    attach(path)
    import comfy.samplers  # noqa: F401  registration needs it loaded
    import atelier.nodes  # noqa: F401  registers `plms`


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or polled RSS above the starting level on CPU."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak_rss = self.rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak_rss, self.rss()) - self.base


def overhead(args):
    """Sampler arithmetic only: a one-conv model (parameters requiring grad) on 4x64x64 latents, so the
    step cost is the sampler's own tensor work plus a small conv; and the memory kept outside inference mode."""
    import torch

    import comfy.k_diffusion.sampling as kds

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(device)

    def model(x, sigma, **kw):
        s = sigma.view(-1, 1, 1, 1)
        return x - s * conv(x / (1 + s ** 2) ** 0.5)

    steps = args.steps
    sigmas = torch.cat([torch.linspace(14.6, 0.03, steps), torch.zeros(1)]).to(device)
    x = torch.randn(args.batch, 4, args.size // 8, args.size // 8, device=device) * 14.6
    fns = {"plms": kds.sample_plms, "ipndm": kds.sample_ipndm}

    def run(name, inference=True):
        ctx = torch.inference_mode() if inference else torch.enable_grad()
        with PeakMemory(device) as mem, ctx:
            t0 = time.perf_counter()
            out = fns[name](model, x, sigmas, disable=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
        return total, mem.peak, bool(out.requires_grad)

    for name in fns:
        run(name)
    times = {name: [] for name in fns}
    for rep in range(args.reps):
        for name in (["plms", "ipndm"] if rep % 2 == 0 else ["ipndm", "plms"]):
            times[name].append(run(name)[0])
    print(f"overhead mode: device {device}  latent {tuple(x.shape)}  steps {steps}  reps {args.reps}  (one-conv model)")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        calls = steps + 1 if name == "plms" else steps
        print(f"{name:6s} median {t * 1e3:8.2f} ms  per step {t / steps * 1e3:7.3f} ms  "
              f"per call {t / calls * 1e3:7.3f} ms  "
              f"(min/max {min(times[name]) * 1e3:.1f}/{max(times[name]) * 1e3:.1f} ms)")
    print(f"ratio per step plms/ipndm: {med['plms'] / med['ipndm']:.4f}   per model call: "
          f"{(med['plms'] / (steps + 1)) / (med['ipndm'] / steps):.4f}")
    for name in fns:
        for inference in (True, False):
            t, peak, graph = run(name, inference)
            mode = "inference mode" if inference else "grad enabled  "
            print(f"{name:6s} {mode}  peak mem {peak / 2 ** 20:8.1f} MiB  output keeps a graph: {graph}")


class TimedModel:
    """The checkpoint's MODEL with its UNet call wrapped: model calls counted and the time inside them summed."""

    def __init__(self, model, device):
        self.device, self.seconds, self.calls = device, 0.0, 0
        self.model = model.clone()
        self.model.set_model_unet_function_wrapper(self.unet)

    def sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def unet(self, apply_model, a):
        self.sync()
        t0 = time.perf_counter()
        out = apply_model(a["input"], a["timestep"], **a["c"])
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def checkpoint_runs(args):
    """(run(name, inference) -> figures of one sampling run, steps, latent side, device) for the checkpoint."""
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    from atelier.host.models import load_checkpoint

    device = mm.get_torch_device()
    model, clip, _ = load_checkpoint(args.ckpt, embeddings=False)
    pos, neg = (clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in ("a lighthouse at dusk, oil painting", ""))
    timed = TimedModel(model, device)
    sigmas = comfy.samplers.calculate_sigmas(timed.model.get_model_object("model_sampling"), "ddim_uniform",
                                             args.steps).cpu()
    side = args.size // 8
    latent = torch.zeros(args.batch, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    samplers = {"plms": comfy.samplers.ksampler("plms"), "ipndm": comfy.samplers.ksampler("ipndm")}

    def run(name, inference=True):
        timed.seconds, timed.calls = 0.0, 0
        ctx = torch.inference_mode() if inference else torch.enable_grad()
        with PeakMemory(device) as mem, ctx:
            timed.sync()
            t0 = time.perf_counter()
            out = comfy.sample.sample_custom(timed.model, noise, args.cfg, samplers[name], sigmas, pos, neg, latent,
                                             disable_pbar=True, seed=0)
            timed.sync()
            total = time.perf_counter() - t0
        return {"total": total, "model": timed.seconds, "calls": timed.calls, "peak": mem.peak,
                "graph": bool(out.requires_grad)}

    return run, timed.model, len(sigmas) - 1, side, device


def print_results(results, steps):
    med = {}
    for name, rows in results.items():
        calls_n = rows[0]["calls"]
        t = statistics.median(r["total"] for r in rows)
        over = statistics.median(r["total"] - r["model"] for r in rows)
        peak = max(r["peak"] for r in rows)
        med[name] = (t, calls_n, over)
        print(f"{name:6s} calls {calls_n:3d}  median total {t * 1e3:9.2f} ms  per step {t / steps * 1e3:8.3f} ms  "
              f"per call {t / calls_n * 1e3:8.3f} ms  sampler overhead/step {over / steps * 1e3:7.3f} ms  "
              f"peak mem {peak / 2 ** 20:8.1f} MiB  (min/max total {min(r['total'] for r in rows) * 1e3:.1f}/"
              f"{max(r['total'] for r in rows) * 1e3:.1f} ms)")
    (tp, cp, op), (ti, ci, oi) = med["plms"], med["ipndm"]
    print(f"ratio per step  plms/ipndm: {tp / ti:.4f}  (includes the extra first-step call)")
    print(f"ratio per model call plms/ipndm: {(tp / cp) / (ti / ci):.4f}  (target <= 1.01)")
    print(f"sampler overhead per step plms/ipndm: {op / oi:.3f}  ({op / steps * 1e6:.0f} us vs "
          f"{oi / steps * 1e6:.0f} us)")


def main():
    args = parse_args()
    setup_comfyui(args.comfyui)
    if args.overhead:
        return overhead(args)
    if not args.ckpt:
        raise SystemExit("bench_plms: give --ckpt PATH (an SD1.x checkpoint) or --overhead")
    import torch

    run, model, steps, side, device = checkpoint_runs(args)
    for name in ("plms", "ipndm"):  # warm-up: model load, allocator, kernels
        run(name)
    results = {"plms": [], "ipndm": []}
    for rep in range(args.reps):
        for name in (["plms", "ipndm"] if rep % 2 == 0 else ["ipndm", "plms"]):
            results[name].append(run(name))
    print(f"device: {device}  torch {torch.__version__}  ckpt {os.path.basename(args.ckpt)}  "
          f"latent {args.batch}x4x{side}x{side}  steps {steps} (ddim_uniform)  cfg {args.cfg}  reps {args.reps}")
    print_results(results, steps)
    if args.outside_inference:
        for p in model.model.parameters():
            p.requires_grad_(True)
        for name in results:
            r = run(name, inference=False)
            print(f"outside inference mode, params requiring grad: {name:6s} total {r['total'] * 1e3:9.1f} ms  "
                  f"peak mem {r['peak'] / 2 ** 20:8.1f} MiB  output keeps a graph: {r['graph']}")


if __name__ == "__main__":
    main()
