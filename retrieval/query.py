"""The Style Retriever's work: a text and/or image query embedded with the database's CLIP, metadata filters,
the k-nearest search, and what the node shows (preview batch, report, style prompt)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .db import DEFAULT_K, Filters
from .present import preview_batch, report, style_prompt


class Retrieval(NamedTuple):
    """The retriever's outputs, in the node's order."""

    images: torch.Tensor  # IMAGE [k, size, size, 3] of the neighbours' files
    neighbors: object  # retrieval.neighbors.Neighbors
    report: str
    style_prompt: str


def query_embedding(clip, text="", image=None, image_weight=0.5):
    """(L2-normalised query [dim] float32 on the CPU, description for the report).

    Text and image: ``normalize((1 - w)·text + w·image)`` with the image batch's mean embedding (normalised);
    an image with ``w`` = 0 is ignored; an image alone counts fully.
    """
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
    return torch.nn.functional.normalize(q, dim=0), " + ".join(desc)


def _year(v):
    return None if v is None or int(v) <= 0 else int(v)


def node_filters(artist="", style="", genre="", year_min=0, year_max=0):
    """Filters from the node's widgets: blanks stripped, a year of 0 means no limit."""
    return Filters(artist.strip(), style.strip(), genre.strip(), _year(year_min), _year(year_max))


def search_device(clip):
    """Where to run the exact search: the CLIP's CUDA device when it has one (the embeddings are kept there),
    else None (numpy on the CPU)."""
    return clip.device if getattr(clip.device, "type", "cpu") == "cuda" else None


def retrieve(style_db, clip, text="", k=DEFAULT_K, image_weight=0.5, artist="", style="", genre="", year_min=0,
             year_max=0, preview_size=224, image=None):
    """The k neighbours of the query in ``style_db`` with the node's outputs (see :class:`Retrieval`)."""
    style_db.check_embedder(clip)
    q, desc = query_embedding(clip, text, image, image_weight)
    filters = node_filters(artist, style, genre, year_min, year_max)
    neighbors = style_db.neighbors(q.numpy(), k, filters, device=search_device(clip))
    images, missing = preview_batch([m["path"] for m in neighbors.metadata], preview_size)
    text_report = report(neighbors, style_db.name, desc, missing)
    if filters.active():
        text_report += f"\nfilters: {filters.describe()}"
    return Retrieval(images, neighbors, text_report, style_prompt(text, neighbors))
