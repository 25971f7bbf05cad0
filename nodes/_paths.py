"""Model folders the pack uses (DESIGN.md section 2).

ComfyUI already knows ``loras``, ``checkpoints``, ``upscale_models`` and ``vae_approx``; the pack adds
its own folders under ``models/``. A folder a user configured (extra_model_paths.yaml is applied before
packs load) is kept: we only append our default path, never replace the entry.
"""
import os

PACK_FOLDERS = {
    "open_clip": {".safetensors", ".bin", ".pt", ".pth"},
    "prompt_expansion": set(),  # Hugging Face model directories
    "atelier_knowledge": {".sqlite", ".db", ".jsonl"},
    "atelier_style_db": set(),  # style database directories
}


def register_model_folders():
    """Register the pack's folders with ComfyUI; a no-op when ComfyUI is not importable."""
    try:
        import folder_paths
    except ImportError:
        return False
    for name, exts in PACK_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        existing = folder_paths.folder_names_and_paths.get(name)
        if existing is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))
        elif default not in existing[0]:
            existing[0].append(default)  # keep the user's paths first and their extension set as it is
    return True


def model_folder(name):
    """The first configured path of a model folder (created if missing), for error messages and writes."""
    import folder_paths

    paths = folder_paths.get_folder_paths(name)
    if not paths:
        raise RuntimeError(f"Atelier: ComfyUI has no '{name}' model folder registered")
    os.makedirs(paths[0], exist_ok=True)
    return paths[0]
