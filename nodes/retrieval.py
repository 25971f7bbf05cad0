"""Style retrieval nodes (seed 002): open_clip loader, style database build/load, retriever, unCLIP bridge.

Thin adapters over the pure ``retrieval`` package; ComfyUI modules are imported inside functions.
"""
import json
import os

from ..retrieval.embedder import WEIGHT_SUFFIXES

CATEGORY = "atelier/retrieval"

WEIGHTS_HELP = (
    "Put open_clip weights in ComfyUI/models/open_clip/, e.g. 'ViT-L-14-openai.safetensors' (ViT-L-14, "
    "the paper's LAION-RDM embedder; from the Hugging Face repo openai/clip-vit-large-patch14 converted, or "
    "open_clip's 'ViT-L-14/openai' release), 'ViT-B-32-openai.safetensors' (ViT-B-32, the paper's ImageNet-RDM "
    "embedder) or 'ViT-H-14-laion2b_s32b_b79k.safetensors' (ViT-H-14, the embedder of SD 2.1 unCLIP-H; "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K, file open_clip_model.safetensors). .safetensors preferred; "
    ".bin/.pt/.pth load with weights_only. Other architectures: put open_clip's config '<Arch-Name>.json' in the "
    "same folder."
)


def _open_clip_files():
    try:
        import folder_paths

        return [f for f in folder_paths.get_filename_list("open_clip") if f.lower().endswith(WEIGHT_SUFFIXES)]
    except Exception:
        return []


_REGISTERED_CONFIGS = set()


def _register_folder_configs():
    """Register open_clip architecture configs (*.json) found in the open_clip model folders.

    Lets users (and the tests' tiny models) use architectures open_clip does not ship, e.g. a fine-tune with
    a changed config: put ``<Arch-Name>.json`` (open_clip's model-config format) next to the weights.
    """
    try:
        import folder_paths
        import open_clip

        folders = folder_paths.get_folder_paths("open_clip")
    except Exception:
        return
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not name.endswith(".json") or path in _REGISTERED_CONFIGS:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
                open_clip.add_model_config(path)
                _REGISTERED_CONFIGS.add(path)


def _architectures():
    _register_folder_configs()
    try:
        from ..retrieval.embedder import offline_architectures

        names = offline_architectures()
    except Exception:
        names = []
    for preferred in ("ViT-B-32", "ViT-L-14", "ViT-H-14"):
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
        _register_folder_configs()
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


def _db_root():
    from ..host.folders import first_path

    return first_path("atelier_style_db")


def _db_names():
    """'<db>/manifest.json' entries of the atelier_style_db folders (ComfyUI's own cached file listing)."""
    try:
        import folder_paths

        names = folder_paths.get_filename_list("atelier_style_db")
    except Exception:
        return []
    return sorted(n.replace(os.sep, "/") for n in names
                  if os.path.basename(n) == "manifest.json" and ".partial" not in n and ".tmp-" not in n)


def _find_db(name):
    """Directory of a database given as '<db>/manifest.json' or '<db>'."""
    import folder_paths

    rel = name[:-len("manifest.json")].rstrip("/\\") if name.endswith("manifest.json") else name
    for root in folder_paths.get_folder_paths("atelier_style_db"):
        path = os.path.join(root, rel)
        if os.path.isfile(os.path.join(path, "manifest.json")):
            return path
    raise FileNotFoundError(f"style database {rel!r} not found in {folder_paths.get_folder_paths('atelier_style_db')}"
                            "; build one with 'Style DB Build (Atelier)' or `python -m retrieval build`")


def _interruptible_progress(total):
    """Builder progress callback: ComfyUI progress bar + interrupt check (finished chunks stay on disk)."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, total))

    def progress(done, total_now):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, max(1, total_now))

    return progress


class AtelierStyleDBBuild:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("ATELIER_CLIP", {"tooltip": "open_clip model that embeds the images (queries must use the same one)."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Folder of images (absolute path). WikiArt layout Style/artist-name_title-year.jpg is parsed into style, artist, title, year; other folders: the first sub-folder is the style."}),
                "db_name": ("STRING", {"default": "my_style_db", "tooltip": "Name of the database directory created in models/atelier_style_db."}),
                "mode": (["build or resume", "rebuild", "add new images"], {"default": "build or resume", "tooltip": "build or resume: continue an interrupted build, else build. rebuild: discard any partial build. add new images: embed only images not yet in the database (content hash)."}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "Images embedded per forward pass."}),
                "index": (["auto", "exact", "ivf"], {"default": "auto", "tooltip": "auto: exact search up to 250k images, a FAISS IVF index above (its recall is measured and stored)."}),
            },
            "optional": {
                "metadata_file": ("STRING", {"default": "", "tooltip": "Optional CSV or JSONL with a path/file column and artist, style, genre, title, year columns (override what file names say)."}),
            },
        }

    RETURN_TYPES = ("ATELIER_STYLE_DB", "STRING")
    RETURN_NAMES = ("style_db", "report")
    OUTPUT_TOOLTIPS = ("The built style database.", "What was embedded, skipped and why.")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Embeds a folder of images with open_clip into a style database (models/atelier_style_db/<name>). "
                   "Interrupting keeps finished chunks; running again resumes. Unreadable files are skipped and listed.")

    @classmethod
    def IS_CHANGED(cls, image_folder="", db_name="", mode="", **kwargs):
        """Re-run when the folder's files change (count and newest mtime), not on every queue."""
        latest, count = 0.0, 0
        if image_folder and os.path.isdir(image_folder):
            for dirpath, _, files in os.walk(image_folder):
                for f in files:
                    count += 1
                    try:
                        latest = max(latest, os.path.getmtime(os.path.join(dirpath, f)))
                    except OSError:
                        pass
        return f"{image_folder}|{db_name}|{mode}|{count}|{latest}"

    def build(self, clip, image_folder, db_name, mode, batch_size, index, metadata_file=""):
        from ..retrieval.build import add_to_db, build_db, scan_folder
        from ..retrieval.db import load_db

        name = db_name.strip()
        if not name or name != os.path.basename(name) or name.startswith("."):
            raise ValueError(f"Style DB Build: db_name must be a plain directory name, got {db_name!r}")
        folder = image_folder.strip().strip('"')
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"Style DB Build: image_folder {image_folder!r} is not a folder; give the absolute path "
                             "of a folder of images")
        out = os.path.join(_db_root(), name)
        files, _ = scan_folder(folder)
        progress = _interruptible_progress(len(files))
        meta = metadata_file.strip() or None
        logs = []
        if mode == "add new images" and os.path.isfile(os.path.join(out, "manifest.json")):
            s = add_to_db(out, folder, clip, metadata_file=meta, batch_size=batch_size, index=index,
                          progress=progress, log=logs.append)
            skipped = s["skipped"]
        else:
            s = build_db(folder, out, clip, metadata_file=meta, batch_size=batch_size, index=index,
                         progress=progress, resume=(mode != "rebuild"), log=logs.append)
            skipped = s["skipped"]
            logs.append(f"built {s['count']} images from {s['files']} file(s); {len(s['duplicates'])} duplicate(s), "
                        f"{len(s['ignored'])} non-image file(s) ignored")
        for item in skipped[:50]:
            logs.append(f"skipped {item['path']}: {item['reason']}")
        db = load_db(out)
        return (db, "\n".join(logs + ["", db.info_text()]))


class AtelierStyleDBLoad:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "db_name": (_db_names(), {"tooltip": "A style database in models/atelier_style_db, shown as <database>/manifest.json (built with Style DB Build or `python -m retrieval build`)."}),
            }
        }

    RETURN_TYPES = ("ATELIER_STYLE_DB", "STRING")
    RETURN_NAMES = ("style_db", "info")
    OUTPUT_TOOLTIPS = ("The style database (embeddings memory-mapped).", "Size, embedder, index and contents.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a style database. Swap databases to swap styles without retraining (seed 002)."

    @classmethod
    def IS_CHANGED(cls, db_name=""):
        try:
            return str(os.path.getmtime(os.path.join(_find_db(db_name), "manifest.json")))
        except Exception:
            return db_name

    def load(self, db_name):
        from ..retrieval.db import load_db

        db = load_db(_find_db(db_name))
        return (db, db.info_text())


def _year(v):
    return None if v is None or int(v) <= 0 else int(v)


class AtelierStyleRetriever:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "style_db": ("ATELIER_STYLE_DB", {"tooltip": "Style database to search."}),
                "clip": ("ATELIER_CLIP", {"tooltip": "The open_clip model the database was built with."}),
                "text": ("STRING", {"default": "", "multiline": True, "tooltip": "Text query (embedded with the CLIP text tower)."}),
                "k": ("INT", {"default": 19, "min": 1, "max": 1000, "tooltip": "Number of neighbours (19 in the paper)."}),
                "image_weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "With an image query: query = (1-w)*text + w*image embedding (normalised). Ignored without image; 1.0 = image only."}),
                "artist": ("STRING", {"default": "", "tooltip": "Only neighbours whose artist contains this (case-insensitive; empty = any)."}),
                "style": ("STRING", {"default": "", "tooltip": "Only neighbours whose style contains this (e.g. impressionism)."}),
                "genre": ("STRING", {"default": "", "tooltip": "Only neighbours whose genre contains this (needs genre metadata)."}),
                "year_min": ("INT", {"default": 0, "min": 0, "max": 3000, "tooltip": "Earliest year (0 = no limit); rows without a year are dropped when set."}),
                "year_max": ("INT", {"default": 0, "min": 0, "max": 3000, "tooltip": "Latest year (0 = no limit)."}),
                "preview_size": ("INT", {"default": 224, "min": 32, "max": 1024, "step": 8, "tooltip": "Side of the square preview tiles (images are fitted and padded)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Optional image query (the batch is averaged)."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "ATELIER_NEIGHBORS", "STRING", "STRING")
    RETURN_NAMES = ("neighbours", "neighbors", "report", "style_prompt")
    OUTPUT_TOOLTIPS = (
        "The neighbours' images as a batch (for Preview Image).",
        "Neighbour embeddings, scores and metadata (for unCLIP conditioning or CLIP guidance).",
        "Ranked table: score, artist, style, genre, title, year.",
        "The text plus the neighbours' most frequent artists and styles, usable as a prompt for any model.",
    )
    FUNCTION = "retrieve"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Finds the k images of a style database nearest (cosine of CLIP embeddings) to a text and/or "
                   "image query, with metadata filters (seed 002's retrieval).")

    def retrieve(self, style_db, clip, text, k, image_weight, artist, style, genre, year_min, year_max,
                 preview_size, image=None):
        import torch

        from ..retrieval.db import Filters
        from ..retrieval.present import preview_batch, report, style_prompt

        style_db.check_embedder(clip)
        q, desc = None, []
        if text and text.strip():
            q = clip.encode_text([text])[0].float().cpu()
            desc.append(f"text '{text.strip()[:60]}'")
        if image is not None and (image_weight > 0 or q is None):
            qi = clip.encode_image(image.movedim(-1, 1)).float().cpu().mean(0)
            qi = torch.nn.functional.normalize(qi, dim=0)
            w = image_weight if q is not None else 1.0
            q = qi if q is None else (1 - w) * q + w * qi
            desc.append(f"image (weight {w:.2f})")
        if q is None:
            raise ValueError("Style Retriever: give a text query, an image, or both")
        q = torch.nn.functional.normalize(q, dim=0)
        filters = Filters(artist.strip(), style.strip(), genre.strip(), _year(year_min), _year(year_max))
        device = clip.device if getattr(clip.device, "type", "cpu") == "cuda" else None  # GPU: exact search there
        neighbors = style_db.neighbors(q.numpy(), k, filters, device=device)
        images, missing = preview_batch([m["path"] for m in neighbors.metadata], preview_size)
        text_report = report(neighbors, style_db.name, " + ".join(desc), missing)
        if filters.active():
            text_report += f"\nfilters: {filters.describe()}"
        return (images, neighbors, text_report, style_prompt(text, neighbors))


class AtelierNeighborsToUnCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "Text conditioning of an SD 2.1 unCLIP checkpoint to extend."}),
                "neighbors": ("ATELIER_NEIGHBORS", {"tooltip": "Retrieved neighbours (their CLIP image embeddings are used)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Strength of the image conditioning (as in unCLIPConditioning). With 'each' it is split evenly over the neighbours."}),
                "noise_augmentation": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Noise added to the image embeddings by the model's noise augmentor: higher = looser, more varied."}),
                "combine": (["average", "score-weighted average", "each"], {"default": "average", "tooltip": "average: one embedding, the neighbours' mean. score-weighted: mean weighted by cosine score. each: one unCLIP entry per neighbour (ComfyUI sums them)."}),
                "top_n": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Use only the n best neighbours (0 = all)."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The unCLIP model, to check that its image-embedding size matches the neighbours' (recommended)."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Conditioning with unclip_conditioning entries, for an SD 2.1 unCLIP checkpoint.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Adds the neighbours' CLIP image embeddings as unCLIP image conditioning, like the core "
                   "unCLIPConditioning node does with a CLIP Vision output. Needs an SD 2.1 unCLIP checkpoint whose "
                   "image embedder matches the database: sd21-unclip-h ↔ open_clip ViT-H-14 (1024-d), "
                   "sd21-unclip-l ↔ ViT-L-14 (768-d).")

    def apply(self, conditioning, neighbors, strength, noise_augmentation, combine, top_n, model=None):
        import comfy.clip_vision
        import node_helpers

        from ..retrieval.present import unclip_embeddings

        expected = None
        if model is not None:
            augmentor = getattr(getattr(model, "model", None), "noise_augmentor", None)
            if augmentor is None:
                raise ValueError("Neighbours → unCLIP: the MODEL is not an unCLIP model (no CLIP-embedding noise "
                                 "augmentor). Load an SD 2.1 unCLIP checkpoint such as sd21-unclip-h.safetensors, or "
                                 "use the retriever's style_prompt with an ordinary model.")
            expected = int(augmentor.data_mean.shape[-1])
        try:
            embeds = unclip_embeddings(neighbors, combine, top_n, expected)
        except ValueError as e:
            raise ValueError(f"Neighbours → unCLIP: {e}") from e
        if strength == 0:
            return (conditioning,)
        output = comfy.clip_vision.Output()
        output["image_embeds"] = embeds
        per_entry = strength / embeds.shape[0]
        entry = {"clip_vision_output": output, "strength": per_entry, "noise_augmentation": noise_augmentation}
        return (node_helpers.conditioning_set_values(conditioning, {"unclip_conditioning": [entry]}, append=True),)


NODE_CLASS_MAPPINGS = {
    "AtelierOpenCLIPLoader": AtelierOpenCLIPLoader,
    "AtelierStyleDBBuild": AtelierStyleDBBuild,
    "AtelierStyleDBLoad": AtelierStyleDBLoad,
    "AtelierStyleRetriever": AtelierStyleRetriever,
    "AtelierNeighborsToUnCLIP": AtelierNeighborsToUnCLIP,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierOpenCLIPLoader": "open_clip Loader (Atelier)",
    "AtelierStyleDBBuild": "Style DB Build (Atelier)",
    "AtelierStyleDBLoad": "Style DB Load (Atelier)",
    "AtelierStyleRetriever": "Style Retriever (Atelier)",
    "AtelierNeighborsToUnCLIP": "Neighbours → unCLIP Conditioning (Atelier)",
}
