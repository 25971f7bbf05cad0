"""clip-retrieval / img2dataset embedding folders: ``img_emb/img_emb_<i>.npy`` with ``metadata/metadata_<i>.parquet``.

clip-retrieval's inference writes, per part i, the image embeddings as a float16/float32 ``.npy`` [n, dim] and a
parquet table of n rows (``image_path`` or ``url``, ``caption`` and whatever columns img2dataset kept), rows in
the same order. LAION's precomputed ViT-L/14 and ViT-H/14 embeddings use this layout. Each part pair is one
:class:`Part`; every column is kept as metadata (``url`` and ``caption`` included), and a part whose table has a
different row count than its embeddings is refused before anything is written.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..db import StyleDBError
from .engine import Part

FORMAT_NAME = "clip-retrieval"
EMB_DIR, META_DIR = "img_emb", "metadata"


def _index(name):
    m = re.search(r"_(\d+)\.[a-z]+$", name)
    return int(m.group(1)) if m else None


def is_clip_retrieval(source):
    return os.path.isdir(os.path.join(source, EMB_DIR))


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StyleDBError("reading clip-retrieval metadata needs pyarrow: pip install pyarrow") from None
    return pq


def _row(table_row):
    out = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in table_row.items()}
    out.setdefault("title", out.get("caption") or "")
    out["path"] = ""
    return out


def _reader(emb_path, meta_path):
    def read():
        emb = np.load(emb_path, mmap_mode="r")
        if meta_path:
            table = _parquet().read_table(meta_path).to_pylist()
            if len(table) != len(emb):
                raise StyleDBError(f"{os.path.basename(meta_path)} has {len(table)} rows but "
                                   f"{os.path.basename(emb_path)} has {len(emb)} embeddings: the metadata and "
                                   "embedding parts do not match")
            rows = [_row(r) for r in table]
        else:
            rows = [{"path": "", "title": ""} for _ in range(len(emb))]
        return np.asarray(emb, dtype=np.float32), rows
    return read


def clip_retrieval_parts(source):
    """The :class:`Part` list of a clip-retrieval embedding folder, headers and row counts checked."""
    emb_dir, meta_dir = os.path.join(source, EMB_DIR), os.path.join(source, META_DIR)
    embs = {_index(f): f for f in os.listdir(emb_dir) if f.endswith(".npy") and _index(f) is not None}
    if not embs:
        raise StyleDBError(f"no img_emb_<i>.npy parts in '{emb_dir}'")
    metas = {}
    if os.path.isdir(meta_dir):
        metas = {_index(f): f for f in os.listdir(meta_dir) if f.endswith(".parquet") and _index(f) is not None}
    parts = []
    for i in sorted(embs):
        path = os.path.join(emb_dir, embs[i])
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise StyleDBError(f"{embs[i]}: {arr.dtype} {arr.shape}; expected float [n, dim]")
        meta = os.path.join(meta_dir, metas[i]) if i in metas else None
        if metas and meta is None:
            raise StyleDBError(f"{embs[i]} has no metadata_{i}.parquet beside the other metadata parts")
        if meta:
            n_meta = _parquet().ParquetFile(meta).metadata.num_rows
            if n_meta != arr.shape[0]:
                raise StyleDBError(f"{metas[i]} has {n_meta} rows but {embs[i]} has {arr.shape[0]} embeddings: the "
                                   "metadata and embedding parts do not match")
        st = os.stat(path)
        parts.append(Part(embs[i], int(arr.shape[0]), int(arr.shape[1]), _reader(path, meta),
                          f"{st.st_size}:{st.st_mtime_ns}"))
    return parts
