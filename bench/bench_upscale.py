"""Benchmark the tiled SwinIR core: throughput and peak memory, tiled vs untiled and by tile size, and the
tiled-vs-untiled PSNR (seams). Prints a table; asserts nothing.

Run from the pack root:
CPU (default, tiny random SwinIR):   python -m bench.bench_upscale
GPU (full SwinIR-L architecture, random weights, 512^2 -> 2048^2):
                                     python -m bench.bench_upscale --device cuda --arch swinir-l --size 512

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (exact); on CPU the growth of the process RSS
sampled every 2 ms during the run (approximate, includes allocator caching).
"""
import argparse
import os
import pathlib
import sys
import threading
import time

import torch

from atelier.upscale.tiled import TileReport, receptive_radius, upscale_tiled
from atelier.tests.fixtures.tiny_swinir import tiny_swinir

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
# the configuration of 003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth (the model of "Generate Stunning
# Artworks with CLIP Guided Diffusion")
SWINIR_L = dict(img_size=64, embed_dim=240, depths=[6] * 9, num_heads=[8] * 9, mlp_ratio=2.0,
                resi_connection="3conv")


def build(arch, gain, seed=0):
    """tiny: the unit tests' model (x4 real-SR head); swinir-l: the full SwinIR-L, random weights."""
    from spandrel import ModelLoader
    from spandrel.architectures.SwinIR import SwinIR

    if arch == "tiny":
        return tiny_swinir(scale=4, upsampler="nearest+conv", gain=gain, seed=seed)
    torch.manual_seed(seed)
    net = SwinIR(in_chans=3, window_size=8, upscale=4, img_range=1.0, upsampler="nearest+conv", **SWINIR_L)
    return ModelLoader().load_from_state_dict(net.state_dict()).eval()


class RssPeak:
    """Peak growth of this process' resident memory while the block runs (Linux /proc)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.base


def _trim_heap():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure then over-counts nothing, it may under-count
        pass


def measure(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return out, dt, dt, torch.cuda.max_memory_allocated() - base
    _trim_heap()  # hand freed heap (model building, warm-up) back to the OS so RSS growth is the run's own
    with RssPeak() as peak:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        dt, cpu = time.perf_counter() - t, time.process_time() - c
    return out, dt, cpu, peak.bytes


def psnr(a, b):
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def run_one(a, spec, device, save=None):
    """One measurement: spec is "untiled" or "tile,overlap,batch". Returns a result dict."""
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build(a.arch, a.gain)
    model.model.to(device)
    x = torch.rand(1, 3, a.size, a.size, generator=torch.Generator().manual_seed(0)).to(device)
    model(x[:, :, :32, :32])  # warm-up
    rep = TileReport(0, 0, 0, (0, 0), 1, 1)
    if spec == "untiled":
        fn = lambda: model(x).float().cpu()  # noqa: E731
    else:
        tile, overlap, batch = map(int, spec.split(","))
        fn = lambda: upscale_tiled(model, x, tile=tile, overlap=overlap, tile_batch=batch,  # noqa: E731
                                   report=rep, device=device)
    out, dt, cpu, mem = measure(fn, device)
    if save:
        torch.save(out, save)
    return {"spec": spec, "wall": dt, "cpu": cpu, "peak": mem, "tiles": rep.tiles, "calls": rep.model_calls,
            "radius": receptive_radius(model), "out": out}


def child_result(a, spec, device):
    """CPU: measure in a fresh process so RSS peaks are not hidden by memory an earlier run left mapped."""
    if device.type != "cpu":
        return run_one(a, spec, device)
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        cmd = [sys.executable, "-m", "bench.bench_upscale", "--child", spec, "--save", path, "--arch", a.arch,
               "--size", str(a.size), "--gain", str(a.gain), "--threads", str(a.threads), "--device", "cpu"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PACK_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["out"] = torch.load(path, weights_only=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", choices=["tiny", "swinir-l"], default="tiny")
    p.add_argument("--size", type=int, default=256, help="input edge (square); output is 4x")
    p.add_argument("--tiles", default="64,128,256", help="comma-separated tile sizes")
    p.add_argument("--overlaps", default="0,8,16,48", help="overlaps for the seam table (at the first tile size)")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="tile batch for the batched row")
    p.add_argument("--gain", type=float, default=16.0, help="weight sharpening for random weights (tiny)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args()
    device = torch.device(a.device)
    if a.child:
        import json

        res = run_one(a, a.child, device, save=a.save)
        res.pop("out")
        print(json.dumps(res))
        return

    mp_out = (a.size * 4) ** 2 / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{a.threads or 'default'} thread(s)"
    tiles = [int(t) for t in a.tiles.split(",")]
    specs = ["untiled"] + [f"{t},{a.overlap},1" for t in tiles if a.overlap < t]
    specs += [f"{tiles[0]},{a.overlap},{a.batch}"] if a.batch > 1 and a.overlap < tiles[0] else []
    specs += [f"{tiles[0]},{ov},1" for ov in map(int, a.overlaps.split(",")) if ov != a.overlap and ov < tiles[0]]
    ref = None
    header = False
    for spec in specs:
        try:
            res = child_result(a, spec, device)
        except (RuntimeError, MemoryError) as exc:
            print(f"{spec:>22}: failed ({str(exc)[:100]})")
            continue
        if not header:
            print(f"# SwinIR {a.arch} x4, {a.size}^2 -> {a.size * 4}^2, device {device} ({where}), "
                  f"receptive-field bound {res['radius']} px, torch {torch.__version__}")
            print(f"{'config':>22}  {'wall':>7} {'cpu':>9}  {'MP/s*':>7}  {'peak':>12}  {'tiles':>5} {'calls':>5}"
                  f"  PSNR vs untiled")
            header = True
        out = res["out"]
        if spec == "untiled":
            ref, name, q = out, "untiled", ""
        else:
            tile, overlap, batch = spec.split(",")
            name = f"tile {tile} ov {overlap} b{batch}"
            q = "-" if ref is None else f"{psnr(out, ref):6.1f} dB  max|d| {(out - ref).abs().max().item():.1e}"
        secs = res["cpu"] if device.type == "cpu" else res["wall"]
        print(f"{name:>22}: {res['wall']:7.2f} s {res['cpu']:7.2f} s  {mp_out / secs:7.3f}  "
              f"{res['peak'] / 2**20:8.1f} MiB  {res['tiles']:5d} {res['calls']:5d}  {q}", flush=True)
    print("# MP/s* = output megapixels per second of process CPU time on CPU (wall time is noisy when other "
          "processes share the CPU), per wall second on CUDA; peak = RSS growth (CPU, fresh process each row) or "
          "max_memory_allocated (CUDA)")


if __name__ == "__main__":
    main()
