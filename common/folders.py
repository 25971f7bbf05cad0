"""Model folders: the names the pack adds under ``ComfyUI/models/`` and the stock ones it reads from.

One place for the names, used by the host seam (registration, lookups), the runner (missing-file messages)
and the docs' tables.
"""
OPEN_CLIP = "open_clip"                  # open_clip weights (+ optional architecture configs *.json)
PROMPT_EXPANSION = "prompt_expansion"    # Hugging Face model folders (GPT-2, T5, NER ...)
KNOWLEDGE = "atelier_knowledge"          # knowledge bases for the Prompt Extender
STYLE_DB = "atelier_style_db"            # style databases (one folder each)
FID = "atelier_fid"                      # FID Inception weights and reference statistics (.npz)
STYLE_CLASSIFIER = "atelier_style_classifier"  # style classifiers (python -m metrics style-train)
RDM = "rdm"                              # retrieval-augmented diffusion models (CompVis model.ckpt, conversions)

# folder -> file endings ComfyUI lists in it (empty: the entries are folders)
PACK_FOLDERS = {
    OPEN_CLIP: {".safetensors", ".bin", ".pt", ".pth"},
    PROMPT_EXPANSION: set(),
    KNOWLEDGE: {".sqlite", ".db", ".jsonl"},
    STYLE_DB: set(),
    FID: {".pth", ".pt", ".bin", ".safetensors", ".npz"},
    STYLE_CLASSIFIER: {".safetensors"},
    RDM: {".ckpt", ".safetensors", ".pt", ".pth"},
}

# ComfyUI's own folders the pack's nodes and workflows read
CHECKPOINTS, LORAS, VAE, VAE_APPROX, UPSCALE_MODELS = "checkpoints", "loras", "vae", "vae_approx", "upscale_models"
