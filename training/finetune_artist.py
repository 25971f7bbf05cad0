"""Fine-tune an SD 1.x checkpoint on one artist's paintings; write a kohya LoRA or a full checkpoint.

Run from the pack folder with ComfyUI's Python (its venv), ComfyUI found through --comfyui, COMFYUI_PATH or
the ComfyUI this pack is installed in:

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/.venv/bin/python -m training finetune \\
        --data wikiart/ --artist "Claude Monet" --checkpoint v1-5-pruned-emaonly.safetensors --output out/monet

Several GPUs: ``torchrun --nproc_per_node 4 -m training finetune ...`` (--batch-size is per GPU).
See docs/training.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

from ..common.files import atomic_write, file_sha256
from ..common.progress import TqdmProgress
from .data import (CAPTION_MODES, DEFAULT_TEMPLATE, BucketBatchSampler, DataError, assign_buckets, cache_latents,
                   clip_filter, scan_folder)

DEFAULTS = {
    "data": None, "checkpoint": None, "output": "artist_out", "output_name": "", "comfyui": None,
    "artist": "", "trigger": "", "caption_mode": "both", "caption_template": DEFAULT_TEMPLATE,
    "metadata_file": None, "small_images": "error",
    "clip_filter": False, "clip_threshold": 0.2, "clip_model": "ViT-B-32", "clip_weights": None,
    "resolution": 512, "buckets": True, "bucket_step": 64, "max_aspect": 2.0, "cache_dir": None,
    "method": "lora", "rank": 16, "alpha": 8.0, "unet_targets": "attention", "train_text_encoder": False,
    "text_encoder_only_steps": 0, "steps": 1000, "batch_size": 1, "lr": 1e-4, "lr_text_encoder": 5e-5,
    "weight_decay": 1e-2, "max_grad_norm": 1.0, "mixed_precision": "auto", "gradient_checkpointing": False,
    "ema_decay": 0.0, "seed": 0, "checkpoint_every": 100, "keep_checkpoints": 2, "resume": None,
    "save_dtype": "fp16", "export": "auto", "device": "auto", "progress": True,
}


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """All flags; with ``suppress`` defaults are hidden so we can tell which flags were typed."""
    p = argparse.ArgumentParser(
        prog="python -m training finetune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress else None)

    def add(*flags, key, **kw):
        if not suppress:
            kw.setdefault("default", DEFAULTS[key])
        p.add_argument(*flags, dest=key, **kw)

    g = p.add_argument_group("inputs")
    g.add_argument("--config", default=argparse.SUPPRESS if suppress else None,
                   help="JSON file of settings (keys = long flag names with _); typed flags win over it")
    add("--data", key="data", help="folder of one artist's images (WikiArt Style/artist_title-year.jpg or any)")
    add("--checkpoint", key="checkpoint", help="SD 1.x single-file checkpoint to fine-tune (.safetensors)")
    add("--output", key="output", help="output folder (LoRA/checkpoint, config.json, checkpoints/, cache)")
    add("--output-name", key="output_name", help="file name stem of the result (default: artist name)")
    add("--comfyui", key="comfyui", help="ComfyUI root (else COMFYUI_PATH, else the ComfyUI holding this pack)")
    g = p.add_argument_group("captions and data")
    add("--artist", key="artist", help="artist name (default: most common name parsed from WikiArt file names)")
    add("--trigger", key="trigger", help="optional trigger word put first in every caption")
    add("--caption-mode", key="caption_mode", choices=CAPTION_MODES,
        help="template over metadata, sidecar .txt files, or template followed by the sidecar text")
    add("--caption-template", key="caption_template", help="template; fields {artist} {style} {genre} {title} {year}")
    add("--metadata-file", key="metadata_file", help="CSV/JSONL with a 'path' column adding e.g. genre per image")
    add("--small-images", key="small_images", choices=("error", "skip", "upscale"),
        help="what to do with images smaller than resolution²")
    add("--clip-filter", key="clip_filter", action=argparse.BooleanOptionalAction,
        help="drop image–caption pairs whose CLIP similarity is below --clip-threshold (as in 'Novel Paintings "
             "from the Latent Diffusion Model through Transfer Learning')")
    add("--clip-threshold", key="clip_threshold", type=float, help="CLIP cosine similarity threshold")
    add("--clip-model", key="clip_model", help="open_clip architecture for the filter")
    add("--clip-weights", key="clip_weights", help="open_clip weights file for the filter")
    add("--resolution", key="resolution", type=int, help="training resolution (bucket area = resolution²)")
    add("--buckets", key="buckets", action=argparse.BooleanOptionalAction, help="aspect-ratio buckets")
    add("--bucket-step", key="bucket_step", type=int, help="bucket side multiple (pixels)")
    add("--max-aspect", key="max_aspect", type=float, help="largest bucket aspect ratio")
    add("--cache-dir", key="cache_dir", help="latent cache folder (default OUTPUT/latent_cache)")
    g = p.add_argument_group("method")
    add("--method", key="method", choices=("lora", "full"), help="LoRA or full fine-tune")
    add("--rank", key="rank", type=int, help="LoRA rank")
    add("--alpha", key="alpha", type=float, help="LoRA alpha (scale = alpha / rank)")
    add("--unet-targets", key="unet_targets", choices=("attention", "all"),
        help="UNet layers with LoRA: transformer blocks only, or every Linear/Conv2d")
    add("--train-text-encoder", key="train_text_encoder", action=argparse.BooleanOptionalAction,
        help="train the text encoder too (LoRA or full)")
    add("--text-encoder-only-steps", key="text_encoder_only_steps", type=int,
        help="first N steps train the text encoder alone, then jointly (as in 'Creative Painting with Latent "
             "Diffusion Models'); 0 = joint only")
    g = p.add_argument_group("optimisation")
    add("--steps", key="steps", type=int, help="optimiser steps")
    add("--batch-size", key="batch_size", type=int, help="images per step per process")
    add("--lr", key="lr", type=float, help="UNet learning rate (full fine-tune: use ~1e-5, the value of 'Novel "
        "Paintings from the Latent Diffusion Model through Transfer Learning')")
    add("--lr-text-encoder", key="lr_text_encoder", type=float, help="text-encoder learning rate")
    add("--weight-decay", key="weight_decay", type=float, help="AdamW weight decay")
    add("--max-grad-norm", key="max_grad_norm", type=float, help="gradient clipping norm (0 = off)")
    add("--mixed-precision", key="mixed_precision", choices=("auto", "no", "bf16", "fp16"),
        help="autocast dtype; fp16 uses loss scaling; auto = bf16 on GPUs that support it, else no")
    add("--gradient-checkpointing", key="gradient_checkpointing", action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward pass (less memory, ~30%% slower)")
    add("--ema-decay", key="ema_decay", type=float, help="EMA of the trained weights (0 = off, e.g. 0.999)")
    add("--seed", key="seed", type=int, help="seed for noise, timesteps and data order")
    g = p.add_argument_group("checkpoints and output")
    add("--checkpoint-every", key="checkpoint_every", type=int, help="save a resumable state every N steps (0 = end only)")
    add("--keep-checkpoints", key="keep_checkpoints", type=int, help="how many resumable states to keep")
    add("--resume", key="resume", nargs="?", const="latest",
        help="continue from OUTPUT/checkpoints' latest state, or from the given checkpoint folder")
    add("--save-dtype", key="save_dtype", choices=("fp16", "bf16", "fp32"),
        help="dtype of the written LoRA and of the UNet/text encoder in a full checkpoint")
    add("--export", key="export", choices=("auto", "lora", "checkpoint", "both"),
        help="what to write: auto = LoRA for --method lora, full checkpoint for --method full")
    add("--device", key="device", help="auto, cpu, cuda, cuda:1 ... (torchrun sets one GPU per process)")
    add("--progress", key="progress", action=argparse.BooleanOptionalAction, help="tqdm progress bar")
    return p


def resolve_config(argv=None) -> dict:
    """defaults < JSON --config < flags typed on the command line."""
    args = build_parser().parse_args(argv)
    typed = vars(build_parser(suppress=True).parse_args(argv))
    cfg = dict(DEFAULTS)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                from_file = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read --config {args.config}: {e}")
        unknown = sorted(set(from_file) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"error: unknown keys in {args.config}: {unknown}; valid keys: {sorted(DEFAULTS)}")
        cfg.update(from_file)
    typed.pop("config", None)
    cfg.update(typed)
    cfg["config"] = args.config
    for key in ("data", "checkpoint"):
        if not cfg.get(key):
            raise SystemExit(f"error: --{key} is required (on the command line or in --config)")
    if cfg["text_encoder_only_steps"] > 0 and not cfg["train_text_encoder"]:
        raise SystemExit("error: --text-encoder-only-steps needs --train-text-encoder")
    if cfg["resolution"] % cfg["bucket_step"]:
        raise SystemExit(f"error: --resolution {cfg['resolution']} must be a multiple of --bucket-step {cfg['bucket_step']}")
    return cfg


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "artist"


def _init_distributed():
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_precision(cfg, device):
    import torch

    mp = cfg["mixed_precision"]
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return mp


def load_clip_embedder(cfg, device):
    """The open_clip embedder of the style databases (retrieval/) for the similarity filter."""
    from ..retrieval.embedder import load_open_clip

    if not cfg["clip_weights"]:
        raise SystemExit("error: --clip-filter needs --clip-weights (an open_clip weights file for --clip-model)")
    return load_open_clip(cfg["clip_model"], cfg["clip_weights"], device=str(device))


def _device(cfg):
    import torch

    if cfg["device"] == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg["device"])


def _load_data(cfg, say):
    """(samples, artist, styles) from the data folder; the artist defaults to the most common parsed name."""
    try:
        scan = scan_folder(cfg["data"], cfg["resolution"], cfg["caption_mode"], cfg["caption_template"],
                           cfg["trigger"], cfg["artist"], cfg["small_images"], cfg["metadata_file"])
    except DataError as e:
        raise SystemExit(f"error: {e}")
    samples = scan.samples
    for path, reason in scan.skipped:
        say(f"skipped {path}: {reason}")
    parsed = collections.Counter(s.meta["artist"] for s in samples if s.meta.get("artist"))
    artist = cfg["artist"] or (parsed.most_common(1)[0][0] if parsed else "")
    if not artist:
        raise SystemExit("error: no artist name: pass --artist (file names are not in WikiArt's artist_title form)")
    styles = [s for s, _ in collections.Counter(x.meta["style"] for x in samples if x.meta.get("style")).most_common()]
    return samples, artist, styles


def _load_backend(cfg, device, mp):
    """The SD1.x model through ComfyUI's loader; weights in the dtype the method and precision call for."""
    import torch

    from .comfy_backend import BackendError, SD1Backend

    weight_dtype = None
    if device.type == "cuda" and cfg["method"] == "lora" and mp != "no":
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mp]
    elif cfg["method"] == "full" or device.type == "cpu" or mp == "no":
        weight_dtype = torch.float32
    try:
        return SD1Backend(cfg["checkpoint"], cfg["comfyui"], str(device), weight_dtype)
    except BackendError as e:
        raise SystemExit(f"error: {e}")


def _clip_filtered(cfg, samples, device, out, rank, say):
    """Drop image–caption pairs below the CLIP similarity threshold; the dropped ones are listed in a file."""
    embedder = load_clip_embedder(cfg, device)
    samples, dropped = clip_filter(samples, embedder, cfg["clip_threshold"])
    report = [{"path": s.path, "caption": s.caption, "score": round(sc, 4)} for s, sc in dropped]
    if rank == 0:
        atomic_write(os.path.join(out, "clip_filter_dropped.json"), json.dumps(report, indent=1))
    say(f"CLIP filter (threshold {cfg['clip_threshold']}): kept {len(samples)}, dropped {len(dropped)}"
        + "".join(f"\n  dropped {r['path']} (similarity {r['score']})" for r in report[:20]))
    if not samples:
        raise SystemExit("error: the CLIP filter dropped every image; lower --clip-threshold or fix the captions")
    return samples


class TrainingProgress(TqdmProgress):
    """The trainer's bar: steps done, with the last loss and the stage after the count."""

    postfix = None

    def show_loss(self, loss, stage):
        self.postfix = {"loss": f"{loss:.4f}", "stage": stage}

    def update(self, done, total, preview=None):
        super().update(done, total, preview)
        if self._bar is not None and self.postfix:
            self._bar.set_postfix(self.postfix, refresh=False)


def _cached_latents(cfg, samples, backend, out, rank):
    """Latents of every sample: rank 0 encodes into the cache, the other ranks read it after the barrier."""
    cache_dir = cfg["cache_dir"] or os.path.join(out, "latent_cache")
    vae_hash = backend.vae_hash()
    if rank == 0:
        progress = TqdmProgress("caching latents", unit="image", enabled=cfg["progress"])
        try:
            cache_latents(samples, backend.vae_encode, cache_dir, vae_hash, progress)
        finally:
            progress.close()
    _barrier()
    return cache_latents(samples, backend.vae_encode, cache_dir, vae_hash)


def _trainable(cfg, backend):
    """({"unet": {name: param}, "te": {...}}, LoRA groups or {}) with requires_grad set."""
    from .loop import enable_gradient_checkpointing

    params, groups = {}, {}
    if cfg["method"] == "lora":
        groups = backend.inject(cfg["rank"], cfg["alpha"], cfg["unet_targets"], cfg["train_text_encoder"])
        for key, group in (("unet", "lora_unet"), ("te", "lora_te")):
            if group in groups:
                params[key] = {f"{p}.{n}": t for p, m in sorted(groups[group].items())
                               for n, t in (("down", m.lora_down.weight), ("up", m.lora_up.weight))}
    else:
        params["unet"] = dict(backend.unet.named_parameters())
        if cfg["train_text_encoder"]:
            params["te"] = dict(backend.te_root.named_parameters())
    for group in params.values():
        for p in group.values():
            p.requires_grad_(True)
    if cfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(backend.checkpoint_modules())
    return params, groups


def _trainer(cfg, backend, params, samples, latents, artist, out, device, mp, rank, world, say):
    from .loop import TrainConfig, Trainer, latest_checkpoint

    tcfg = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], lr_unet=cfg["lr"],
                       lr_text_encoder=cfg["lr_text_encoder"], text_encoder_only_steps=cfg["text_encoder_only_steps"],
                       weight_decay=cfg["weight_decay"], max_grad_norm=cfg["max_grad_norm"], mixed_precision=mp,
                       ema_decay=cfg["ema_decay"], seed=cfg["seed"], checkpoint_every=cfg["checkpoint_every"],
                       keep_checkpoints=cfg["keep_checkpoints"])
    sampler = BucketBatchSampler([s.bucket for s in samples], cfg["batch_size"], cfg["seed"], rank, world)
    trainer = Trainer(tcfg, backend.unet_fn, backend.encode_fn, backend.schedule, params, latents,
                      [s.caption for s in samples], sampler, out, device,
                      run_info={"artist": artist, "checkpoint": os.path.basename(cfg["checkpoint"])})
    if cfg["resume"]:
        ckpt = latest_checkpoint(out) if cfg["resume"] == "latest" else cfg["resume"]
        if ckpt is None:
            raise SystemExit(f"error: --resume: no checkpoint under {os.path.join(out, 'checkpoints')}")
        trainer.load_checkpoint(ckpt)
        say(f"resumed from {ckpt} at step {trainer.step}")
    return trainer


def _export(cfg, backend, groups, samples, artist, styles, name, out, mp, world, started, say):
    """Write the LoRA (checked against ComfyUI's key map first) and/or the full checkpoint, with metadata."""
    import torch

    from . import kohya
    from .lora import lora_state_dict, remove_lora

    export = cfg["export"] if cfg["export"] != "auto" else ("lora" if cfg["method"] == "lora" else "checkpoint")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg["save_dtype"]]
    md_args = dict(cfg, lr_unet=cfg["lr"], mixed_precision=mp, num_processes=world)
    common = dict(artist=artist, styles=styles, trigger=cfg["trigger"], caption_template=cfg["caption_template"],
                  base_model_name=os.path.basename(cfg["checkpoint"]), base_model_hash=file_sha256(cfg["checkpoint"]),
                  base_model_legacy_hash=kohya.legacy_model_hash(cfg["checkpoint"]), training_args=md_args,
                  num_images=len(samples), steps=cfg["steps"], resolution=cfg["resolution"], started_at=started)
    if export in ("lora", "both"):
        if cfg["method"] != "lora":
            raise SystemExit("error: --export lora needs --method lora")
        tensors = lora_state_dict(groups, dtype)
        unmapped = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                           for k in tensors} - backend.lora_key_map())
        if unmapped:
            raise SystemExit(f"internal error: {len(unmapped)} LoRA keys would not load in ComfyUI, "
                             f"e.g. {unmapped[:3]}")
        path = os.path.join(out, f"{name}.safetensors")
        kohya.save_lora(path, tensors, kohya.build_metadata(rank=cfg["rank"], alpha=cfg["alpha"], kind="lora", **common))
        say(f"wrote LoRA {path} ({len(tensors) // 3} modules); copy it to ComfyUI/models/loras/")
    if export in ("checkpoint", "both"):
        if groups:  # fold the LoRA into the base weights so the checkpoint has plain keys
            remove_lora(backend.unet, merge=True)
            remove_lora(backend.te_root, merge=True)
        backend.unet.to(dtype)  # UNet and text encoder in --save-dtype (SD1.5: 2 GB in fp16, 4 GB in fp32)
        backend.te.to(dtype)
        path = os.path.join(out, f"{name}_full.safetensors")
        backend.save_full_checkpoint(path, kohya.build_metadata(kind="checkpoint", **common))
        say(f"wrote checkpoint {path}; copy it to ComfyUI/models/checkpoints/")


def _train(cfg, trainer, rank):
    """The training loop with its bar (rank 0, unless --no-progress) showing the loss and the stage."""
    progress = TrainingProgress("training", unit="step", enabled=cfg["progress"] and rank == 0)
    trainer.on_step = lambda step, loss: progress.show_loss(loss, trainer.stage(step - 1))
    try:
        return trainer.train(progress)
    finally:
        progress.close()


def run(cfg: dict, backend_factory=None) -> int:
    """The whole job; returns the process exit code (0 done, 130 interrupted)."""
    started = time.time()
    rank, world = _init_distributed()
    device = _device(cfg)
    mp = _resolve_precision(cfg, device)
    out = cfg["output"]
    os.makedirs(out, exist_ok=True)
    say = print if rank == 0 else (lambda *a, **k: None)

    samples, artist, styles = _load_data(cfg, say)
    backend = backend_factory() if backend_factory is not None else _load_backend(cfg, device, mp)
    if cfg["clip_filter"]:
        samples = _clip_filtered(cfg, samples, device, out, rank, say)
    assign_buckets(samples, cfg["resolution"], cfg["buckets"], cfg["bucket_step"], cfg["max_aspect"])
    latents = _cached_latents(cfg, samples, backend, out, rank)
    say(f"{len(samples)} images of {artist} in {len(set(s.bucket for s in samples))} bucket(s)")
    params, groups = _trainable(cfg, backend)
    trainer = _trainer(cfg, backend, params, samples, latents, artist, out, device, mp, rank, world, say)
    result = _train(cfg, trainer, rank)
    if result.interrupted:
        return 130
    if rank == 0:
        if trainer.ema is not None:
            trainer.ema.copy_to(trainer.flat_params())
        _export(cfg, backend, groups, samples, artist, styles, cfg["output_name"] or _slug(artist), out, mp, world,
                started, say)
    _barrier()
    return 0


def _barrier():
    from .loop import _barrier as b
    b()


def main(argv=None) -> int:
    cfg = resolve_config(argv)
    os.makedirs(cfg["output"], exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(cfg, indent=1, sort_keys=True, default=str)
        atomic_write(os.path.join(cfg["output"], "config.json"), text)
    try:
        code = run(cfg)
    except KeyboardInterrupt:  # before the training loop owns Ctrl-C (loading, caching): nothing to save yet
        print("\ninterrupted before training started; cached latents are kept, nothing else was written",
              file=sys.stderr)
        code = 130
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    return code

