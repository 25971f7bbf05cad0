"""Kohya-format LoRA files with ``ss_*`` and ``atelier.*`` metadata, and reading them back.

All metadata values are strings (a safetensors rule). ``atelier.*`` keys are what the Artist Loader reads;
``ss_*`` keys are what kohya tools and LoRA browsers show.
"""
from __future__ import annotations

import hashlib
import json
import time

from ..common.files import atomic_write

ATELIER_FORMAT = "1"
DEFAULT_PROMPT_TEMPLATE = "{trigger}, a painting by {artist}, {style}"


def legacy_model_hash(path: str) -> str:
    """The short A1111/kohya ``ss_sd_model_hash``: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def build_metadata(*, artist: str, styles: list[str], trigger: str, caption_template: str,
                   base_model_name: str, base_model_hash: str, base_model_legacy_hash: str = "",
                   rank: int | None = None, alpha: float | None = None, training_args: dict,
                   num_images: int, steps: int, resolution: int, kind: str = "lora",
                   started_at: float | None = None, extra: dict | None = None) -> dict[str, str]:
    """String metadata for a LoRA (kind='lora') or a full checkpoint (kind='checkpoint')."""
    prompt = artist_prompt({"atelier.artist": artist, "atelier.styles": json.dumps(styles),
                            "atelier.trigger": trigger})
    md = {
        "atelier.format": ATELIER_FORMAT,
        "atelier.kind": kind,
        "atelier.artist": artist,
        "atelier.styles": json.dumps(styles),
        "atelier.trigger": trigger,
        "atelier.caption_template": caption_template,
        "atelier.prompt": prompt,
        "atelier.base_model": "sd1",
        "atelier.base_model_name": base_model_name,
        "atelier.base_model_hash": base_model_hash,
        "atelier.training_args": json.dumps(training_args, sort_keys=True, default=str),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": base_model_name,
        "ss_new_sd_model_hash": base_model_hash,
        "ss_sd_model_hash": base_model_legacy_hash,
        "ss_num_train_images": str(num_images),
        "ss_max_train_steps": str(steps),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_learning_rate": str(training_args.get("lr_unet", "")),
        "ss_unet_lr": str(training_args.get("lr_unet", "")),
        "ss_text_encoder_lr": str(training_args.get("lr_text_encoder", "")),
        "ss_seed": str(training_args.get("seed", "")),
        "ss_mixed_precision": str(training_args.get("mixed_precision", "")),
        "ss_gradient_checkpointing": str(bool(training_args.get("gradient_checkpointing", False))),
        "ss_batch_size_per_device": str(training_args.get("batch_size", "")),
        "ss_training_comment": f"Atelier artist fine-tune of {artist}",
        "ss_training_started_at": str(started_at if started_at is not None else time.time()),
        "ss_training_finished_at": str(time.time()),
    }
    if kind == "lora":
        md.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)}
                                          if training_args.get("unet_targets") == "all" else {}),
            "ss_network_train_unet_only": str(not training_args.get("train_text_encoder", False)),
        })
    md.update({k: str(v) for k, v in (extra or {}).items()})
    return md


def artist_prompt(metadata: dict, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The prompt fragment that calls up the artist: trigger, "a painting by <artist>", main style."""
    from .data import fill_template

    if metadata.get("atelier.prompt") and template == DEFAULT_PROMPT_TEMPLATE:
        return metadata["atelier.prompt"]
    try:
        styles = json.loads(metadata.get("atelier.styles") or "[]")
    except ValueError:
        styles = []
    fields = {"trigger": metadata.get("atelier.trigger", ""), "artist": metadata.get("atelier.artist", ""),
              "style": styles[0] if styles else ""}
    return fill_template(template, fields)


def save_lora(path: str, tensors: dict, metadata: dict[str, str]) -> None:
    """Atomic safetensors write (temp file + rename): a crash or a full disk leaves no half file."""
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str) -> dict[str, str]:
    """Header metadata only (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def display_name(filename: str, metadata: dict) -> str:
    """Combo label: "Claude Monet — monet_lora.safetensors" for Atelier files, the plain name otherwise."""
    artist = metadata.get("atelier.artist", "")
    return f"{artist} — {filename}" if artist else filename


_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".lora_down", ".lora_up",
                  ".alpha", ".dora_scale", ".lora_A.weight", ".lora_B.weight", ".lora.down.weight",
                  ".lora.up.weight", "_lora.down.weight", "_lora.up.weight", ".diff_b", ".diff",
                  ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2",
                  ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".set_weight")


def lora_module_names(keys) -> set[str]:
    """Module names of a LoRA state dict (``lora_unet_x.lora_down.weight`` → ``lora_unet_x``)."""
    names = set()
    for k in keys:
        for suffix in _LORA_SUFFIXES:
            if k.endswith(suffix):
                names.add(k[: -len(suffix)])
                break
        else:
            names.add(k)
    return names


def match_report(keys, key_map) -> tuple[list[str], list[str]]:
    """(matched, unmatched) module names of a LoRA against a host key map (e.g. ComfyUI's)."""
    names = lora_module_names(keys)
    matched = sorted(n for n in names if n in key_map)
    return matched, sorted(names - set(matched))
