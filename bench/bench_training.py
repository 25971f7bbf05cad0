"""Training speed and memory: LoRA rank 16, batch 1, with and without gradient checkpointing.

Run from the pack root with ComfyUI's Python, ComfyUI found through COMFYUI_PATH:

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/.venv/bin/python -m bench.bench_training \\
        --checkpoint tiny_sd15.safetensors [--resolution 64] [--steps 5]

The step is the trainer engine's (accelerate, training/engine.py) over the diffusion task, as
``python -m training finetune`` runs it. Each configuration runs in its own process (so peak RSS is per
configuration). Figures printed:
it/s, peak process memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU) and the bytes autograd
saves for backward in one step (what gradient checkpointing trades for recomputation). On a CPU use the
tiny random SD1.5 checkpoint (the one ``python -m runner WORKFLOW --tiny`` builds and caches; speed and
memory of plumbing only); the real
SD1.5 architecture at 512² wants a GPU and a full-size SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors).
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]


def worker(args):
    import torch

    from atelier.training.comfy_backend import SD1Backend
    from atelier.training.data import BucketBatchSampler
    from atelier.training.diffusion import DiffusionOptions, DiffusionTask, LatentItem
    from atelier.training.engine import Engine, EngineConfig, ParamGroup, enable_gradient_checkpointing, make_accelerator

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    mp = "bf16" if cuda else "no"
    acc = make_accelerator(mp, cpu=not cuda)
    backend = SD1Backend(args.checkpoint, device=str(acc.device), weight_dtype=torch.bfloat16 if cuda else torch.float32)
    groups = backend.inject(16, 16.0, "attention", False)
    params = {f"{p}.{n}": getattr(m, n).weight for p, m in groups["lora_unet"].items() for n in ("lora_down", "lora_up")}
    if args.gc:
        enable_gradient_checkpointing(backend.checkpoint_modules())
    r = args.resolution // 8
    items = [LatentItem(torch.randn(4, r, r), (r, r))]
    sampler = BucketBatchSampler([(args.resolution, args.resolution)], 1, 0)
    task = DiffusionTask(backend.unet, backend.te, backend.unet_fn, backend.encode_fn, backend.schedule, items,
                         ["a painting by Claude Monet, Impressionism"], sampler, DiffusionOptions(), 0)
    engine = Engine(EngineConfig(steps=10 ** 6, mixed_precision=mp), acc, task, {"unet": ParamGroup(params, 1e-4)},
                    task.batch, args.tmp, log=False)

    saved = [0]
    weights = {p.untyped_storage().data_ptr() for m in (backend.unet, backend.te) for p in m.parameters()}

    def pack(t):  # count activations only: frozen weights are also "saved", but they exist anyway
        if t.untyped_storage().data_ptr() not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.train_step()  # warm-up step, also measures what autograd keeps for backward
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"it_s": args.steps / dt, "peak_bytes": peak, "saved_bytes": saved[0],
                      "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="SD1.x checkpoint (the tiny random one on a CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="image side; default 64 on CPU, 512 on GPU")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a new temporary folder)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.tmp is None:
        with tempfile.TemporaryDirectory(prefix="atelier_bench_training_") as args.tmp:
            return compare(args)
    return compare(args)


def compare(args):
    """Both configurations, each in its own process, as one table."""
    import torch

    cuda = torch.cuda.is_available()
    res = args.resolution or (512 if cuda else 64)
    print(f"LoRA rank 16 (UNet attention layers), batch 1, {res}x{res}, "
          f"{'bf16 autocast on ' + torch.cuda.get_device_name() if cuda else 'fp32 on CPU'}, "
          f"checkpoint {os.path.basename(args.checkpoint)}")
    print(f"{'gradient checkpointing':>24} {'it/s':>8} {'peak memory':>14} {'activations saved':>20}")
    for gc in (False, True):
        cmd = [sys.executable, "-m", "bench.bench_training", "--worker", "--checkpoint", args.checkpoint,
               "--resolution", str(res), "--steps", str(args.steps), "--tmp", args.tmp] + (["--gc"] if gc else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=PACK_ROOT)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not line:
            print(f"{str(gc):>24} failed:\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line[-1])
        print(f"{str(gc):>24} {r['it_s']:8.3f} {r['peak_bytes'] / 2**20:11.0f} MiB {r['saved_bytes'] / 2**20:17.1f} MiB")


if __name__ == "__main__":
    main()
