"""Time per step of `plms` vs ComfyUI's `ipndm` on the same model, conditioning and sigmas.

Run with ComfyUI's Python (ComfyUI found via --comfyui or COMFYUI_PATH):

    /work/comfyui/.venv/bin/python bench/bench_plms.py --ckpt tiny_sd15.safetensors [--steps 20 --reps 7]

The two samplers are interleaved (ABBA order) over repetitions and medians are reported. PLMS makes one
extra model call (N steps = N + 1 calls), so the fair ratio is per model call:
(t_plms / (N+1)) / (t_ipndm / N). The sampler's own overhead (total time minus time inside the model) is
printed too. Peak memory: CUDA max_memory_allocated, or on CPU the peak RSS above the pre-run level.
``--outside-inference`` adds one run of each outside inference mode with parameters requiring grad (a
script's situation), where a sampler without no_grad keeps the autograd graph of every step.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="SD1.x checkpoint (.safetensors), e.g. the tiny random one")
    ap.add_argument("--overhead", action="store_true",
                    help="instead of a checkpoint, time the samplers' own work with a one-conv model at 512^2 latents")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "/work/comfyui"), help="ComfyUI checkout")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (ddim_uniform; pick a divisor of 1000)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions per sampler (interleaved)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--batch", type=int, default=1, help="batch size")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument("--outside-inference", action="store_true",
                    help="also run once outside inference mode with parameters requiring grad")
    return ap.parse_args()


def setup_comfyui(path):
    sys.path.insert(0, path)
    argv = sys.argv
    import torch

    sys.argv = [argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  parses the arguments above
    sys.argv = argv
    import comfy.samplers  # noqa: F401  registration needs it loaded

    spec = importlib.util.spec_from_file_location("atelier", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["atelier"] = pack
    spec.loader.exec_module(pack)  # registers `plms`


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
        print(f"{name:6s} median {t * 1e3:8.2f} ms  per step {t / steps * 1e3:7.3f} ms  per call {t / calls * 1e3:7.3f} ms  "
              f"(min/max {min(times[name]) * 1e3:.1f}/{max(times[name]) * 1e3:.1f} ms)")
    print(f"ratio per step plms/ipndm: {med['plms'] / med['ipndm']:.4f}   per model call: "
          f"{(med['plms'] / (steps + 1)) / (med['ipndm'] / steps):.4f}")
    for name in fns:
        for inference in (True, False):
            t, peak, graph = run(name, inference)
            print(f"{name:6s} {'inference mode' if inference else 'grad enabled  '}  peak mem {peak / 2 ** 20:8.1f} MiB  "
                  f"output keeps a graph: {graph}")


def main():
    args = parse_args()
    setup_comfyui(args.comfyui)
    if args.overhead:
        return overhead(args)
    if not args.ckpt:
        raise SystemExit("bench_plms: give --ckpt PATH (an SD1.x checkpoint) or --overhead")
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import nodes
    device = mm.get_torch_device()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.ckpt, output_vae=False, output_clip=True)
    pos = nodes.CLIPTextEncode().encode(clip, "a lighthouse at dusk, oil painting")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    model_time = [0.0]
    calls = [0]

    def timed(apply_model, a):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = apply_model(a["input"], a["timestep"], **a["c"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_time[0] += time.perf_counter() - t0
        calls[0] += 1
        return out

    m = model.clone()
    m.set_model_unet_function_wrapper(timed)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "ddim_uniform", args.steps).cpu()
    steps = len(sigmas) - 1
    side = args.size // 8
    latent = torch.zeros(args.batch, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    samplers = {"plms": comfy.samplers.ksampler("plms"), "ipndm": comfy.samplers.ksampler("ipndm")}

    def run(name, inference=True):
        model_time[0], calls[0] = 0.0, 0
        ctx = torch.inference_mode() if inference else torch.enable_grad()
        with PeakMemory(device) as mem, ctx:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = comfy.sample.sample_custom(m, noise, args.cfg, samplers[name], sigmas, pos, neg, latent,
                                             disable_pbar=True, seed=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
        return {"total": total, "model": model_time[0], "calls": calls[0], "peak": mem.peak,
                "graph": bool(out.requires_grad)}

    for name in samplers:  # warm-up: model load, allocator, kernels
        run(name)
    results = {name: [] for name in samplers}
    for rep in range(args.reps):
        order = ["plms", "ipndm"] if rep % 2 == 0 else ["ipndm", "plms"]
        for name in order:
            results[name].append(run(name))

    print(f"device: {device}  torch {torch.__version__}  ckpt {os.path.basename(args.ckpt)}  "
          f"latent {args.batch}x4x{side}x{side}  steps {steps} (ddim_uniform)  cfg {args.cfg}  reps {args.reps}")
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
    print(f"sampler overhead per step plms/ipndm: {op / oi:.3f}  ({op / steps * 1e6:.0f} us vs {oi / steps * 1e6:.0f} us)")

    if args.outside_inference:
        for p in m.model.parameters():
            p.requires_grad_(True)
        for name in samplers:
            r = run(name, inference=False)
            print(f"outside inference mode, params requiring grad: {name:6s} total {r['total'] * 1e3:9.1f} ms  "
                  f"peak mem {r['peak'] / 2 ** 20:8.1f} MiB  output keeps a graph: {r['graph']}")


if __name__ == "__main__":
    main()
