"""Fine-tune an SD 1.x checkpoint on one artist's paintings; write a kohya LoRA or a full checkpoint.

Run from the pack folder with ComfyUI's Python (its venv), ComfyUI found through --comfyui, COMFYUI_PATH or
the ComfyUI this pack is installed in:

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/.venv/bin/python -m training finetune \\
        --data wikiart/ --artist "Claude Monet" --checkpoint v1-5-pruned-emaonly.safetensors --output out/monet

Several GPUs or machines: ``accelerate launch [--config_file CFG] -m training finetune ...`` (or ``torchrun``;
--batch-size is per process). See docs/training.md.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from ..common.files import atomic_write, file_sha256
from ..common.progress import TqdmProgress
from .data import CAPTION_MODES, DEFAULT_TEMPLATE, DataError, assign_buckets, cache_latents, clip_filter, scan_folder
from .engine import OPTIMIZERS, SCHEDULERS
from .presets import PRESETS, describe, preset_settings

DEFAULTS = {
    "preset": None,
    "data": None, "checkpoint": None, "output": "artist_out", "output_name": "", "comfyui": None,
    "artist": "", "trigger": "", "caption_mode": "both", "caption_template": DEFAULT_TEMPLATE,
    "metadata_file": None, "small_images": "skip",
    "clip_filter": False, "clip_threshold": 0.2, "clip_model": "ViT-B-32", "clip_weights": None,
    "resolution": 512, "buckets": True, "bucket_step": 64, "max_aspect": 2.0, "cache_dir": None,
    "flip": False, "random_crop": False, "caption_dropout": 0.0, "shuffle_tags": False, "keep_tokens": 0,
    "method": "lora", "rank": 16, "alpha": 8.0, "unet_targets": "attention", "train_text_encoder": False,
    "text_encoder_only_steps": 0, "text_encoder_only_fraction": 0.0,
    "steps": 1000, "epochs": 0, "batch_size": 1, "grad_accum": 1, "lr": 1e-4, "lr_text_encoder": 5e-5,
    "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "lr_cycles": 1,
    "weight_decay": 1e-2, "max_grad_norm": 1.0, "min_snr_gamma": 0.0, "noise_offset": 0.0,
    "mixed_precision": "auto", "gradient_checkpointing": False, "ema_decay": 0.0, "seed": 0,
    "validation_split": 0.0, "validation_every": 0,
    "checkpoint_every": 100, "keep_checkpoints": 2, "resume": None,
    "save_every": 0, "save_every_epochs": 0,
    "sample_every": 0, "sample_prompt": None, "sample_prompts_file": None, "sample_steps": 20, "sample_cfg": 5.0,
    "sample_seed": 0,
    "save_dtype": "fp16", "export": "auto", "device": "auto", "progress": True,
}


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """All flags, in groups; with ``suppress`` defaults are hidden so we can tell which flags were typed."""
    p = argparse.ArgumentParser(
        prog="python -m training finetune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress else None)
    group = [p]

    def add(*flags, key, **kw):
        if not suppress:
            kw.setdefault("default", DEFAULTS[key])
        group[0].add_argument(*flags, dest=key, **kw)

    def section(title):
        group[0] = p.add_argument_group(title)

    section("inputs")
    group[0].add_argument("--config", default=argparse.SUPPRESS if suppress else None,
                          help="JSON file of settings (keys = long flag names with _); typed flags win over it")
    add("--preset", key="preset", choices=sorted(PRESETS),
        help="a paper's recipe (printed at the start, with what the paper left open); flags and --config win")
    add("--data", key="data", help="folder of images (WikiArt Style/artist_title-year.jpg, one artist or all)")
    add("--checkpoint", key="checkpoint", help="SD 1.x single-file checkpoint to fine-tune (.safetensors)")
    add("--output", key="output", help="output folder (LoRA/checkpoint, config.json, checkpoints/, logs/, cache)")
    add("--output-name", key="output_name", help="file name stem of the result (default: artist name, or wikiart)")
    add("--comfyui", key="comfyui", help="ComfyUI root (else COMFYUI_PATH, else the ComfyUI holding this pack)")
    section("captions and data")
    add("--artist", key="artist", help="artist name for every image (default: parsed from WikiArt file names)")
    add("--trigger", key="trigger", help="optional trigger word put first in every caption")
    add("--caption-mode", key="caption_mode", choices=CAPTION_MODES,
        help="template over metadata, sidecar .txt files, or template followed by the sidecar text")
    add("--caption-template", key="caption_template", help="template; fields {artist} {style} {genre} {title} {year}")
    add("--metadata-file", key="metadata_file",
        help="CSV/JSONL with a 'path' column adding e.g. genre per image (python -m training wikiart-csv makes one)")
    add("--small-images", key="small_images", choices=("error", "skip", "upscale"),
        help="images smaller than resolution²: skip them (counted), refuse the run, or upscale them")
    add("--clip-filter", key="clip_filter", action=argparse.BooleanOptionalAction,
        help="drop image–caption pairs whose CLIP similarity is below --clip-threshold (as in 'Novel Paintings "
             "from the Latent Diffusion Model through Transfer Learning')")
    add("--clip-threshold", key="clip_threshold", type=float, help="CLIP cosine similarity threshold")
    add("--clip-model", key="clip_model", help="open_clip architecture for the filter")
    add("--clip-weights", key="clip_weights", help="open_clip weights file for the filter")
    add("--resolution", key="resolution", type=int, help="training resolution (bucket area = resolution²)")
    add("--buckets", key="buckets", action=argparse.BooleanOptionalAction, help="aspect-ratio buckets (else square)")
    add("--bucket-step", key="bucket_step", type=int, help="bucket side multiple (pixels)")
    add("--max-aspect", key="max_aspect", type=float, help="largest bucket aspect ratio")
    add("--cache-dir", key="cache_dir", help="latent cache folder (default OUTPUT/latent_cache)")
    section("augmentation and caption noise")
    add("--flip", key="flip", action=argparse.BooleanOptionalAction,
        help="mirror each image with probability 1/2 (both latents are cached)")
    add("--random-crop", key="random_crop", action=argparse.BooleanOptionalAction,
        help="random crop window instead of the centre (in latent space, on an 8-pixel grid)")
    add("--caption-dropout", key="caption_dropout", type=float,
        help="probability of training an image with the empty caption (helps CFG)")
    add("--shuffle-tags", key="shuffle_tags", action=argparse.BooleanOptionalAction,
        help="shuffle the comma-separated parts of each caption every time it is used")
    add("--keep-tokens", key="keep_tokens", type=int, help="with --shuffle-tags: the first N parts stay in place")
    section("method")
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
    add("--text-encoder-only-fraction", key="text_encoder_only_fraction", type=float,
        help="the same as a fraction of all steps (used when --text-encoder-only-steps is 0)")
    section("optimisation")
    add("--steps", key="steps", type=int, help="optimiser steps (ignored when --epochs is given)")
    add("--epochs", key="epochs", type=int, help="passes over the data; sets --steps (0 = use --steps)")
    add("--batch-size", key="batch_size", type=int, help="images per micro-batch per process")
    add("--grad-accum", key="grad_accum", type=int,
        help="micro-batches accumulated per optimiser step (batch = batch-size × processes × grad-accum)")
    add("--lr", key="lr", type=float, help="UNet learning rate (full fine-tune: ~1e-5)")
    add("--lr-text-encoder", key="lr_text_encoder", type=float, help="text-encoder learning rate")
    add("--optimizer", key="optimizer", choices=OPTIMIZERS,
        help="adamw; adamw8bit (bitsandbytes); adafactor; prodigy (prodigyopt; use --lr 1)")
    add("--lr-scheduler", key="lr_scheduler", choices=SCHEDULERS, help="learning-rate schedule after the warm-up")
    add("--warmup-steps", key="warmup_steps", type=int, help="linear warm-up steps from 0 to the learning rate")
    add("--lr-cycles", key="lr_cycles", type=int, help="restarts of cosine_with_restarts")
    add("--weight-decay", key="weight_decay", type=float, help="weight decay")
    add("--max-grad-norm", key="max_grad_norm", type=float, help="gradient clipping norm (0 = off)")
    add("--min-snr-gamma", key="min_snr_gamma", type=float, help="min-SNR-γ loss weighting (0 = off, 5 usual)")
    add("--noise-offset", key="noise_offset", type=float, help="noise offset (0 = off, ~0.05 for darker/brighter)")
    add("--mixed-precision", key="mixed_precision", choices=("auto", "no", "bf16", "fp16"),
        help="autocast dtype; fp16 uses loss scaling (GPUs only); auto = bf16 on GPUs that support it, else no")
    add("--gradient-checkpointing", key="gradient_checkpointing", action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward pass (less memory, ~30%% slower)")
    add("--ema-decay", key="ema_decay", type=float, help="EMA of the trained weights (0 = off, e.g. 0.999)")
    add("--seed", key="seed", type=int, help="seed for LoRA initialisation, noise, timesteps and data order")
    section("validation, logs and samples")
    add("--validation-split", key="validation_split", type=float,
        help="fraction of the images held out for a validation loss (0 = none)")
    add("--validation-every", key="validation_every", type=int, help="validation loss every N steps (0 = at the end)")
    add("--sample-every", key="sample_every", type=int, help="render sample images every N steps (0 = off)")
    add("--sample-prompt", key="sample_prompt", action="append", help="a sample prompt (repeat for several)")
    add("--sample-prompts-file", key="sample_prompts_file", help="text file of sample prompts, one per line")
    add("--sample-steps", key="sample_steps", type=int, help="PLMS steps of a sample image")
    add("--sample-cfg", key="sample_cfg", type=float, help="classifier-free guidance scale of the samples")
    add("--sample-seed", key="sample_seed", type=int, help="noise seed of the first sample prompt")
    section("checkpoints and output")
    add("--checkpoint-every", key="checkpoint_every", type=int, help="save a resumable state every N steps (0 = end only)")
    add("--keep-checkpoints", key="keep_checkpoints", type=int, help="how many resumable states to keep (0 = all)")
    add("--resume", key="resume", nargs="?", const="latest",
        help="continue from OUTPUT/checkpoints' latest state, or from the given checkpoint folder")
    add("--save-every", key="save_every", type=int, help="also write the LoRA every N steps (0 = off)")
    add("--save-every-epochs", key="save_every_epochs", type=int, help="also write the LoRA every N epochs (0 = off)")
    add("--save-dtype", key="save_dtype", choices=("fp16", "bf16", "fp32"),
        help="dtype of the written LoRA and of the UNet/text encoder in a full checkpoint")
    add("--export", key="export", choices=("auto", "lora", "checkpoint", "both"),
        help="what to write: auto = LoRA for --method lora, full checkpoint for --method full")
    add("--device", key="device", choices=("auto", "cpu", "cuda"),
        help="auto, cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES; accelerate launch sets one per process)")
    add("--progress", key="progress", action=argparse.BooleanOptionalAction, help="tqdm progress bar")
    return p


def resolve_config(argv=None) -> dict:
    """defaults < --preset < JSON --config < flags typed on the command line; then checked."""
    args = build_parser().parse_args(argv)
    typed = vars(build_parser(suppress=True).parse_args(argv))
    typed.pop("config", None)
    from_file = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                from_file = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read --config {args.config}: {e}")
        unknown = sorted(set(from_file) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"error: unknown keys in {args.config}: {unknown}; valid keys: {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS)
    preset = typed.get("preset", from_file.get("preset"))
    if preset:
        cfg.update(preset_settings(preset))
    cfg.update(from_file)
    cfg.update(typed)
    cfg["config"] = args.config
    cfg["_overrides"] = {k: v for k, v in {**from_file, **typed}.items() if k != "preset"}
    check_config(cfg)
    return cfg


def check_config(cfg: dict) -> None:
    """Refuse settings that would train nothing, train backwards or fail later, with a message saying why."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f"error: {message}")

    for key in ("data", "checkpoint"):
        need(cfg.get(key), f"--{key} is required (on the command line or in --config)")
    for key in ("lr", "lr_text_encoder"):
        v = cfg[key]
        need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
             f"--{key.replace('_', '-')} must be > 0 (got {v}): 0 trains nothing and a negative rate trains backwards")
    for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("rank", 1), ("resolution", 64),
                     ("epochs", 0), ("warmup_steps", 0), ("checkpoint_every", 0), ("keep_checkpoints", 0),
                     ("save_every", 0), ("save_every_epochs", 0), ("sample_every", 0), ("sample_steps", 1),
                     ("validation_every", 0), ("text_encoder_only_steps", 0), ("keep_tokens", 0), ("lr_cycles", 1)):
        v = cfg[key]
        need(isinstance(v, int) and not isinstance(v, bool) and v >= low,
             f"--{key.replace('_', '-')} must be an integer >= {low} (got {v!r})")
    for key, low, high in (("alpha", 0, math.inf), ("caption_dropout", 0, 1), ("validation_split", 0, 0.5),
                           ("min_snr_gamma", 0, math.inf), ("noise_offset", 0, math.inf), ("ema_decay", 0, 0.999999),
                           ("weight_decay", 0, math.inf), ("max_grad_norm", 0, math.inf),
                           ("text_encoder_only_fraction", 0, 0.99)):
        v = cfg[key]
        need(isinstance(v, (int, float)) and math.isfinite(v) and low <= v <= high,
             f"--{key.replace('_', '-')} must be a number from {low} to {high} (got {v!r})")
    need(cfg["alpha"] > 0, f"--alpha must be > 0 (got {cfg['alpha']})")
    need(cfg["text_encoder_only_steps"] == 0 and cfg["text_encoder_only_fraction"] == 0 or cfg["train_text_encoder"],
         "--text-encoder-only-steps/--text-encoder-only-fraction need --train-text-encoder")
    need(cfg["resolution"] % cfg["bucket_step"] == 0,
         f"--resolution {cfg['resolution']} must be a multiple of --bucket-step {cfg['bucket_step']}")
    need(not (cfg["method"] == "full" and cfg["export"] == "lora"), "--export lora needs --method lora")
    need(cfg["epochs"] > 0 or cfg["steps"] >= 1, "--steps must be >= 1")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "artist"


def _resolve_precision(cfg, cuda: bool):
    import torch

    mp = cfg["mixed_precision"]
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mp == "fp16" and not cuda:
        raise SystemExit("error: --mixed-precision fp16 needs a CUDA GPU (loss scaling); on a CPU use bf16 or no")
    return mp


def _accelerator(cfg):
    """The accelerate engine's Accelerator: 1 process, or what accelerate launch / torchrun started."""
    import torch

    from .engine import EngineError, make_accelerator

    cpu = cfg["device"] == "cpu" or not torch.cuda.is_available()
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU; use --device cpu or auto")
    mp = _resolve_precision(cfg, not cpu)
    stages = cfg["text_encoder_only_steps"] > 0 or cfg["text_encoder_only_fraction"] > 0
    try:
        return make_accelerator(mp, cpu=cpu, find_unused_parameters=stages), mp
    except EngineError as e:
        raise SystemExit(f"error: {e}")


def load_clip_embedder(cfg, device):
    """The open_clip embedder of the style databases (retrieval/) for the similarity filter (an architecture
    config ``<name>.json`` beside the weights file is registered first)."""
    from ..retrieval.embedder import load_open_clip, register_folder_configs

    if not cfg["clip_weights"]:
        raise SystemExit("error: --clip-filter needs --clip-weights (an open_clip weights file for --clip-model)")
    register_folder_configs([os.path.dirname(os.path.abspath(cfg["clip_weights"]))])
    return load_open_clip(cfg["clip_model"], cfg["clip_weights"], device=str(device))


@dataclass
class Dataset:
    samples: list
    artist: str          # "" when the run covers several artists
    artists: list        # most common first
    styles: list


def _load_data(cfg, say) -> Dataset:
    """The images of the data folder, their captions and who painted them (one artist, or many: whole WikiArt)."""
    try:
        scan = scan_folder(cfg["data"], cfg["resolution"], cfg["caption_mode"], cfg["caption_template"],
                           cfg["trigger"], cfg["artist"], cfg["small_images"], cfg["metadata_file"])
    except DataError as e:
        raise SystemExit(f"error: {e}")
    samples = scan.samples
    small = [r for _, r in scan.skipped if r.startswith("smaller than")]
    for path, reason in scan.skipped:
        if not reason.startswith("smaller than"):
            say(f"skipped {path}: {reason}")
    if small:
        say(f"skipped {len(small)} image(s) smaller than {cfg['resolution']}x{cfg['resolution']} "
            "(--small-images upscale keeps them, --small-images error refuses the run)")
    parsed = collections.Counter(s.meta["artist"] for s in samples if s.meta.get("artist"))
    artists = [a for a, _ in parsed.most_common()]
    artist = cfg["artist"] or (artists[0] if len(artists) == 1 else "")
    if not artists and not cfg["artist"]:
        raise SystemExit("error: no artist name: pass --artist (file names are not in WikiArt's artist_title form)")
    styles = [s for s, _ in collections.Counter(x.meta["style"] for x in samples if x.meta.get("style")).most_common()]
    return Dataset(samples, artist, [artist] if cfg["artist"] else artists, styles)


def _load_backend(cfg, device, mp):
    """The SD1.x model through ComfyUI's loader; weights in the dtype the method and precision call for."""
    import torch

    from .comfy_backend import BackendError, SD1Backend

    weight_dtype = torch.float32
    if device.type == "cuda" and cfg["method"] == "lora" and mp != "no":
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mp]
    try:
        return SD1Backend(cfg["checkpoint"], cfg["comfyui"], str(device), weight_dtype)
    except BackendError as e:
        raise SystemExit(f"error: {e}")


def _clip_filtered(cfg, samples, device, out, is_main, say):
    """Drop image–caption pairs below the CLIP similarity threshold; the dropped ones are listed in a file."""
    embedder = load_clip_embedder(cfg, device)
    samples, dropped = clip_filter(samples, embedder, cfg["clip_threshold"])
    report = [{"path": s.path, "caption": s.caption, "score": round(sc, 4)} for s, sc in dropped]
    if is_main:
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


def _cached_latents(cfg, samples, backend, out, acc, say):
    """Latents of every sample: the main process encodes into the cache, the others read it after it."""
    cache_dir = cfg["cache_dir"] or os.path.join(out, "latent_cache")
    vae_hash = backend.vae_hash()
    opts = dict(flip=cfg["flip"], crop=cfg["random_crop"])
    try:
        if acc.is_main_process:
            progress = TqdmProgress("caching latents", unit="image", enabled=cfg["progress"])
            try:
                cache_latents(samples, backend.vae_encode, cache_dir, vae_hash, progress, **opts)
            finally:
                progress.close()
        acc.wait_for_everyone()
        cached = cache_latents(samples, backend.vae_encode, cache_dir, vae_hash, **opts)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    for path, reason in cached.skipped:
        say(f"skipped {path}: {reason}")
    if not cached.samples:
        raise SystemExit(f"error: no image under {cfg['data']} could be decoded ({len(cached.skipped)} unreadable)")
    return cached


def _split(cfg, samples, items):
    """(train samples, train items, validation samples, validation items): a fixed fraction held out, chosen by
    content hash so the split does not depend on file order."""
    n_val = round(len(samples) * cfg["validation_split"])
    if cfg["validation_split"] > 0:
        n_val = max(1, n_val)
        if n_val >= len(samples):
            raise SystemExit(f"error: --validation-split {cfg['validation_split']} leaves no training image "
                             f"({len(samples)} images)")
    order = sorted(range(len(samples)), key=lambda i: hashlib.sha256(
        f"{cfg['seed']}|{samples[i].content_hash}".encode()).hexdigest())
    val = set(order[:n_val])
    pick = lambda keep: ([s for i, s in enumerate(samples) if (i in val) == keep],  # noqa: E731
                         [x for i, x in enumerate(items) if (i in val) == keep])
    return (*pick(False), *pick(True))


def _trainable(cfg, backend):
    """({"unet": {name: param}, "te": {...}}, LoRA groups or {}) with requires_grad set."""
    from .engine import enable_gradient_checkpointing

    params, groups = {}, {}
    if cfg["method"] == "lora":
        try:
            groups = backend.inject(cfg["rank"], cfg["alpha"], cfg["unet_targets"], cfg["train_text_encoder"],
                                    seed=cfg["seed"])
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        for key, group in (("unet", "lora_unet"), ("te", "lora_te")):
            if group in groups:
                params[key] = {f"{p}.{n}": t for p, m in sorted(groups[group].items())
                               for n, t in (("down", m.lora_down.weight), ("up", m.lora_up.weight))}
    else:
        params["unet"] = dict(backend.unet.named_parameters())
        if cfg["train_text_encoder"]:
            params["te"] = dict(backend.te_root.named_parameters())
    if cfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(backend.checkpoint_modules())
    return params, groups


def _sample_prompts(cfg):
    prompts = list(cfg["sample_prompt"] or [])
    if cfg["sample_prompts_file"]:
        try:
            with open(cfg["sample_prompts_file"], encoding="utf-8") as f:
                prompts += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        except OSError as e:
            raise SystemExit(f"error: cannot read --sample-prompts-file: {e}")
    if cfg["sample_every"] and not prompts:
        raise SystemExit("error: --sample-every needs --sample-prompt or --sample-prompts-file")
    return prompts


@dataclass
class Run:
    """Everything a training run holds after set-up (what the hooks and the export need)."""

    cfg: dict
    acc: object
    mp: str
    backend: object
    data: Dataset
    groups: dict
    name: str
    out: str
    started: float
    say: object
    engine: object = None
    steps_per_epoch: int = 0


def _engine(run: Run, params, items, captions, val_items, val_captions):
    """The accelerate engine over the diffusion task, with the stage, the hooks and the resume applied."""
    from .data import BucketBatchSampler
    from .diffusion import DiffusionOptions, DiffusionTask, ValidationSet
    from .engine import CheckpointError, Engine, EngineConfig, EngineError, ParamGroup, latest_checkpoint

    cfg, acc = run.cfg, run.acc
    sampler = BucketBatchSampler([s.bucket for s in run.data.samples], cfg["batch_size"], cfg["seed"],
                                 acc.process_index, acc.num_processes, cfg["grad_accum"])
    run.steps_per_epoch = sampler.batches_per_epoch()
    steps = cfg["epochs"] * run.steps_per_epoch if cfg["epochs"] > 0 else cfg["steps"]
    cfg["steps"] = steps
    te_steps = cfg["text_encoder_only_steps"] or int(cfg["text_encoder_only_fraction"] * steps)
    cfg["text_encoder_only_steps"] = te_steps
    try:
        opts = DiffusionOptions(cfg["min_snr_gamma"], cfg["noise_offset"], cfg["caption_dropout"], cfg["shuffle_tags"],
                                cfg["keep_tokens"], cfg["flip"], cfg["random_crop"])
        ecfg = EngineConfig(steps=steps, grad_accum=cfg["grad_accum"], optimizer=cfg["optimizer"],
                            weight_decay=cfg["weight_decay"], scheduler=cfg["lr_scheduler"],
                            warmup_steps=cfg["warmup_steps"], num_cycles=cfg["lr_cycles"],
                            max_grad_norm=cfg["max_grad_norm"], mixed_precision=run.mp, ema_decay=cfg["ema_decay"],
                            seed=cfg["seed"], checkpoint_every=cfg["checkpoint_every"],
                            keep_checkpoints=cfg["keep_checkpoints"], validate_every=cfg["validation_every"],
                            steps_per_epoch=run.steps_per_epoch)
        task = DiffusionTask(run.backend.unet, run.backend.te, run.backend.unet_fn, run.backend.encode_fn,
                             run.backend.schedule, items, captions, sampler, opts, cfg["seed"], cfg["grad_accum"],
                             acc.process_index, acc.num_processes, train_te="te" in params)
        lrs = {"unet": cfg["lr"], "te": cfg["lr_text_encoder"]}
        groups = {g: ParamGroup(ps, lrs[g]) for g, ps in params.items()}
        val = ValidationSet(val_items, val_captions, run.backend.schedule, cfg["seed"]) if val_items else None
        stage = (lambda step: {"te"} if step < te_steps else None) if te_steps else None
        run.engine = Engine(ecfg, acc, task, groups, task.batch, run.out, val_fn=val, hooks=_hooks(run),
                            stage_fn=stage, run_info={"artist": run.data.artist,
                                                      "checkpoint": os.path.basename(cfg["checkpoint"])})
    except EngineError as e:
        raise SystemExit(f"error: {e}")
    if cfg["resume"]:
        ckpt = latest_checkpoint(run.out) if cfg["resume"] == "latest" else cfg["resume"]
        if ckpt is None:
            raise SystemExit(f"error: --resume: no checkpoint under {os.path.join(run.out, 'checkpoints')}")
        try:
            run.engine.load_checkpoint(ckpt)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        run.say(f"resumed from {ckpt} at step {run.engine.step}")
    return run.engine


def _hooks(run: Run):
    from .engine import Hook

    cfg, hooks = run.cfg, []
    if cfg["save_every"]:
        hooks.append(Hook(cfg["save_every"], lambda e: _save_intermediate(run, f"step{e.step:06d}"), name="save"))
    if cfg["save_every_epochs"]:
        hooks.append(Hook(cfg["save_every_epochs"], lambda e: _save_intermediate(run, f"epoch{int(e.epoch()):04d}"),
                          unit="epochs", name="save"))
    if cfg["sample_every"]:
        prompts = _sample_prompts(cfg)
        hooks.append(Hook(cfg["sample_every"], lambda e: _render_samples(run, prompts), at_end=True, name="samples"))
    return hooks


def _ema_weights(run: Run):
    e = run.engine
    return e.ema.swapped_in(e.flat_params()) if e.ema is not None else contextlib.nullcontext()


def _save_intermediate(run: Run, tag: str):
    """An intermediate LoRA (``NAME-step000100.safetensors``) that loads in ComfyUI like the final one."""
    if run.cfg["method"] != "lora":
        run.say(f"--save-every writes LoRAs; --method full saves resumable states only ({tag} skipped)")
        return
    with _ema_weights(run):
        _write_lora(run, os.path.join(run.out, f"{run.name}-{tag}.safetensors"), steps=run.engine.step)


def _render_samples(run: Run, prompts):
    """Sample images of the model as it is now (EMA weights when on): ``samples/step-000100-00.png``."""
    import torch

    from .samples import render, save_png

    cfg, backend, e = run.cfg, run.backend, run.engine
    with _ema_weights(run), torch.no_grad(), run.acc.autocast():
        images = render(backend.unet_fn, backend.encode_fn, backend.vae_decode, backend.schedule, prompts,
                        (cfg["resolution"], cfg["resolution"]), cfg["sample_steps"], cfg["sample_cfg"],
                        cfg["sample_seed"], device=run.acc.device)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        save_png(os.path.join(run.out, "samples", f"step-{e.step:06d}-{i:02d}.png"), img,
                 f"{prompt}\nsteps {cfg['sample_steps']}, cfg {cfg['sample_cfg']}, seed {cfg['sample_seed'] + i}")


def _metadata_common(run: Run, steps: int):
    from . import kohya

    cfg, d = run.cfg, run.data
    md_args = {k: v for k, v in cfg.items() if not k.startswith("_")}
    md_args.update(lr_unet=cfg["lr"], mixed_precision=run.mp, num_processes=run.acc.num_processes)
    extra = {"atelier.artists": json.dumps(d.artists[:50])} if not d.artist else {}
    return dict(artist=d.artist, styles=d.styles, trigger=cfg["trigger"], caption_template=cfg["caption_template"],
                base_model_name=os.path.basename(cfg["checkpoint"]), base_model_hash=file_sha256(cfg["checkpoint"]),
                base_model_legacy_hash=kohya.legacy_model_hash(cfg["checkpoint"]), training_args=md_args,
                num_images=len(d.samples), steps=steps, resolution=cfg["resolution"], started_at=run.started,
                extra=extra)


def _write_lora(run: Run, path: str, steps: int):
    """The kohya LoRA, checked against ComfyUI's key map first, written atomically (never half a file)."""
    import torch

    from . import kohya
    from .lora import lora_state_dict

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[run.cfg["save_dtype"]]
    tensors = lora_state_dict(run.groups, dtype)
    unmapped = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                       for k in tensors} - run.backend.lora_key_map())
    if unmapped:
        raise SystemExit(f"internal error: {len(unmapped)} LoRA keys would not load in ComfyUI, e.g. {unmapped[:3]}")
    md = kohya.build_metadata(rank=run.cfg["rank"], alpha=run.cfg["alpha"], kind="lora", **_metadata_common(run, steps))
    _saving(path, lambda: kohya.save_lora(path, tensors, md), run)
    run.say(f"wrote LoRA {path} ({len(tensors) // 3} modules); copy it to ComfyUI/models/loras/")


def _saving(path, write, run: Run):
    """Run ``write``; a full disk or a read-only folder becomes a message (the atomic writer left no file)."""
    try:
        write()
    except OSError as e:
        raise SystemExit(f"error: could not write {path}: {e}. Nothing half-written was left; the trained state is "
                         f"in {os.path.join(run.out, 'checkpoints')}: free space (or fix the folder) and run the "
                         "same command with --resume to write it again") from None


def _export(run: Run):
    """Write the LoRA and/or the full checkpoint, with metadata."""
    import torch

    from . import kohya
    from .lora import remove_lora

    cfg, backend = run.cfg, run.backend
    export = cfg["export"] if cfg["export"] != "auto" else ("lora" if cfg["method"] == "lora" else "checkpoint")
    if export in ("lora", "both"):
        _write_lora(run, os.path.join(run.out, f"{run.name}.safetensors"), cfg["steps"])
    if export in ("checkpoint", "both"):
        if run.groups:  # fold the LoRA into the base weights so the checkpoint has plain keys
            remove_lora(backend.unet, merge=True)
            remove_lora(backend.te_root, merge=True)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg["save_dtype"]]
        backend.unet.to(dtype)  # UNet and text encoder in --save-dtype (SD1.5: 2 GB in fp16, 4 GB in fp32)
        backend.te.to(dtype)
        path = os.path.join(run.out, f"{run.name}_full.safetensors")
        md = kohya.build_metadata(kind="checkpoint", **_metadata_common(run, cfg["steps"]))
        _saving(path, lambda: backend.save_full_checkpoint(path, md), run)
        run.say(f"wrote checkpoint {path}; copy it to ComfyUI/models/checkpoints/")


def _train(run: Run):
    """The training loop with its bar (main process, unless --no-progress) showing the loss and the stage."""
    from .engine import CheckpointError

    e = run.engine
    progress = TrainingProgress("training", unit="step", enabled=run.cfg["progress"] and run.acc.is_main_process)
    te_steps = run.cfg["text_encoder_only_steps"]
    e.on_step = lambda step, loss: progress.show_loss(loss, "text_encoder" if step - 1 < te_steps else "joint")
    try:
        return e.train(progress)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        progress.close()


def check_output_folder(out: str) -> None:
    """The output folder exists (made if needed) and can be written: refuse before any work otherwise."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".atelier_write_test")
        atomic_write(probe, b"")
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to the output folder {out!r} ({e.strerror or e}); choose a writable "
                         "--output") from None


def run(cfg: dict, backend_factory=None) -> int:
    """The whole job; returns the process exit code (0 done, 130 interrupted)."""
    started = time.time()
    out = cfg["output"]
    check_output_folder(out)
    acc, mp = _accelerator(cfg)
    say = print if acc.is_main_process else (lambda *a, **k: None)
    if cfg.get("preset"):
        say(describe(cfg["preset"], cfg.get("_overrides")))
    prompts = _sample_prompts(cfg)  # refuse a bad prompts file before loading anything
    del prompts
    data = _load_data(cfg, say)
    backend = backend_factory() if backend_factory is not None else _load_backend(cfg, acc.device, mp)
    if cfg["clip_filter"]:
        data.samples = _clip_filtered(cfg, data.samples, acc.device, out, acc.is_main_process, say)
    assign_buckets(data.samples, cfg["resolution"], cfg["buckets"], cfg["bucket_step"], cfg["max_aspect"])
    cached = _cached_latents(cfg, data.samples, backend, out, acc, say)
    samples, items, val_samples, val_items = _split(cfg, cached.samples, cached.items)
    data.samples = samples
    who = data.artist or f"{len(data.artists)} artists"
    say(f"{len(samples)} images of {who} in {len(set(s.bucket for s in samples))} bucket(s)"
        + (f", {len(val_samples)} held out for validation" if val_samples else ""))
    params, groups = _trainable(cfg, backend)
    name = cfg["output_name"] or (_slug(data.artist) if data.artist else "wikiart")
    r = Run(cfg, acc, mp, backend, data, groups, name, out, started, say)
    _engine(r, params, items, [s.caption for s in samples], val_items, [s.caption for s in val_samples])
    say(f"{cfg['steps']} steps ({r.steps_per_epoch} per epoch), batch {cfg['batch_size']} × {acc.num_processes} "
        f"process(es) × {cfg['grad_accum']} accumulated, {mp} precision")
    result = _train(r)
    if result.val_losses:
        say("validation loss: " + ", ".join(f"step {k}: {v:.5f}" for k, v in sorted(result.val_losses.items())))
    if result.interrupted:
        return 130
    if acc.is_main_process:
        if r.engine.ema is not None:
            r.engine.ema.copy_to(r.engine.flat_params())
        _export(r)
    acc.wait_for_everyone()
    return 0


def main(argv=None) -> int:
    cfg = resolve_config(argv)
    check_output_folder(cfg["output"])
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=1, sort_keys=True,
                          default=str)
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
