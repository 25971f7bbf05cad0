"""Which reader a source needs, and the import as one call (the CLI's ``import`` and the Style DB Import node)."""
from __future__ import annotations

import os

from ...common.files import file_sha256
from ...common.progress import NO_PROGRESS
from ..db import StyleDBError
from . import clip_retrieval, compvis
from .engine import embedder_entry, import_parts

FORMATS = ("auto", compvis.FORMAT_NAME, clip_retrieval.FORMAT_NAME)
DEFAULT_ARCH = "ViT-L-14"  # the CLIP of CompVis' databases and of the LAION-RDM


def detect_format(source):
    """The format of a source folder or file, from what it holds."""
    if os.path.isfile(source) and source.endswith(".npz"):
        return compvis.FORMAT_NAME
    if os.path.isdir(source):
        if clip_retrieval.is_clip_retrieval(source):
            return clip_retrieval.FORMAT_NAME
        names = os.listdir(source)
        if any(n.endswith(".npz") for n in names):
            return compvis.FORMAT_NAME
        raise StyleDBError(f"cannot tell the format of '{source}': it holds no .npz parts (CompVis) and no img_emb/ "
                           f"folder (clip-retrieval); name the format ({', '.join(FORMATS[1:])})")
    raise StyleDBError(f"import source not found: '{source}' (give a folder or file path)")


def parts_of(source, fmt="auto", style=None):
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == compvis.FORMAT_NAME:
        return fmt, compvis.compvis_parts(source, style=style)
    if fmt == clip_retrieval.FORMAT_NAME:
        return fmt, clip_retrieval.clip_retrieval_parts(source)
    raise StyleDBError(f"unknown import format {fmt!r}; one of {', '.join(FORMATS)}")


def weights_hash(weights=None):
    """The hash that binds an imported database to one open_clip weights file ('' = not bound)."""
    return file_sha256(weights)[:16] if weights else ""


def import_source(source, out, fmt="auto", arch=DEFAULT_ARCH, weights=None, index="auto", style=None,
                  progress=NO_PROGRESS, resume=True, log=print):
    """Import the embeddings of ``source`` into database directory ``out`` (no images); returns a summary.

    ``arch`` names the open_clip architecture that computed them, ``weights`` optionally the local weights file
    (its hash then binds the database to it; otherwise any ``arch`` model of the same dimension may query it)."""
    source = os.path.abspath(str(source).strip().strip('"'))
    fmt, parts = parts_of(source, fmt, style)
    if not parts:
        raise StyleDBError(f"nothing to import in '{source}'")
    embedder = embedder_entry(arch, parts[0].dim, weights_hash(weights))
    extra = {"import": {"format": fmt, "source": source, "parts": [p.name for p in parts], "images": False}}
    summary = import_parts(parts, out, embedder, index=index, progress=progress, resume=resume, log=log,
                           extra=extra)
    summary["format"] = fmt
    return summary
