"""The streaming import engine: parts of precomputed embeddings (and their metadata rows) into one database.

A reader describes its source as a list of :class:`Part` (a name, a row count and dimension read from the
file header, a ``read()`` that loads that part alone). The engine checks every header first (dimension,
counts) so a bad part stops the import before anything is written, then copies the parts in order into a
preallocated float16 ``embeddings.npy`` in ``<out>.partial/`` (rows L2-normalised, their lengths kept in
``norms.npy``), one part in memory at a time, recording each finished part; an interrupted import resumes at
the first unfinished part when it is run again with the same parts and settings. The finished folder
replaces ``out`` in one rename (``common.files.atomic_folder``): until then the previous database is untouched.
Rows keep the source's order (no sorting, no de-duplication: an imported row is identified by its position
and its metadata).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...common.files import atomic_folder, atomic_write
from ...common.progress import NO_PROGRESS
from ..build import normalise16
from ..db import EMBEDDINGS, METADATA, NORMS, StyleDBError, finish_db

PLAN = "plan.json"
DONE = "done.json"
ENGINE_VERSION = 1


@dataclass
class Part:
    """One file (or file pair) of a source: ``read()`` returns (embeddings [count, dim], metadata rows)."""

    name: str
    count: int
    dim: int
    read: Callable
    signature: str = ""  # size and mtime of its files: a changed part restarts the import


def embedder_entry(name, dim, weights_hash=""):
    """The manifest's embedder of imported embeddings. An empty ``weights_hash`` means the weights file is not
    known (any open_clip model of this architecture and dimension may query it)."""
    return {"name": name, "weights_hash": weights_hash or "", "dim": int(dim)}


def check_parts(parts, dim):
    """Every part must have the embedder's dimension and at least one row; an empty source is refused."""
    if not parts:
        raise StyleDBError("nothing to import: the source has no parts")
    for p in parts:
        if p.dim != dim:
            raise StyleDBError(f"part {p.name} holds {p.dim}-d embeddings but the import is for {dim}-d "
                               f"({'the first part' if p is not parts[0] else 'its embedder'}); every part must come "
                               "from the same CLIP model")
    total = sum(p.count for p in parts)
    if total == 0:
        raise StyleDBError(f"nothing to import: the {len(parts)} part(s) hold no rows")
    return total


def _plan_digest(parts, settings):
    h = hashlib.sha256(json.dumps({"v": ENGINE_VERSION, **settings}, sort_keys=True).encode())
    for p in parts:
        h.update(f"{p.name}\0{p.count}\0{p.dim}\0{p.signature}\n".encode())
    return h.hexdigest()


def _open_partial(partial, digest, total, dim, resume, log):
    """(done part names, embeddings memmap, norms memmap) of the partial import, fresh unless resumable."""
    plan_path = os.path.join(partial, PLAN)
    same = False
    if os.path.isdir(partial):
        try:
            with open(plan_path, encoding="utf-8") as f:
                same = json.load(f).get("digest") == digest
        except (OSError, ValueError):
            same = False
        if not (resume and same):
            log(f"discarding the previous partial import in {partial}"
                + ("" if resume else " (resume off)") + ("" if same else " (different parts or settings)"))
            shutil.rmtree(partial)
            same = False
    os.makedirs(partial, exist_ok=True)
    emb_path, norms_path = os.path.join(partial, EMBEDDINGS), os.path.join(partial, NORMS)
    done = []
    if same and os.path.isfile(emb_path) and os.path.isfile(norms_path):
        with open(os.path.join(partial, DONE), encoding="utf-8") as f:
            done = json.load(f)
        emb = np.load(emb_path, mmap_mode="r+")
        norms = np.load(norms_path, mmap_mode="r+")
    else:
        atomic_write(plan_path, json.dumps({"digest": digest, "rows": total, "dim": dim}))
        emb = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float16, shape=(total, dim))
        norms = np.lib.format.open_memmap(norms_path, mode="w+", dtype=np.float32, shape=(total,))
        atomic_write(os.path.join(partial, DONE), "[]")
    return done, emb, norms


def _copy_part(part, emb, norms, start, partial, index):
    raw, rows = part.read()
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape != (part.count, part.dim):
        raise StyleDBError(f"part {part.name}: its header said ({part.count}, {part.dim}) but it holds "
                           f"{tuple(raw.shape)}; the file is damaged")
    if len(rows) != part.count:
        raise StyleDBError(f"part {part.name}: {len(rows)} metadata rows for {part.count} embeddings; each "
                           "embedding needs exactly one metadata row")
    if not np.isfinite(raw).all():
        raise StyleDBError(f"part {part.name} holds NaN or infinite values; the file is damaged")
    e16, lengths = normalise16(raw)
    emb[start:start + part.count] = e16
    norms[start:start + part.count] = lengths
    atomic_write(os.path.join(partial, f"meta_{index:06d}.jsonl"),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def import_parts(parts, out, embedder, source="", index="auto", progress=NO_PROGRESS, resume=True, log=print,
                 extra=None, index_options=None):
    """Import ``parts`` into database directory ``out``; returns a summary dict.

    ``embedder``: :func:`embedder_entry`. ``progress`` counts rows copied (``check_interrupt()`` between parts:
    an interrupt keeps the finished parts for the next run). ``index`` as for ``db.write_db``; ``extra``: more
    manifest entries (e.g. ``{"import": {...}}``)."""
    progress = progress or NO_PROGRESS
    out = os.path.abspath(out)
    dim = int(embedder["dim"])
    total = check_parts(parts, dim)
    partial = out + ".partial"
    settings = {"out": out, "embedder": embedder, "index": index}
    done, emb, norms = _open_partial(partial, _plan_digest(parts, settings), total, dim, resume, log)
    resumed = len(done)
    if resumed:
        log(f"resumed: {resumed} of {len(parts)} part(s) were already imported")
    start = 0
    for i, part in enumerate(parts):
        progress.check_interrupt()
        if part.name not in done:
            _copy_part(part, emb, norms, start, partial, i)
            emb.flush()
            norms.flush()
            done.append(part.name)
            atomic_write(os.path.join(partial, DONE), json.dumps(done))
        start += part.count
        progress.update(start, total)
    del emb, norms
    with atomic_folder(out) as tmp:
        for name in (EMBEDDINGS, NORMS):
            os.replace(os.path.join(partial, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
            for i in range(len(parts)):
                with open(os.path.join(partial, f"meta_{i:06d}.jsonl"), encoding="utf-8") as src:
                    shutil.copyfileobj(src, f)
        finish_db(tmp, total, embedder, source_root=source, index=index, extra=extra,
                  index_options=index_options, log=log)
    shutil.rmtree(partial, ignore_errors=True)
    return {"path": out, "count": total, "parts": len(parts), "resumed_parts": resumed}
