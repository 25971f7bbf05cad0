"""Artist files in ComfyUI's model folders: combo labels, LoRA checks and reports, artist prompts (pure).

Files written by ``python -m training finetune`` carry ``atelier.*`` metadata (artist, styles, trigger, base
model); the Artist Loader nodes list them as "Artist — file" and build the artist prompt from it. A LoRA's
module names are matched against the host's own key map (ComfyUI's, given as a plain dict), so modules that
would not load are counted in the report instead of silently ignored, and a LoRA made for another base model
is refused with a message that says what to load instead. Folder listings come from a ``folders`` object with
``files(folder)`` and ``full_path(folder, name)`` (the pack's ``host.folders``); file loading and the key map
come in from the host as a callable and a plain dict.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..common.folders import LORAS
from . import kohya

log = logging.getLogger(__name__)

SEP = " — "
_META_CACHE = {}  # full path -> (mtime, metadata)


def metadata(path):
    """Header metadata of a .safetensors file (cached by mtime); {} for other formats or unreadable files."""
    if not path or not path.lower().endswith((".safetensors", ".sft")):
        return {}
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return {}
    hit = _META_CACHE.get(path)
    if hit and hit[0] == mtime:
        return hit[1]
    try:
        md = kohya.read_metadata(path)
    except Exception:  # a broken file must not break the node list
        md = {}
    _META_CACHE[path] = (mtime, md)
    return md


def choices(folder, folders):
    """Combo labels for a model folder: "Artist — file" for Atelier files, the plain file name otherwise."""
    return [kohya.display_name(name, metadata(folders.full_path(folder, name))) for name in folders.files(folder)]


def resolve(folder, label, folders):
    """Label or plain file name → (file name, full path); a workflow saved on another machine may hold either."""
    names = folders.files(folder)
    name = label if label in names else label.rsplit(SEP, 1)[-1]
    path = folders.full_path(folder, name) if name in names else None
    if path is None:
        raise FileNotFoundError(f"{label!r} is not in models/{folder}/ (found {len(names)} files). Put the file "
                                f"written by `python -m training finetune` into ComfyUI/models/{folder}/ and refresh.")
    return name, path


def prompt_of(md, template=kohya.DEFAULT_PROMPT_TEMPLATE):
    """The artist prompt of a file's metadata; "" for files without Atelier metadata."""
    return kohya.artist_prompt(md, template) if md.get("atelier.artist") else ""


def trained_for(md):
    """The base model a file says it was made for (Atelier's or kohya's key), "" when it does not say."""
    return md.get("atelier.base_model") or md.get("ss_base_model_version", "")


def check_family(name, md, family):
    """Refuse an SD 1.x LoRA on a model of another family (``family``: the host's model-config name)."""
    if trained_for(md).startswith(("sd1", "sd_v1")) and family not in ("SD15", ""):
        raise ValueError(f"{name} was trained for SD 1.x but the MODEL is {family}; load an SD 1.x "
                         "checkpoint (e.g. v1-5-pruned-emaonly.safetensors) or pick a LoRA for this model")


def lora_report(name, keys, key_map, md, family):
    """The report of which modules load; ValueError when none of them match the model."""
    matched, unmatched = kohya.match_report(keys, key_map)
    if not matched:
        raise ValueError(f"none of the {len(unmatched)} modules of {name} match this MODEL/CLIP "
                         f"({family or 'no model'}); it was made for another base model "
                         f"({trained_for(md) or 'unknown'}) or uses an unsupported key format, e.g. {unmatched[:2]}")
    unet = sum(1 for m in matched if not m.startswith(("lora_te", "text_encoder")))
    report = f"{name}: loaded {len(matched)} LoRA modules ({unet} UNet, {len(matched) - unet} text encoder)"
    if unmatched:
        report += f"; {len(unmatched)} NOT loaded (no such layer in this model): {', '.join(unmatched[:5])}"
        log.warning("Atelier Artist Loader: %s", report)
    return report


class LoraFileCache:
    """The last LoRA file read (one per node): read again only when its path or modification time changes."""

    def __init__(self):
        self._entry = None  # (path, mtime, tensors, metadata)

    def load(self, path, load_file):
        """(tensors, metadata) of ``path``; ``load_file(path, metadata=True)`` is the host's safe loader."""
        mtime = os.path.getmtime(path)
        if self._entry is None or self._entry[:2] != (path, mtime):
            tensors, md = load_file(path, metadata=True)
            self._entry = (path, mtime, tensors, md or {})
        return self._entry[2], self._entry[3]


@dataclass
class ArtistLora:
    """A checked artist LoRA: its tensors, the artist prompt, the report, and whether to apply it at all."""

    name: str
    tensors: dict
    prompt: str
    report: str
    apply: bool


def artist_lora(label, folders, load_file, *, family, key_map, strengths, template, cache=None):
    """Resolve, read (through ``cache``), check and report an artist LoRA for the Artist Loader.

    ``folders``: the host's folder lookups; ``load_file(path, metadata=True)``: its safe loader; ``family``: the
    MODEL's config name; ``key_map``: the host's {LoRA key prefix: model key} for this MODEL and CLIP;
    ``strengths``: (model, clip).
    """
    name, path = resolve(LORAS, label, folders)
    tensors, md = (cache or LoraFileCache()).load(path, load_file)
    check_family(name, md, family)
    report = lora_report(name, tensors.keys(), key_map, md, family)
    apply = any(s != 0 for s in strengths)
    if not apply:
        report += " (strengths 0: not applied)"
    return ArtistLora(name, tensors, prompt_of(md, template), report, apply)
