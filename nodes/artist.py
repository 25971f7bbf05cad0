"""Artist Loader nodes: an artist LoRA or fine-tuned checkpoint plus the prompt that calls the artist up.

The work (labels, LoRA checks and report, artist prompt) is ``training.artist_files``; ComfyUI's folders,
safe loader, LoRA key maps and LoRA application come through the host seam.
"""
from ..common.folders import CHECKPOINTS, LORAS
from ..host import folders, models
from ..training import artist_files, kohya


class AtelierArtistLoader:
    DESCRIPTION = ("Apply an artist LoRA (kohya format, e.g. from `python -m training finetune`, the artist "
                   "fine-tuning of 'Novel Paintings from the Latent Diffusion Model through Transfer Learning') to "
                   "MODEL and CLIP and return the artist prompt stored in its metadata. Keys that do not match the "
                   "model are counted in the report; a LoRA made for another base model is refused.")
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
        self.cache = artist_files.LoraFileCache()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD 1.x diffusion model the LoRA is applied to."}),
            "clip": ("CLIP", {"tooltip": "The matching CLIP text encoder."}),
            "lora_name": (artist_files.choices(LORAS, folders), {
                "tooltip": "LoRA file in models/loras; Atelier artist LoRAs are listed as 'Artist — file'."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                         "tooltip": "How strongly the LoRA changes the diffusion model."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                        "tooltip": "How strongly the LoRA changes the text encoder."}),
            "prompt_template": ("STRING", {"default": kohya.DEFAULT_PROMPT_TEMPLATE, "multiline": False,
                                           "tooltip": "How the artist prompt is built; fields {trigger} {artist} "
                                                      "{style}. Empty fields vanish cleanly."}),
        }}

    def load(self, model, clip, lora_name, strength_model, strength_clip, prompt_template):
        lora = artist_files.artist_lora(
            lora_name, folders, models.load_file, family=models.model_family(model),
            key_map=models.lora_key_map(model, clip), strengths=(strength_model, strength_clip),
            template=prompt_template, cache=self.cache)
        if not lora.apply:
            return (model, clip, lora.prompt, lora.report)
        model_lora, clip_lora = models.apply_lora(model, clip, lora.tensors, strength_model, strength_clip)
        return (model_lora, clip_lora, lora.prompt, lora.report)


class AtelierArtistCheckpointLoader:
    DESCRIPTION = ("Load a full fine-tuned artist checkpoint (single-file .safetensors, e.g. from "
                   "python -m training finetune --method full, as in 'Novel Paintings from the Latent Diffusion "
                   "Model through Transfer Learning') and return the artist prompt from its metadata.")
    CATEGORY = "atelier/artist"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "artist_prompt")
    OUTPUT_TOOLTIPS = ("The fine-tuned diffusion model.", "Its CLIP text encoder.", "Its VAE.",
                       "Prompt fragment naming the artist, from the checkpoint's metadata (empty if none).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (artist_files.choices(CHECKPOINTS, folders), {
                "tooltip": "Checkpoint in models/checkpoints; Atelier artist checkpoints are listed as "
                           "'Artist — file'."}),
            "prompt_template": ("STRING", {"default": kohya.DEFAULT_PROMPT_TEMPLATE, "multiline": False,
                                           "tooltip": "How the artist prompt is built; fields {trigger} {artist} "
                                                      "{style}."}),
        }}

    def load(self, ckpt_name, prompt_template):
        _, path = artist_files.resolve(CHECKPOINTS, ckpt_name, folders)
        model, clip, vae = models.load_checkpoint(path)
        return (model, clip, vae, artist_files.prompt_of(artist_files.metadata(path), prompt_template))


NODE_CLASS_MAPPINGS = {
    "AtelierArtistLoader": AtelierArtistLoader,
    "AtelierArtistCheckpointLoader": AtelierArtistCheckpointLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierArtistLoader": "Artist LoRA Loader (Atelier)",
    "AtelierArtistCheckpointLoader": "Artist Checkpoint Loader (Atelier)",
}
