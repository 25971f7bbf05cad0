"""Artist Loader nodes: an artist LoRA or fine-tuned checkpoint plus the prompt that calls the artist up.

Files written by ``python -m training finetune`` carry ``atelier.*`` metadata (artist, styles, trigger);
the combos show "Artist — file" for them. LoRA keys are matched against ComfyUI's own key maps first, so
keys that would not load are counted and reported instead of silently ignored, and a LoRA for another
base model is refused with a clear message.
"""
import logging
import os

from ..training import kohya

SEP = " — "
_META_CACHE = {}  # full path -> (mtime, metadata)


def _metadata(path):
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


def _choices(folder):
    """Combo labels for a model folder: "Artist — file" for Atelier files, the plain file name otherwise."""
    try:
        import folder_paths
    except ImportError:
        return []
    labels = []
    for name in folder_paths.get_filename_list(folder):
        labels.append(kohya.display_name(name, _metadata(folder_paths.get_full_path(folder, name))))
    return labels


def _resolve(folder, label):
    """Label or plain file name → (file name, full path); a workflow saved on another machine may hold either."""
    import folder_paths

    names = folder_paths.get_filename_list(folder)
    name = label if label in names else label.rsplit(SEP, 1)[-1]
    if name not in names:
        raise FileNotFoundError(f"{label!r} is not in models/{folder}/ (found {len(names)} files). Put the file "
                                f"written by `python -m training finetune` into ComfyUI/models/{folder}/ and refresh.")
    return name, folder_paths.get_full_path_or_raise(folder, name)


def _model_family(model):
    return type(model.model.model_config).__name__ if model is not None else ""


class AtelierArtistLoader:
    DESCRIPTION = ("Apply an artist LoRA (kohya format, e.g. from `python -m training finetune`) to MODEL and CLIP "
                   "and return the artist prompt stored in its metadata. Keys that do not match the model are "
                   "counted in the report; a LoRA made for another base model is refused.")
    CATEGORY = "atelier/artist"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "artist_prompt", "report")
    OUTPUT_TOOLTIPS = ("The model with the artist LoRA applied (a patched clone).",
                       "The CLIP with the artist LoRA applied (a patched clone).",
                       "Prompt fragment naming the artist (trigger, 'a painting by ...', main style) built from "
                       "the file's metadata; empty for LoRAs without Atelier metadata.",
                       "How many LoRA modules loaded and which did not.")

    def __init__(self):
        self.loaded = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD 1.x diffusion model the LoRA is applied to."}),
            "clip": ("CLIP", {"tooltip": "The matching CLIP text encoder."}),
            "lora_name": (_choices("loras"), {"tooltip": "LoRA file in models/loras; Atelier artist LoRAs are "
                                                         "listed as 'Artist — file'."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                         "tooltip": "How strongly the LoRA changes the diffusion model."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                        "tooltip": "How strongly the LoRA changes the text encoder."}),
            "prompt_template": ("STRING", {"default": kohya.DEFAULT_PROMPT_TEMPLATE, "multiline": False,
                                           "tooltip": "How the artist prompt is built; fields {trigger} {artist} "
                                                      "{style}. Empty fields vanish cleanly."}),
        }}

    def load(self, model, clip, lora_name, strength_model, strength_clip, prompt_template):
        import comfy.lora
        import comfy.sd
        import comfy.utils

        name, path = _resolve("loras", lora_name)
        if self.loaded is not None and self.loaded[0] == path and self.loaded[1] == os.path.getmtime(path):
            lora, md = self.loaded[2], self.loaded[3]
        else:
            lora, md = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
            md = md or {}
            self.loaded = (path, os.path.getmtime(path), lora, md)
        prompt = kohya.artist_prompt(md, prompt_template) if md.get("atelier.artist") else ""

        family = _model_family(model)
        trained_for = md.get("atelier.base_model") or md.get("ss_base_model_version", "")
        if trained_for.startswith(("sd1", "sd_v1")) and family not in ("SD15", ""):
            raise ValueError(f"{name} was trained for SD 1.x but the MODEL is {family}; load an SD 1.x "
                             "checkpoint (e.g. v1-5-pruned-emaonly.safetensors) or pick a LoRA for this model")
        key_map = {}
        if model is not None:
            comfy.lora.model_lora_keys_unet(model.model, key_map)
        if clip is not None:
            comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        matched, unmatched = kohya.match_report(lora.keys(), key_map)
        if not matched:
            raise ValueError(f"none of the {len(unmatched)} modules of {name} match this MODEL/CLIP "
                             f"({family or 'no model'}); it was made for another base model "
                             f"({trained_for or 'unknown'}) or uses an unsupported key format, e.g. {unmatched[:2]}")
        unet = sum(1 for m in matched if not m.startswith(("lora_te", "text_encoder")))
        report = f"{name}: loaded {len(matched)} LoRA modules ({unet} UNet, {len(matched) - unet} text encoder)"
        if unmatched:
            report += f"; {len(unmatched)} NOT loaded (no such layer in this model): {', '.join(unmatched[:5])}"
            logging.warning("Atelier Artist Loader: %s", report)
        if strength_model == 0 and strength_clip == 0:
            return (model, clip, prompt, report + " (strengths 0: not applied)")
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        return (model_lora, clip_lora, prompt, report)


class AtelierArtistCheckpointLoader:
    DESCRIPTION = ("Load a full fine-tuned artist checkpoint (single-file .safetensors, e.g. from "
                   "python -m training finetune --method full) and return the artist prompt from its metadata.")
    CATEGORY = "atelier/artist"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "artist_prompt")
    OUTPUT_TOOLTIPS = ("The fine-tuned diffusion model.", "Its CLIP text encoder.", "Its VAE.",
                       "Prompt fragment naming the artist, from the checkpoint's metadata (empty if none).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (_choices("checkpoints"), {"tooltip": "Checkpoint in models/checkpoints; Atelier artist "
                                                               "checkpoints are listed as 'Artist — file'."}),
            "prompt_template": ("STRING", {"default": kohya.DEFAULT_PROMPT_TEMPLATE, "multiline": False,
                                           "tooltip": "How the artist prompt is built; fields {trigger} {artist} "
                                                      "{style}."}),
        }}

    def load(self, ckpt_name, prompt_template):
        import comfy.sd
        import folder_paths

        name, path = _resolve("checkpoints", ckpt_name)
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    embedding_directory=folder_paths.get_folder_paths("embeddings"))
        md = _metadata(path)
        prompt = kohya.artist_prompt(md, prompt_template) if md.get("atelier.artist") else ""
        return (out[0], out[1], out[2], prompt)


NODE_CLASS_MAPPINGS = {
    "AtelierArtistLoader": AtelierArtistLoader,
    "AtelierArtistCheckpointLoader": AtelierArtistCheckpointLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierArtistLoader": "Artist LoRA Loader (Atelier)",
    "AtelierArtistCheckpointLoader": "Artist Checkpoint Loader (Atelier)",
}
