"""Turning neighbours into things a graph can use: preview images, a report, a style prompt, unCLIP embeddings."""
from __future__ import annotations

import collections
import os

import numpy as np
import torch

# SD 2.1 unCLIP checkpoints and the open_clip image tower each was trained with (embedding dim → architecture)
UNCLIP_EMBEDDERS = {1024: ("ViT-H-14", "sd21-unclip-h"), 768: ("ViT-L-14", "sd21-unclip-l")}


def letterbox(img, size, fill=(0.5, 0.5, 0.5)):
    """PIL image → float [size, size, 3] in [0,1]: fit inside the square (aspect kept), pad with grey."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), tuple(int(c * 255) for c in fill))
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def preview_batch(paths, size=224):
    """IMAGE batch [k, size, size, 3] of the neighbours' files; a missing/unreadable file becomes a dark tile.

    Returns (images, missing paths). An empty list gives one grey tile so previews still have something.
    """
    from PIL import Image

    tiles, missing = [], []
    for p in paths:
        if not p:  # a row without an image (imported embeddings)
            tiles.append(no_image_tile(size))
            continue
        try:
            with Image.open(p) as img:
                tiles.append(letterbox(img, size))
        except Exception:
            missing.append(p)
            tiles.append(torch.full((size, size, 3), 0.1))
    if not tiles:
        tiles.append(torch.full((size, size, 3), 0.5))
    return torch.stack(tiles), missing


def no_image_tile(size):
    """A grey tile that says "no image" (the preview of a row imported without its image)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (size, size), (96, 96, 96))
    draw = ImageDraw.Draw(canvas)
    box = draw.textbbox((0, 0), "no image")
    draw.text(((size - (box[2] - box[0])) // 2, (size - (box[3] - box[1])) // 2), "no image", fill=(235, 235, 235))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def report(neighbors, db_name="", query_desc="", missing=()):
    """Human-readable table of the neighbours (rank, score, artist, style, genre, title, year)."""
    lines = [f"style retrieval from '{db_name}' ({neighbors.embedder_name}): {len(neighbors)} neighbour(s)"
             + (f" for {query_desc}" if query_desc else "")]
    if neighbors.reason:
        lines.append(f"note: {neighbors.reason}")
    for i, (s, m) in enumerate(zip(neighbors.scores, neighbors.metadata), 1):
        lines.append(f"{i:2d}. {s:.3f}  {m.get('artist') or '?'} | {m.get('style') or '?'} | "
                     f"{m.get('genre') or '-'} | {m.get('title') or os.path.basename(m.get('path', ''))}"
                     f"{' (' + str(m['year']) + ')' if m.get('year') else ''}{'' if m.get('path') else ' [no image]'}")
    if missing:
        lines.append(f"{len(missing)} image file(s) not found for the preview (moved since the build?), e.g. "
                     f"{missing[0]}")
    return "\n".join(lines)


def style_prompt(text, neighbors, max_artists=3, max_styles=2):
    """The user's text plus the neighbours' most frequent artists and styles, for plain text-to-image models."""
    def top(key, n):
        counts = collections.Counter(m.get(key) for m in neighbors.metadata if m.get(key))
        return [v for v, _ in counts.most_common(n)]

    artists, styles = top("artist", max_artists), top("style", max_styles)
    parts = [text.strip()] if text and text.strip() else []
    if artists:
        parts.append("painting by " + ", ".join(artists))
    if styles:
        parts.append(", ".join(styles))
    return ", ".join(parts)


def unclip_embeddings(neighbors, combine="average", top_n=0, expected_dim=None):
    """Raw CLIP image embeddings for unCLIP conditioning: [1, dim] (averages) or [n, dim] (each).

    The unCLIP noise augmentor standardises with the CLIP embedding statistics it was trained on, so the
    neighbours' original magnitudes are restored (``Neighbors.norms``) before combining.
    """
    if len(neighbors) == 0:
        raise ValueError("no neighbours to condition on" + (f": {neighbors.reason}" if neighbors.reason else ""))
    check_unclip_dim(neighbors, expected_dim)
    n = len(neighbors) if top_n <= 0 else min(top_n, len(neighbors))
    raw = neighbors.raw_embeddings()[:n].float()
    if combine == "average":
        return raw.mean(0, keepdim=True)
    if combine == "score-weighted average":
        w = torch.tensor(neighbors.scores[:n], dtype=torch.float32).clamp_min(0)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full((n,), 1.0 / n)
        return (raw * w[:, None]).sum(0, keepdim=True)
    if combine == "each":
        return raw
    raise ValueError(f"unknown combine mode {combine!r}")


NOT_UNCLIP = ("Neighbours → unCLIP: the MODEL is not an unCLIP model (no CLIP-embedding noise augmentor). Load an "
              "SD 2.1 unCLIP checkpoint such as sd21-unclip-h.safetensors, or use the retriever's style_prompt with "
              "an ordinary model.")


def unclip_conditioning(neighbors, strength, noise_augmentation, combine="average", top_n=0, model=None,
                        embedding_dim=None, make_output=None):
    """The Neighbours → unCLIP node's work: the values to append to a CONDITIONING, ``{"unclip_conditioning":
    [entry]}`` (the entry core unCLIPConditioning adds for a CLIP Vision output, ``strength`` split evenly over
    the embeddings), or None when ``strength`` is 0 (the conditioning stays as it is).

    ``model``: an optional MODEL to check the neighbours against; ``embedding_dim(model)`` is the size of the
    CLIP image embedding it takes, None when it is not an unCLIP model. ``make_output(embeds)`` wraps the
    embeddings as a CLIP_VISION_OUTPUT (a plain dict when not given).
    """
    expected = None
    if model is not None:
        expected = embedding_dim(model)
        if expected is None:
            raise ValueError(NOT_UNCLIP)
    try:
        embeds = unclip_embeddings(neighbors, combine, top_n, expected)
    except ValueError as e:
        raise ValueError(f"Neighbours → unCLIP: {e}") from e
    if strength == 0:
        return None
    output = make_output(embeds) if make_output is not None else {"image_embeds": embeds}
    entry = {"clip_vision_output": output, "strength": strength / embeds.shape[0],
             "noise_augmentation": noise_augmentation}
    return {"unclip_conditioning": [entry]}


def check_unclip_dim(neighbors, expected_dim):
    """Clear error when the neighbours' CLIP space cannot be the one the unCLIP model was trained on."""
    if expected_dim is None:
        return
    expected_arch, ckpt = UNCLIP_EMBEDDERS.get(int(expected_dim), (None, None))
    if neighbors.dim != int(expected_dim):
        hint = (f" ({ckpt} was trained with open_clip {expected_arch} image embeddings: build the style database "
                f"with {expected_arch} weights)") if expected_arch else ""
        raise ValueError(f"the unCLIP model expects {expected_dim}-d CLIP image embeddings but the neighbours are "
                         f"{neighbors.dim}-d ({neighbors.embedder_name}){hint}")
    if expected_arch and neighbors.embedder_name != expected_arch and _is_stock_architecture(neighbors.embedder_name):
        raise ValueError(f"the unCLIP model ({ckpt}) was trained with open_clip {expected_arch} image embeddings; "
                         f"the neighbours come from {neighbors.embedder_name}, whose embedding space differs even "
                         f"though the dimension ({expected_dim}) matches. Use a {expected_arch} style database.")


def _is_stock_architecture(name):
    try:
        import open_clip

        return name in open_clip.list_models() and not name.startswith("Atelier-")
    except ImportError:
        return False
