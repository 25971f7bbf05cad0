"""Style retrieval nodes (the retrieval of "Text-Guided Synthesis of Artistic Images with Retrieval-Augmented
Diffusion Models", RDM): open_clip loader, style database build/load, retriever, unCLIP bridge.

Thin nodes: each calls one function of the ``retrieval`` core and talks to ComfyUI only through ``host/``.
"""
from ..common.folders import OPEN_CLIP, STYLE_DB
from ..host import folders
from ..host.models import clip_vision_output, torch_device, unclip_embedding_dim
from ..host.progress import ComfyProgress
from ..host.sampling import conditioning_with
from ..retrieval.db import load_db
from ..retrieval.embedder import AUTO_ARCHITECTURE, WEIGHTS_HELP, architectures, load_embedder, weight_files
from ..retrieval.importers.formats import FORMATS
from ..retrieval.library import (BUILD_MODES, build_style_db, db_fingerprint, db_names, find_db, folder_fingerprint,
                                 import_style_db)
from ..retrieval.present import unclip_conditioning
from ..retrieval.query import retrieve

CATEGORY = "atelier/retrieval"
RDM = "Text-Guided Synthesis of Artistic Images with Retrieval-Augmented Diffusion Models"


class AtelierOpenCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        archs = architectures(folders.paths(OPEN_CLIP))
        return {
            "required": {
                "weights": (weight_files(folders.files(OPEN_CLIP)), {
                    "tooltip": "Weights file in models/open_clip. " + WEIGHTS_HELP}),
                "architecture": ([AUTO_ARCHITECTURE] + archs, {
                    "default": AUTO_ARCHITECTURE,
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
        clip = load_embedder(weights, folders.full_path(OPEN_CLIP, weights), architecture, device,
                             folders.paths(OPEN_CLIP), host_device=torch_device)
        return (clip,)


class AtelierStyleDBBuild:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("ATELIER_CLIP", {"tooltip": "open_clip model that embeds the images (queries must use the same one)."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Folder of images (absolute path). WikiArt layout Style/artist-name_title-year.jpg is parsed into style, artist, title, year; other folders: the first sub-folder is the style."}),
                "db_name": ("STRING", {"default": "my_style_db", "tooltip": "Name of the database directory created in models/atelier_style_db."}),
                "mode": (list(BUILD_MODES), {"default": BUILD_MODES[0], "tooltip": "build or resume: continue an interrupted build, else build. rebuild: discard any partial build. add new images: embed only images not yet in the database (content hash)."}),
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
        return folder_fingerprint(image_folder, db_name, mode)

    def build(self, clip, image_folder, db_name, mode, batch_size, index, metadata_file=""):
        return build_style_db(folders.first_path(STYLE_DB), clip, image_folder, db_name, mode, batch_size, index,
                              metadata_file, progress=ComfyProgress())


class AtelierStyleDBImport:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": ("STRING", {"default": "", "tooltip": "Absolute path of the precomputed embeddings: a CompVis retrieval database folder of *.npz parts (embedding, img_id, patch_coords), e.g. artbench-surrealism, or one .npz; or a clip-retrieval / img2dataset folder with img_emb/*.npy and metadata/*.parquet."}),
                "db_name": ("STRING", {"default": "artbench_surrealism", "tooltip": "Name of the database directory created in models/atelier_style_db."}),
                "format": (list(FORMATS), {"default": FORMATS[0], "tooltip": "auto: told from the files. compvis-npz: CompVis latent-diffusion retrieval databases. clip-retrieval: clip-retrieval / img2dataset embedding folders (e.g. LAION's precomputed ViT-L/14 embeddings)."}),
                "architecture": ("STRING", {"default": "ViT-L-14", "tooltip": "open_clip architecture that computed the embeddings (CompVis databases: ViT-L-14). Queries must use a model of this architecture."}),
                "index": (["auto", "exact", "ivf"], {"default": "auto", "tooltip": "auto: exact search up to 250k rows, a FAISS IVF index above (its recall is measured and stored)."}),
            },
            "optional": {
                "style": ("STRING", {"default": "", "tooltip": "Style written into every row (empty: from an ArtBench folder name such as artbench-surrealism, else none)."}),
            },
        }

    RETURN_TYPES = ("ATELIER_STYLE_DB", "STRING")
    RETURN_NAMES = ("style_db", "report")
    OUTPUT_TOOLTIPS = ("The imported style database (no images: previews say 'no image').", "What was imported.")
    FUNCTION = "import_db"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Imports embeddings computed elsewhere into a style database without the images, keeping their "
                   "metadata: CompVis retrieval databases (the ArtBench and OpenImages *.npz of the RDM) and clip-retrieval / "
                   "img2dataset embedding folders (npy parts with parquet metadata: url, caption, ...). Streams one "
                   "part at a time; running again resumes an interrupted import.")

    def import_db(self, source, db_name, format, architecture, index, style=""):
        return import_style_db(folders.first_path(STYLE_DB), source, db_name, format, architecture, index, style,
                               progress=ComfyProgress())


class AtelierStyleDBLoad:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "db_name": (db_names(folders.files(STYLE_DB)), {"tooltip": "A style database in models/atelier_style_db, shown as <database>/manifest.json (built with Style DB Build or `python -m retrieval build`)."}),
            }
        }

    RETURN_TYPES = ("ATELIER_STYLE_DB", "STRING")
    RETURN_NAMES = ("style_db", "info")
    OUTPUT_TOOLTIPS = ("The style database (embeddings memory-mapped).", "Size, embedder, index and contents.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a style database. Swap databases to swap styles without retraining, as in "
                   f"'{RDM}'.")

    @classmethod
    def IS_CHANGED(cls, db_name=""):
        return db_fingerprint(db_name, folders.paths(STYLE_DB))

    def load(self, db_name):
        db = load_db(find_db(db_name, folders.paths(STYLE_DB)))
        return (db, db.info_text())


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
                   f"image query, with metadata filters: the retrieval of '{RDM}' (Rombach, Blattmann, Ommer 2022).")

    def retrieve(self, style_db, clip, text, k, image_weight, artist, style, genre, year_min, year_max,
                 preview_size, image=None):
        return tuple(retrieve(style_db, clip, text, k, image_weight, artist, style, genre, year_min, year_max,
                              preview_size, image=image))


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
        values = unclip_conditioning(neighbors, strength, noise_augmentation, combine, top_n, model=model,
                                     embedding_dim=unclip_embedding_dim, make_output=clip_vision_output)
        return (conditioning if values is None else conditioning_with(conditioning, values, append=True),)


NODE_CLASS_MAPPINGS = {
    "AtelierOpenCLIPLoader": AtelierOpenCLIPLoader,
    "AtelierStyleDBBuild": AtelierStyleDBBuild,
    "AtelierStyleDBImport": AtelierStyleDBImport,
    "AtelierStyleDBLoad": AtelierStyleDBLoad,
    "AtelierStyleRetriever": AtelierStyleRetriever,
    "AtelierNeighborsToUnCLIP": AtelierNeighborsToUnCLIP,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierOpenCLIPLoader": "open_clip Loader (Atelier)",
    "AtelierStyleDBBuild": "Style DB Build (Atelier)",
    "AtelierStyleDBImport": "Style DB Import (Atelier)",
    "AtelierStyleDBLoad": "Style DB Load (Atelier)",
    "AtelierStyleRetriever": "Style Retriever (Atelier)",
    "AtelierNeighborsToUnCLIP": "Neighbours → unCLIP Conditioning (Atelier)",
}
