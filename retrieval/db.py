"""The style database on disk and its search.

A database is a directory::

    manifest.json    format + version, embedder {name, weights_hash, dim}, count, index {kind, ...}, skipped files
    embeddings.npy   float16 [count, dim], L2-normalised rows (np.load(mmap_mode="r"))
    norms.npy        float32 [count], each embedding's length before normalisation (raw = row * norm)
    metadata.jsonl   one JSON object per row: path, artist, style, genre, title, year, sha256
    index.faiss      optional FAISS IVF index (large databases)

Rows are sorted by ``path`` (relative to the source folder) with one row per content hash, so a database
does not depend on how it was built (in one go, resumed, sharded and merged, or updated).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..common.files import atomic_folder

FORMAT = "atelier-style-db"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
NORMS = "norms.npy"
METADATA = "metadata.jsonl"
FAISS_INDEX = "index.faiss"
DEFAULT_K = 19  # the paper's number of neighbours at inference
# Above this many rows a FAISS IVF index is built ("auto"): exact float32 search over 250k x 768 is ~200 MB
# of scratch and ~20 ms per query on 2 CPU cores; above it IVF keeps queries in the low milliseconds.
IVF_THRESHOLD = 250_000
RECALL_FLOOR = 0.95  # nprobe is raised until the measured recall@k against exact search reaches this
META_FIELDS = ("path", "artist", "style", "genre", "title", "year", "sha256")


class StyleDBError(ValueError):
    """A database that cannot be read or used as asked; the message says what to do."""


def _norm_text(s):
    return " ".join(str(s or "").lower().replace("_", " ").replace("-", " ").split())


@dataclass
class Filters:
    """Metadata filters: case-insensitive substring matches (hyphens/underscores = spaces) and a year range."""

    artist: str = ""
    style: str = ""
    genre: str = ""
    year_min: Optional[int] = None
    year_max: Optional[int] = None

    def active(self):
        return bool(self.artist or self.style or self.genre or self.year_min is not None
                    or self.year_max is not None)

    def describe(self):
        parts = [f"{k}~'{v}'" for k, v in (("artist", self.artist), ("style", self.style), ("genre", self.genre)) if v]
        if self.year_min is not None or self.year_max is not None:
            parts.append(f"year in [{self.year_min if self.year_min is not None else '-inf'}, "
                         f"{self.year_max if self.year_max is not None else 'inf'}]")
        return ", ".join(parts) or "none"


@dataclass
class SearchResult:
    indices: np.ndarray  # [q, k'] int64 rows
    scores: np.ndarray  # [q, k'] float32 cosine
    reason: str = ""
    info: dict = field(default_factory=dict)


class StyleDB:
    """A loaded style database: memory-mapped embeddings, metadata rows, optional FAISS index."""

    def __init__(self, path, manifest, embeddings, norms, metadata, index=None):
        self.path = str(path)
        self.manifest = manifest
        self.embeddings = embeddings
        self.norms = norms
        self.metadata = metadata
        self.index = index
        self._dense = None
        self._torch = None
        self._columns = None

    # -- identity ----------------------------------------------------------------------------------------------
    @property
    def count(self):
        return int(self.manifest["count"])

    @property
    def dim(self):
        return int(self.manifest["embedder"]["dim"])

    @property
    def embedder_name(self):
        return self.manifest["embedder"]["name"]

    @property
    def embedder_hash(self):
        return self.manifest["embedder"]["weights_hash"]

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    def __len__(self):
        return self.count

    def __repr__(self):
        return f"StyleDB({self.name}: {self.count} images, {self.embedder_name}/{self.embedder_hash}, dim {self.dim})"

    def check_embedder(self, embedder):
        """Refuse an embedder other than the one that built the database (cosines would be meaningless). An
        imported database not bound to a weights file (empty hash) takes any model of its architecture and dim."""
        if not self.embedder_hash and embedder.dim == self.dim and embedder.name == self.embedder_name:
            return
        if embedder.dim != self.dim or embedder.name != self.embedder_name or embedder.weights_hash != self.embedder_hash:
            raise StyleDBError(
                f"style database '{self.name}' was built with open_clip {self.embedder_name} (weights "
                f"{self.embedder_hash}, dim {self.dim}) but the loaded CLIP is {embedder.name} (weights "
                f"{embedder.weights_hash}, dim {embedder.dim}). Load the same open_clip weights, or rebuild the "
                "database with this one.")

    def source_root(self):
        return self.manifest.get("source_root") or ""

    def image_path(self, row):
        """Absolute path of a row's image (paths are stored relative to the source folder); "" for a row without
        an image (imported embeddings)."""
        p = self.metadata[row].get("path") or ""
        return p if not p or os.path.isabs(p) else os.path.join(self.source_root(), p)

    def info_text(self):
        m = self.manifest
        idx = m.get("index", {})
        lines = [f"style database {self.name}: {self.count} images, format v{m['format_version']}",
                 f"embedder: open_clip {self.embedder_name}, weights {self.embedder_hash}, dim {self.dim}",
                 f"index: {idx.get('kind', 'exact')}" + (
                     f" (nlist {idx.get('nlist')}, nprobe {idx.get('nprobe')}, recall@{idx.get('recall_k')} vs "
                     f"exact {idx.get('recall'):.3f})" if idx.get("kind") == "ivf" else ""),
                 self._size_line(),
                 self._source_line(),
                 f"skipped files: {len(m.get('skipped', []))}, duplicates: {len(m.get('duplicates', []))}"]
        cols = self.columns()
        for key in ("style", "artist", "genre"):
            vals = [v for v in set(cols[key]) if v]
            if vals:
                lines.append(f"{key}s ({len(vals)}): {', '.join(sorted(vals)[:12])}{' ...' if len(vals) > 12 else ''}")
        return "\n".join(lines)

    def _size_line(self):
        """Disk size of the rows and the index, and what a query keeps in memory."""
        def size(name):
            p = os.path.join(self.path, name)
            return os.path.getsize(p) if os.path.isfile(p) else 0

        mb = 2 ** 20
        rows, index = size(EMBEDDINGS) + size(NORMS), size(FAISS_INDEX)
        ram = index if self.index is not None else self.count * self.dim * 4
        return (f"size: {self.count} rows x {self.dim}, float16 rows {rows / mb:.1f} MB on disk (memory-mapped), "
                f"metadata {size(METADATA) / mb:.1f} MB, index {index / mb:.1f} MB; search memory about "
                f"{ram / mb:.1f} MB ({'the index' if self.index is not None else 'a float32 copy for exact search'})")

    def _source_line(self):
        imp = self.manifest.get("import")
        if imp:
            return (f"imported from {imp.get('format')} ({len(imp.get('parts', []))} part(s)), without images: "
                    "previews say 'no image'" + ("" if self.embedder_hash else
                                                 f"; any open_clip {self.embedder_name} model may query it"))
        return f"source: {self.source_root()}"

    # -- filters -----------------------------------------------------------------------------------------------
    def columns(self):
        if self._columns is None:
            cols = {k: np.array([_norm_text(r.get(k)) for r in self.metadata], dtype=object)
                    for k in ("artist", "style", "genre")}
            cols["year"] = np.array([int(r["year"]) if str(r.get("year") or "").lstrip("-").isdigit() else -10**9
                                     for r in self.metadata], dtype=np.int64)
            self._columns = cols
        return self._columns

    def filter_mask(self, filters):
        """Boolean mask of rows matching every active filter (None when no filter is active)."""
        if filters is None or not filters.active():
            return None
        cols = self.columns()
        mask = np.ones(self.count, dtype=bool)
        for key in ("artist", "style", "genre"):
            want = _norm_text(getattr(filters, key))
            if want:
                mask &= np.fromiter((want in v for v in cols[key]), dtype=bool, count=self.count)
        if filters.year_min is not None or filters.year_max is not None:
            years = cols["year"]
            known = years > -10**9
            mask &= known
            if filters.year_min is not None:
                mask &= years >= int(filters.year_min)
            if filters.year_max is not None:
                mask &= years <= int(filters.year_max)
        return mask

    # -- search ------------------------------------------------------------------------------------------------
    def dense(self):
        """float32 copy of the embeddings (cached) for exact search; IVF databases avoid it."""
        if self._dense is None:
            self._dense = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        return self._dense

    def search(self, queries, k=DEFAULT_K, filters=None, exact=None, device=None):
        """Top-k rows by cosine for L2-normalised queries [q, dim] (or [dim]).

        Exact matrix product by default (numpy; torch on ``device`` when one is given, e.g. the CLIP's CUDA
        device: the float16 embeddings are kept there); the FAISS IVF index when the database has one and
        ``exact`` is not True. Filters restrict the candidates; a filter matching nothing gives an empty
        result with a reason.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise StyleDBError(f"query has dim {q.shape[1]} but database '{self.name}' has dim {self.dim}")
        k = int(k)
        if k < 1:
            raise StyleDBError(f"k must be at least 1, got {k}")
        reasons = []
        mask = self.filter_mask(filters)
        n_cand = self.count if mask is None else int(mask.sum())
        if n_cand == 0:
            why = (f"no image in '{self.name}' matches the filters ({filters.describe()})" if mask is not None
                   else f"database '{self.name}' is empty")
            return SearchResult(np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32), why)
        if k > n_cand:
            reasons.append(f"asked for {k} neighbours but only {n_cand} image(s)"
                           + (" match the filters" if mask is not None else " are in the database"))
            k = n_cand
        use_ivf = self.index is not None and exact is not True
        if use_ivf and (mask is None or n_cand > IVF_THRESHOLD):
            idx, sc = self._search_faiss(q, k, mask)
            method = "faiss-ivf"
        else:
            rows = None if mask is None else np.flatnonzero(mask)
            if device is not None:
                idx, sc = self._search_torch(q, k, rows, device)
                method = f"exact-torch-{device}"
            else:
                idx, sc = self._search_exact(q, k, rows)
                method = "exact"
        return SearchResult(idx, sc, "; ".join(reasons), {"method": method, "candidates": n_cand})

    def _search_exact(self, q, k, rows=None):
        base = self.dense() if rows is None else np.asarray(self.embeddings[rows], dtype=np.float32)
        scores = q @ base.T
        return topk(scores, k, rows)

    def _search_torch(self, q, k, rows, device):
        import torch

        device = torch.device(device)
        if self._torch is None or self._torch[0] != device:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            self._torch = (device, torch.from_numpy(np.array(self.embeddings)).to(device, dtype))
        base = self._torch[1]
        if rows is not None:
            base = base[torch.from_numpy(rows).to(device)]
        scores = torch.from_numpy(q).to(device, base.dtype) @ base.T
        sc, idx = torch.topk(scores.float(), k, dim=1)
        idx = idx.cpu().numpy().astype(np.int64)
        return (idx if rows is None else rows[idx]), sc.cpu().numpy().astype(np.float32)

    def _search_faiss(self, q, k, mask):
        import faiss

        info = self.manifest["index"]
        nprobe = int(info.get("nprobe", 16))
        if mask is not None:
            # a filter leaves fewer candidates per list: probe proportionally more lists to keep recall
            nprobe = min(int(info.get("nlist", nprobe)), math.ceil(nprobe * self.count / max(1, int(mask.sum()))))
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if mask is not None:
            sel = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
            params.sel = sel
        scores, idx = self.index.search(np.ascontiguousarray(q), k, params=params)
        return idx.astype(np.int64), scores.astype(np.float32)

    def neighbors(self, query, k=DEFAULT_K, filters=None, device=None):
        """Search one query and wrap the result as ``Neighbors`` (the ATELIER_NEIGHBORS type)."""
        import torch

        from .neighbors import Neighbors

        res = self.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k, filters, device=device)
        rows = res.indices[0].tolist()
        emb = torch.from_numpy(np.asarray(self.embeddings[rows], dtype=np.float32).reshape(len(rows), self.dim))
        emb = torch.nn.functional.normalize(emb, dim=-1) if rows else emb
        meta = []
        for r in rows:
            m = {key: self.metadata[r].get(key, "") for key in ("artist", "style", "genre", "title", "year")}
            m["path"] = self.image_path(r)
            meta.append(m)
        norms = [float(self.norms[r]) for r in rows] if self.norms is not None else None
        return Neighbors(emb, [float(s) for s in res.scores[0]], meta, self.embedder_name, self.embedder_hash,
                         norms=norms, reason=res.reason, extra={"rows": rows, **res.info})


def topk(scores, k, rows=None):
    """Row-wise top-k of a [q, n] score matrix, sorted best first; ties break on the lower index."""
    n = scores.shape[1]
    k = min(k, n)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(n), (scores.shape[0], 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    sc = np.take_along_axis(part_scores, order, axis=1)
    if rows is not None:
        idx = rows[idx]
    return idx.astype(np.int64), sc.astype(np.float32)


# -- reading and writing ---------------------------------------------------------------------------------------
def read_manifest(path):
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise StyleDBError(f"'{path}' is not a style database: it has no {MANIFEST}. Build one with the Style DB "
                           "Build node or `python -m retrieval build`.")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise StyleDBError(f"'{path}': {MANIFEST} is not an Atelier style database manifest "
                           f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StyleDBError(f"style database '{path}' has format version {version!r}; this Atelier reads version "
                           f"{FORMAT_VERSION} only. Rebuild the database with this version "
                           "(`python -m retrieval build ...`) or update Atelier.")
    return manifest


def load_db(path, mmap=True, load_index=True):
    """Open a database directory (embeddings memory-mapped); refuses unknown format versions."""
    manifest = read_manifest(path)
    emb = np.load(os.path.join(path, EMBEDDINGS), mmap_mode="r" if mmap else None)
    if emb.dtype != np.float16 or emb.ndim != 2 or emb.shape != (manifest["count"], manifest["embedder"]["dim"]):
        raise StyleDBError(f"style database '{path}': {EMBEDDINGS} has shape {emb.shape} {emb.dtype}, manifest says "
                           f"({manifest['count']}, {manifest['embedder']['dim']}) float16; the database is damaged, "
                           "rebuild it")
    npath = os.path.join(path, NORMS)
    norms = np.load(npath) if os.path.isfile(npath) else None
    metadata = []
    with open(os.path.join(path, METADATA), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                metadata.append(json.loads(line))
    if len(metadata) != manifest["count"]:
        raise StyleDBError(f"style database '{path}': {len(metadata)} metadata rows for {manifest['count']} "
                           "embeddings; the database is damaged, rebuild it")
    index = None
    if load_index and manifest.get("index", {}).get("kind") == "ivf":
        import faiss

        index = faiss.read_index(os.path.join(path, FAISS_INDEX))
    return StyleDB(path, manifest, emb, norms, metadata, index)


def write_db(path, embeddings, norms, metadata, embedder_info, source_root="", skipped=(), duplicates=(),
             index="auto", extra=None, nprobe=None):
    """Write a database directory atomically: everything goes to a temp sibling, then one rename.

    float32 ``embeddings`` are normalised and stored float16; float16 ones are stored as given. Rows must
    already be in their final order.
    ``index``: 'auto' (IVF above IVF_THRESHOLD rows), 'exact' or 'ivf'.
    """
    path = os.path.abspath(path)
    count = len(metadata)
    dim = int(embedder_info["dim"])
    if embeddings.shape != (count, dim):
        raise StyleDBError(f"cannot write database: {embeddings.shape} embeddings for {count} rows of dim {dim}")
    if embeddings.dtype == np.float16:
        emb16 = np.ascontiguousarray(embeddings)  # already the stored form: re-normalising would shift bits
    else:
        e32 = np.asarray(embeddings, dtype=np.float32)
        emb16 = (e32 / np.maximum(np.linalg.norm(e32, axis=1, keepdims=True), 1e-12)).astype(np.float16)
    with atomic_folder(path) as tmp:
        np.save(os.path.join(tmp, EMBEDDINGS), emb16)
        np.save(os.path.join(tmp, NORMS), np.asarray(norms, dtype=np.float32).reshape(count))
        with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
            for row in metadata:
                f.write(json.dumps(stored_row(row), ensure_ascii=False) + "\n")
        finish_db(tmp, count, embedder_info, source_root=source_root, skipped=skipped, duplicates=duplicates,
                  index=index, extra=extra, nprobe=nprobe)
    return path


def stored_row(row):
    """A metadata row as stored: the standard fields first (blank when absent), then any others the row has
    (imports keep their source's columns: img_id, url, caption, ...)."""
    return {**{k: row.get(k, "") for k in META_FIELDS}, **{k: v for k, v in row.items() if k not in META_FIELDS}}


def finish_db(tmp, count, embedder_info, source_root="", skipped=(), duplicates=(), index="auto", extra=None,
              nprobe=None, index_options=None, log=None):
    """Build the index of the database folder ``tmp`` (whose embeddings, norms and metadata are written) and
    write its manifest; the caller renames the folder into place."""
    dim = int(embedder_info["dim"])
    kind = index
    if kind == "auto":
        kind = "ivf" if count > IVF_THRESHOLD else "exact"
    index_info = {"kind": "exact"}
    if kind == "ivf" and count:
        emb16 = np.load(os.path.join(tmp, EMBEDDINGS), mmap_mode="r")
        index_info = build_ivf(emb16, os.path.join(tmp, FAISS_INDEX), nprobe=nprobe)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "embedder": {"name": embedder_info["name"], "weights_hash": embedder_info["weights_hash"], "dim": dim},
        "count": count,
        "index": index_info,
        "files": {"embeddings": EMBEDDINGS, "norms": NORMS, "metadata": METADATA,
                  **({"index": FAISS_INDEX} if index_info["kind"] == "ivf" else {})},
        "source_root": source_root,
        "skipped": list(skipped),
        "duplicates": list(duplicates),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    return manifest


IVF_TRAIN_PER_LIST = 64  # k-means sample per list: FAISS wants >= 39; more costs minutes at 1M on 2 cores


def ivf_nlist(count):
    """About 2·sqrt(N) lists (2000 at 1M: ~500 vectors per list), with >= 39 training vectors per list."""
    return max(1, min(int(2 * math.sqrt(count)), count // 39))


def build_ivf(emb16, out_path, nprobe=None, k=DEFAULT_K, n_queries=200, seed=0):
    """Train an IVF (inner product, fp16 scalar-quantised vectors) index and measure its recall@k.

    The queries are database vectors with noise (so they are not trivially themselves); nprobe doubles until
    recall@k against exact search reaches RECALL_FLOOR (or all lists are probed).
    """
    import faiss

    x = np.ascontiguousarray(emb16, dtype=np.float32)
    n, d = x.shape
    nlist = ivf_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    cap = IVF_TRAIN_PER_LIST * nlist
    train = x if n <= cap else x[np.sort(rng.choice(n, cap, replace=False))]
    index.train(train)
    index.add(x)
    recall, nprobe_used = measure_recall(index, x, nprobe=nprobe, k=k, n_queries=n_queries, seed=seed)
    index.nprobe = nprobe_used
    faiss.write_index(index, out_path)
    return {"kind": "ivf", "factory": f"IVF{nlist},SQfp16", "metric": "inner_product", "nlist": nlist,
            "nprobe": nprobe_used, "recall": recall, "recall_k": k, "recall_queries": min(n_queries, n),
            "recall_floor": RECALL_FLOOR}


def measure_recall(index, x, nprobe=None, k=DEFAULT_K, n_queries=200, seed=0):
    """recall@k of an IVF index against exact search on noisy database vectors; picks nprobe if not given."""

    rng = np.random.default_rng(seed + 1)
    n, d = x.shape
    k = min(k, n)
    q = x[rng.choice(n, min(n_queries, n), replace=False)] + rng.normal(0, 0.3 / math.sqrt(d), (min(n_queries, n), d))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    truth = exact_topk_chunked(q, x, k)
    candidates = [nprobe] if nprobe else [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p < index.nlist]
    candidates = candidates + [index.nlist] if not nprobe else candidates
    recall = 0.0
    for p in candidates:
        index.nprobe = int(p)
        _, got = index.search(q, k)
        recall = float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)]))
        if recall >= RECALL_FLOOR:
            return recall, int(p)
    return recall, int(candidates[-1])


def exact_topk_chunked(q, x, k, chunk=131072):
    """Exact top-k indices of q against x, scanning x in chunks (bounded scratch memory)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start:start + chunk], dtype=np.float32)
        s = q @ block.T
        i, sc = topk(s, k)
        best_s = np.concatenate([best_s, sc], axis=1)
        best_i = np.concatenate([best_i, i + start], axis=1)
        j, s2 = topk(best_s, k)
        best_i = np.take_along_axis(best_i, j, axis=1)
        best_s = s2
    return best_i
