"""Style retrieval nodes (seed 002): open_clip loader, style database build/load, retriever, unCLIP bridge.

Thin adapters over the pure ``retrieval`` package; ComfyUI modules are imported inside functions.
"""
import os

from ..retrieval.embedder import WEIGHT_SUFFIXES

CATEGORY = "atelier/retrieval"

WEIGHTS_HELP = (
    "Put open_clip weights in ComfyUI/models/open_clip/, e.g. 'ViT-L-14-openai.safetensors' (ViT-L-14, "
    "the paper's LAION-RDM embedder; from the Hugging Face repo openai/clip-vit-large-patch14 converted, or "
    "open_clip's 'ViT-L-14/openai' release), 'ViT-B-32-openai.safetensors' (ViT-B-32, the paper's ImageNet-RDM "
    "embedder) or 'ViT-H-14-laion2b_s32b_b79k.safetensors' (ViT-H-14, the embedder of SD 2.1 unCLIP-H; "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K, file open_clip_model.safetensors). .safetensors preferred; "
    ".bin/.pt/.pth load with weights_only."
)


def _open_clip_files():
    try:
        import folder_paths

        return [f for f in folder_paths.get_filename_list("open_clip") if f.lower().endswith(WEIGHT_SUFFIXES)]
    except Exception:
        return []


def _architectures():
    try:
        from ..retrieval.embedder import offline_architectures

        names = offline_architectures()
    except Exception:
        names = []
    for preferred in ("ViT-H-14", "ViT-L-14", "ViT-B-32"):
        if preferred in names:
            names.remove(preferred)
            names.insert(0, preferred)
    return names or ["ViT-L-14"]


def _guess_architecture(filename, names):
    """Longest known architecture name that prefixes the file name (e.g. ViT-L-14-openai → ViT-L-14)."""
    base = os.path.basename(filename)
    hits = [n for n in names if base.startswith(n)]
    return max(hits, key=len) if hits else None


class AtelierOpenCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        archs = _architectures()
        return {
            "required": {
                "weights": (_open_clip_files(), {"tooltip": "Weights file in models/open_clip. " + WEIGHTS_HELP}),
                "architecture": (["auto from file name"] + archs, {
                    "default": "auto from file name",
                    "tooltip": "open_clip architecture of the weights. 'auto' takes the longest architecture "
                               "name the file name starts with (ViT-L-14-openai.safetensors → ViT-L-14)."}),
                "device": (["auto", "cpu", "gpu"], {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's torch device (GPU when present), cpu: keep CLIP off the GPU."}),
            }
        }

    RETURN_TYPES = ("ATELIER_CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("open_clip text and image towers (L2-normalised embeddings) for retrieval and guidance.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads an open_clip model from a local weights file (no downloads). Used by the style "
                   "database nodes and by CLIP guidance. " + WEIGHTS_HELP)

    def load(self, weights, architecture, device):
        import folder_paths

        from ..retrieval.embedder import OpenClipEmbedder

        path = folder_paths.get_full_path("open_clip", weights) if weights else None
        if not path or not os.path.isfile(path):
            folders = folder_paths.get_folder_paths("open_clip")
            raise FileNotFoundError(f"Atelier open_clip Loader: weights file {weights!r} not found in "
                                    f"{folders}. {WEIGHTS_HELP}")
        if architecture == "auto from file name":
            guess = _guess_architecture(weights, _architectures())
            if guess is None:
                raise ValueError(f"Atelier open_clip Loader: cannot tell the architecture of {weights!r} from its "
                                 "name; choose it in 'architecture' or rename the file to start with it "
                                 "(e.g. ViT-L-14-openai.safetensors)")
            architecture = guess
        if device == "auto":
            import comfy.model_management as mm

            dev = mm.get_torch_device()
        elif device == "gpu":
            import comfy.model_management as mm

            dev = mm.get_torch_device()
            if dev.type == "cpu":
                raise RuntimeError("Atelier open_clip Loader: device 'gpu' asked but ComfyUI runs on CPU")
        else:
            dev = "cpu"
        return (OpenClipEmbedder(architecture, path, device=dev),)


NODE_CLASS_MAPPINGS = {
    "AtelierOpenCLIPLoader": AtelierOpenCLIPLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierOpenCLIPLoader": "open_clip Loader (Atelier)",
}
