"""The RDM's conditioning, as CompVis latent-diffusion's scripts/knn2img.py builds it.

knn2img embeds the prompt with CLIP ViT-L/14 (``encode_text``: the projected end-of-text token, 768-d),
L2-normalises it to ``(B, 1, 768)``, queries the database with it, L2-normalises the k retrieved image
embeddings ``(B, k, 768)`` (best first), and conditions the UNet's cross-attention on their concatenation
``c = cat([text, neighbours], dim=1)``: ``(B, k + 1, 768)``, text first. Text-only sampling is ``c = text``;
the negative is ``zeros_like(c)`` (ComfyUI's ConditioningZeroOut gives exactly that).

Options beyond knn2img: neighbours only (no text token), an image prompt (its CLIP image embedding, the
batch averaged and L2-normalised) in place of the text token or beside it, and a weight on the text token.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .checkpoint import CONTEXT_DIM

MODES = ("text + neighbours", "text only", "neighbours only")
IMAGE_USES = ("replace text", "beside text")
DEFAULT_K = 19  # the paper's number of neighbours at inference


class ConditioningError(ValueError):
    """Inputs the RDM cannot be conditioned on; the message says what to change."""


def knn_context(text=None, neighbours=None, text_weight=1.0):
    """The knn2img context: ``cat([w · normalize(text), normalize(neighbours)], 1)``.

    ``text``: [B, 768] (or [768]) CLIP text (or image-prompt) tokens, each L2-normalised here, or None;
    ``neighbours``: [B, k, 768] or [k, 768] (one set for every batch row), best first, or None. Returns
    [B, n, 768] float32 with n = (1 if text) + k."""
    parts = []
    if text is not None:
        t = text.float()
        t = t[None] if t.ndim == 1 else t
        if t.ndim != 2:
            raise ConditioningError(f"text tokens must be [B, dim], got shape {tuple(t.shape)}")
        parts.append(F.normalize(t, dim=-1)[:, None, :] * float(text_weight))
    if neighbours is not None:
        n = neighbours.float()
        n = n[None] if n.ndim == 2 else n
        if n.ndim != 3:
            raise ConditioningError(f"neighbour embeddings must be [B, k, dim], got shape {tuple(n.shape)}")
        parts.append(F.normalize(n, dim=-1))
    if not parts:
        raise ConditioningError("nothing to condition on: give a text, an image prompt or neighbours")
    batch = max(p.shape[0] for p in parts)
    parts = [p.expand(batch, -1, -1) if p.shape[0] == 1 else p for p in parts]
    if len({p.shape[0] for p in parts}) != 1:
        raise ConditioningError(f"batch sizes differ: {[p.shape[0] for p in parts]}")
    return torch.cat(parts, dim=1).contiguous()


def check_space(name, dim, embedder_name=""):
    """Refuse a CLIP space the RDM was not trained on (it takes 768-d CLIP ViT-L/14 embeddings)."""
    if int(dim) != CONTEXT_DIM:
        raise ConditioningError(
            f"{name} is {dim}-d ({embedder_name or 'unknown embedder'}); the RDM takes {CONTEXT_DIM}-d CLIP "
            "ViT-L/14 embeddings. Load ViT-L-14 weights in the open_clip Loader (ViT-L-14-openai.safetensors) and "
            "use a style database built or imported with ViT-L-14 embeddings.")
    if embedder_name and _is_other_stock_architecture(embedder_name):
        raise ConditioningError(
            f"{name} comes from open_clip {embedder_name}, whose {dim}-d space is not CLIP ViT-L/14's; the RDM "
            "was trained on ViT-L/14 (use ViT-L-14-openai.safetensors and a ViT-L-14 style database).")


def _is_other_stock_architecture(name):
    """An architecture open_clip ships (its config is bundled) other than ViT-L-14 and its variants; a user's
    own architecture (a config next to the weights) is not judged by its name."""
    if name.startswith("ViT-L-14"):
        return False
    try:
        import open_clip
    except ImportError:
        return False
    bundled = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", f"{name}.json")
    return os.path.isfile(bundled)


def pick_neighbours(neighbors, k):
    """The k best neighbour embeddings [k, 768] of an ATELIER_NEIGHBORS value (its order is best first)."""
    k = int(k)
    if k < 1:
        raise ConditioningError(f"k must be at least 1, got {k}")
    have = len(neighbors)
    if have == 0:
        why = f" ({neighbors.reason})" if getattr(neighbors, "reason", "") else ""
        raise ConditioningError(f"the retriever returned no neighbours{why}: check the style database and its "
                                "filters, or use mode 'text only'")
    if have < k:
        why = f" ({neighbors.reason})" if getattr(neighbors, "reason", "") else ""
        raise ConditioningError(f"asked for k = {k} neighbours but the retriever gave {have}{why}: lower k (here "
                                f"and in the Style Retriever) or use a larger database")
    check_space("the neighbours' embeddings", neighbors.dim, neighbors.embedder_name)
    return neighbors.embeddings[:k]


def check_same_clip(clip, neighbors):
    """The text must be embedded with the CLIP whose image embeddings the database holds."""
    db_hash = getattr(neighbors, "embedder_hash", "")
    if db_hash and db_hash != clip.weights_hash:
        raise ConditioningError(
            f"the neighbours were embedded with {neighbors.embedder_name} weights {db_hash} but the text CLIP is "
            f"{clip.name} weights {clip.weights_hash}: text and images must share one CLIP space. Load the "
            "database's CLIP weights in the open_clip Loader.")


def rdm_conditioning(clip, text="", neighbors=None, k=DEFAULT_K, mode=MODES[0], text_weight=1.0, image=None,
                     image_use=IMAGE_USES[0]):
    """The RDM Conditioning node's work: (context [1, n, 768] on the CPU, a one-line description).

    ``clip``: the ATELIER_CLIP (open_clip ViT-L/14) that embeds the text and the image prompt; ``neighbors``:
    the Style Retriever's ATELIER_NEIGHBORS; ``image``: an IMAGE batch [B, H, W, 3] in [0, 1] or None."""
    if mode not in MODES:
        raise ConditioningError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if image_use not in IMAGE_USES:
        raise ConditioningError(f"image_use must be one of {', '.join(IMAGE_USES)}, got {image_use!r}")
    check_space("the CLIP model", clip.dim, clip.name)
    tokens, desc = [], []
    wants_text = mode != "neighbours only"
    has_text = bool(text and text.strip())
    if wants_text and has_text and not (image is not None and image_use == "replace text"):
        tokens.append(clip.encode_text([text])[0].float().cpu())
        desc.append("text")
    if wants_text and image is not None:
        tokens.append(F.normalize(clip.encode_image(image.movedim(-1, 1)).float().cpu().mean(0), dim=0))
        desc.append("image prompt")
    if wants_text and not tokens:
        raise ConditioningError(f"mode '{mode}' needs a text or an image prompt")
    nn = None
    if mode != "text only":
        if neighbors is None:
            raise ConditioningError(f"mode '{mode}' needs the Style Retriever's neighbors (or use 'text only')")
        nn = pick_neighbours(neighbors, k).float().cpu()
        check_same_clip(clip, neighbors)
        desc.append(f"{len(nn)} neighbours")
    first = None
    if tokens:
        first = tokens[0][None] * 1.0
    context = knn_context(first, nn if len(tokens) < 2 else None, text_weight)
    if len(tokens) == 2:  # image beside the text: [w·text, image, neighbours...]
        extra = [F.normalize(tokens[1][None], dim=-1)[:, None, :]]
        if nn is not None:
            extra.append(F.normalize(nn, dim=-1)[None])
        context = torch.cat([context] + extra, dim=1)
    return context, f"RDM context {tuple(context.shape)}: " + " + ".join(desc)
