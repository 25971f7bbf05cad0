"""Metric nodes: CLIP score, the RDM paper's style classifier, FID and α-FID, each scoring an image batch and
optionally a baseline batch (the other arm of a comparison workflow). Thin: the work is in ``metrics/``."""
import os

from ..common.folders import FID, STYLE_CLASSIFIER
from ..host import folders as host_folders
from ..host.models import torch_device
from ..host.progress import ComfyProgress, show_text
from ..metrics.inception import FEATURE_DIMS, RESIZES, WEIGHT_SUFFIXES, WEIGHTS_FILE, WEIGHTS_HELP
from ..metrics.reports import alpha_fid_report, clip_score_report, fid_report, style_score_report

CATEGORY = "atelier/metrics"
CLASSIFIER_HELP = ("Put a style classifier (.safetensors, trained with `python -m metrics style-train` on a labelled "
                   "collection such as ArtBench) in ComfyUI/models/atelier_style_classifier/.")
FEATURES_TIP = ("Inception layer: 2048 (pool3) is the standard FID; 768/192/64 are smaller layers whose numbers "
                "are not comparable with published FID.")
RESIZE_TIP = ("How images reach 299 px: tf-bilinear is the original TensorFlow FID (pytorch-fid's published "
              "statistics); antialias is torchmetrics' default. Reference statistics must use the same.")
BASELINE_TIP = "Optional second batch (the other arm of the comparison, e.g. without the method); scored the same way."


def _file(folder, name, what, help_text):
    path = host_folders.full_path(folder, name) if name else None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {name!r} not found in models/{folder}. {help_text}")
    return path


def _reference(text):
    """A statistics file or image folder in models/atelier_fid (by name), or an absolute folder or .npz path."""
    text = (text or "").strip().strip('"')
    if not text:
        raise ValueError("give a reference: a statistics .npz in models/atelier_fid, or the absolute path of a "
                         "folder of images or of a .npz file")
    if os.path.isabs(text):
        return text
    found = host_folders.full_path(FID, text) or next(
        (os.path.join(root, text) for root in host_folders.paths(FID) if os.path.isdir(os.path.join(root, text))), None)
    if not found:
        raise FileNotFoundError(f"reference {text!r} is not in models/atelier_fid; give the name of a statistics .npz "
                                "or an image folder there, or an absolute path")
    return found


def _inception_files():
    return [f for f in host_folders.files(FID) if f.lower().endswith(WEIGHT_SUFFIXES)] or [WEIGHTS_FILE]


def _inception(name, features, resize):
    from ..metrics.inception import load_inception

    return load_inception(_file(FID, name, "Inception weights", WEIGHTS_HELP), dim=int(features), resize=resize,
                          device=torch_device())


def _inception_inputs():
    return {
        "inception": (_inception_files(), {"tooltip": "FID Inception weights in models/atelier_fid. " + WEIGHTS_HELP}),
        "features": ([str(d) for d in reversed(FEATURE_DIMS)], {"default": "2048", "tooltip": FEATURES_TIP}),
        "resize": (list(RESIZES), {"default": RESIZES[0], "tooltip": RESIZE_TIP}),
    }


def _done(out, text_key, unique_id, *values):
    show_text(out[text_key], unique_id)
    return {"ui": {"text": [out[text_key]]}, "result": (*values, out[text_key])}


class AtelierCLIPScore:
    DESCRIPTION = ("CLIP score, 100·max(cos, 0) between each image's and its prompt's open_clip embeddings, with a "
                   "table per image; with baseline images, both means and their difference.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("clip_score", "baseline_clip_score", "report")
    OUTPUT_TOOLTIPS = ("Mean CLIP score of the images (0-100; higher = closer to the prompt).",
                       "Mean CLIP score of the baseline images (-1 without them).",
                       "Per-image table, means and the difference.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("ATELIER_CLIP", {"tooltip": "open_clip model from 'open_clip Loader (Atelier)'."}),
            "images": ("IMAGE", {"tooltip": "Images to score."}),
            "prompts": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "The prompt the images were made from: one line for every image, or "
                                              "one line per image in batch order."}),
        }, "optional": {"baseline_images": ("IMAGE", {"tooltip": BASELINE_TIP})},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    def score(self, clip, images, prompts, baseline_images=None, unique_id=None):
        out = clip_score_report(clip, images, prompts, baseline_images, progress=ComfyProgress(images.shape[0]))
        base = out["baseline_score"]
        return _done(out, "text", unique_id, out["score"], -1.0 if base is None else base)


class AtelierStyleClassifierLoad:
    DESCRIPTION = ("Loads a style classifier (the RDM paper's two-layer MLP on CLIP image features) trained with "
                   "`python -m metrics style-train`. " + CLASSIFIER_HELP)
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ATELIER_STYLE_CLASSIFIER", "STRING")
    RETURN_NAMES = ("classifier", "info")
    OUTPUT_TOOLTIPS = ("The classifier (its labels and the open_clip model it needs).",
                       "Labels, embedder and the accuracy measured when it was trained.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"classifier": (host_folders.files(STYLE_CLASSIFIER), {
            "tooltip": "Classifier file in models/atelier_style_classifier. " + CLASSIFIER_HELP})}}

    def load(self, classifier):
        from ..metrics.style import load_classifier

        clf = load_classifier(_file(STYLE_CLASSIFIER, classifier, "style classifier", CLASSIFIER_HELP))
        return (clf, clf.describe())


class AtelierStyleScore:
    DESCRIPTION = ("Classifies images by style with a style classifier (top styles per image). With target_style, "
                   "the share of images whose top-1 style it is; with baseline images too, the relative improvement "
                   "of the RDM paper's comparison (retrieval vs prompt-suffix stylisation).")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("top_styles", "accuracy", "baseline_accuracy", "report")
    OUTPUT_TOOLTIPS = ("The top-1 style of each image, one per line.",
                       "Share of images whose top-1 style is target_style (0-1; -1 without a target).",
                       "The same for the baseline images (-1 without them).",
                       "Top styles per image with probabilities, accuracies and the relative improvement.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "classifier": ("ATELIER_STYLE_CLASSIFIER", {"tooltip": "From 'Style Classifier Load (Atelier)'."}),
            "clip": ("ATELIER_CLIP", {"tooltip": "The open_clip model the classifier was trained with."}),
            "images": ("IMAGE", {"tooltip": "Images to classify."}),
            "top_k": ("INT", {"default": 3, "min": 1, "max": 20, "tooltip": "Styles listed per image."}),
            "target_style": ("STRING", {"default": "", "tooltip": "The style the images were asked for (one of the "
                                                                  "classifier's labels; empty: no accuracy)."}),
        }, "optional": {"baseline_images": ("IMAGE", {"tooltip": BASELINE_TIP})},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    def score(self, classifier, clip, images, top_k, target_style, baseline_images=None, unique_id=None):
        out = style_score_report(classifier, clip, images, top_k, target_style, baseline_images,
                                 progress=ComfyProgress(images.shape[0]))
        return _done(out, "text", unique_id, out["top_styles"], out["accuracy"], out["baseline_accuracy"])


class AtelierFID:
    DESCRIPTION = ("Fréchet Inception Distance of an image batch or a folder against a reference (a statistics .npz "
                   "in pytorch-fid's layout, or a folder of images). Folder features are cached by file hash, so a "
                   "second run reads no image. FID needs thousands of images to be comparable with published "
                   "numbers; the report warns below that. " + WEIGHTS_HELP)
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("fid", "baseline_fid", "report")
    OUTPUT_TOOLTIPS = ("FID of the images against the reference (lower = closer).",
                       "FID of the baseline images (-1 without them).", "Table of FIDs, set sizes and warnings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("STRING", {"default": "", "tooltip": "Reference set: the name of a statistics .npz (e.g. "
                                     "made with `python -m metrics stats`) or of an image folder in models/atelier_fid, "
                                     "or an absolute path of either."}),
            **_inception_inputs(),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "Generated images (at least 2; thousands for a comparable FID)."}),
            "image_folder": ("STRING", {"default": "", "tooltip": "Or the absolute path of a folder of generated "
                                                                  "images (used when no images are connected)."}),
            "baseline_images": ("IMAGE", {"tooltip": BASELINE_TIP}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def measure(self, reference, inception, features, resize, images=None, image_folder="", baseline_images=None,
                unique_id=None):
        out = fid_report(_inception(inception, features, resize), _reference(reference), images,
                         image_folder.strip().strip('"'), baseline_images, progress=ComfyProgress())
        base = out["baseline_fid"]
        return _done(out, "text", unique_id, out["fid"], -1.0 if base is None else base)


class AtelierAlphaFID:
    DESCRIPTION = ("α-FID of the multistage-guidance paper (eq. 6): √([x² + y² + (x − y)²]/2) with x, y the FIDs of "
                   "the images against the images of each of two objects (e.g. dragons and fish); lower is better. "
                   "With baseline images (e.g. the one-stage prompt) both are reported. " + WEIGHTS_HELP)
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("alpha_fid", "x", "y", "baseline_alpha_fid", "report")
    OUTPUT_TOOLTIPS = ("α-FID of the images.", "x = FID(images, reference 1).", "y = FID(images, reference 2).",
                       "α-FID of the baseline images (-1 without them).", "Table of α-FID, x, y and set sizes.")

    @classmethod
    def INPUT_TYPES(cls):
        ref = ("Images of the {} object: the name of an image folder or a statistics .npz in models/atelier_fid, or "
               "an absolute path of either (the paper used 40 images per object).")
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Generated images G (the paper used 40 per caption)."}),
            "reference_1": ("STRING", {"default": "", "tooltip": ref.format("first")}),
            "reference_2": ("STRING", {"default": "", "tooltip": ref.format("second")}),
            **_inception_inputs(),
        }, "optional": {"baseline_images": ("IMAGE", {"tooltip": BASELINE_TIP})},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    def measure(self, images, reference_1, reference_2, inception, features, resize, baseline_images=None,
                unique_id=None):
        out = alpha_fid_report(_inception(inception, features, resize), images, _reference(reference_1),
                               _reference(reference_2), baseline_images, progress=ComfyProgress())
        base = out["baseline"]
        return _done(out, "text", unique_id, out["alpha_fid"], out["x"], out["y"],
                     -1.0 if base is None else base["alpha_fid"])


NODE_CLASS_MAPPINGS = {
    "AtelierCLIPScore": AtelierCLIPScore,
    "AtelierStyleClassifierLoad": AtelierStyleClassifierLoad,
    "AtelierStyleScore": AtelierStyleScore,
    "AtelierFID": AtelierFID,
    "AtelierAlphaFID": AtelierAlphaFID,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierCLIPScore": "CLIP Score (Atelier)",
    "AtelierStyleClassifierLoad": "Style Classifier Load (Atelier)",
    "AtelierStyleScore": "Style Score (Atelier)",
    "AtelierFID": "FID (Atelier)",
    "AtelierAlphaFID": "α-FID (Atelier)",
}
