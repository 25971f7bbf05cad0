"""Features of image sets, with a resumable cache keyed by file hashes.

A *feature extractor* is any object with ``key`` (a string naming the network, its weights hash and its
settings: caches are kept per key), ``dim`` and ``__call__(uint8 [B, 3, H, W]) → float32 [B, dim]``:
:class:`~atelier.metrics.inception.InceptionExtractor` for FID/KID, :class:`ClipImageFeatures` for the
style classifier.

The cache of a folder lives in ``cache_dir("metrics", "features", <key>, <folder>)``: ``files.json`` maps
each relative path to (size, mtime, sha256, error) and ``chunk-*.npz`` hold (sha256, features) rows. A file
whose size and mtime are unchanged is neither hashed nor decoded again, so a second run over the same
reference folder reads no image; new or changed files are hashed (``common.files.file_sha256``), and only
content not seen before is decoded. Extraction writes a chunk (atomically) every ``chunk_size`` images, so an
interrupted run resumes where it stopped. Unreadable files are skipped, named and remembered.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..common.files import atomic_write, cache_dir, file_sha256, locked
from ..common.progress import NO_PROGRESS
from ..retrieval.build import prefetch_map
from .images import UnreadableImage, folder_images, read_rgb8

CACHE_VERSION = 1


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def extract_arrays(extractor, arrays, batch_size=32, progress=NO_PROGRESS, done_before=0, total=None):
    """Features [n, dim] float32 of uint8 images ([H, W, 3] arrays, in order). Images of one size are batched
    together (the extractor resizes each batch itself, so no image is resampled twice)."""
    arrays = list(arrays)
    total = total if total is not None else len(arrays)
    out = np.zeros((len(arrays), extractor.dim), np.float32)
    buckets = {}
    done = done_before

    def flush(shape):
        nonlocal done
        import torch

        idx = buckets.pop(shape)
        batch = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
        out[idx] = np.asarray(extractor(batch), dtype=np.float32)
        done += len(idx)
        progress.update(done, total)
        progress.check_interrupt()

    for i, arr in enumerate(arrays):
        buckets.setdefault(arr.shape, []).append(i)
        if len(buckets[arr.shape]) >= batch_size:
            flush(arr.shape)
    for shape in list(buckets):
        flush(shape)
    return out


def extract_batch(extractor, images_uint8, batch_size=32, progress=NO_PROGRESS):
    """Features of a uint8 [B, 3, H, W] tensor (a ComfyUI batch after ``comfy_to_uint8``)."""
    n = int(images_uint8.shape[0])
    out = []
    for start in range(0, n, batch_size):
        out.append(np.asarray(extractor(images_uint8[start:start + batch_size]), dtype=np.float32))
        progress.update(min(n, start + batch_size), n)
        progress.check_interrupt()
    return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)


class FolderFeatures:
    """Features of every readable image in a folder: ``features`` [n, dim] (rows in path order), ``paths``,
    ``skipped`` [{path, reason}], and what the cache saved (``cached``, ``extracted``, ``hashed``)."""

    def __init__(self, folder, features, paths, skipped, cached, extracted, hashed):
        self.folder, self.features, self.paths, self.skipped = folder, features, paths, skipped
        self.cached, self.extracted, self.hashed = cached, extracted, hashed

    def __len__(self):
        return len(self.paths)

    def summary(self):
        return (f"{len(self.paths)} image(s) from {self.folder} ({self.cached} from the cache, {self.extracted} "
                f"extracted, {self.hashed} hashed), {len(self.skipped)} skipped")


class FeatureCache:
    """The feature cache of one folder for one extractor key (see the module docstring)."""

    def __init__(self, folder, key, root=None):
        self.folder = os.path.abspath(os.fspath(folder))
        real = os.path.realpath(self.folder)
        folder_id = f"{_safe(os.path.basename(real))}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"
        base = root or cache_dir("metrics", "features")
        self.dir = os.path.join(base, _safe(key), folder_id)
        self.key = key
        os.makedirs(self.dir, exist_ok=True)
        self.files_path = os.path.join(self.dir, "files.json")

    def read_files(self):
        try:
            with open(self.files_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        if data.get("version") != CACHE_VERSION or data.get("key") != self.key:
            return {}
        return data.get("files", {})

    def write_files(self, files):
        atomic_write(self.files_path, json.dumps({"version": CACHE_VERSION, "key": self.key, "folder": self.folder,
                                                  "files": files}))

    def chunks(self):
        return sorted(n for n in os.listdir(self.dir) if n.startswith("chunk-") and n.endswith(".npz"))

    def load_rows(self):
        """{sha256: feature row} of every stored chunk (a damaged chunk is ignored: its images are redone)."""
        rows = {}
        for name in self.chunks():
            try:
                with np.load(os.path.join(self.dir, name), allow_pickle=False) as z:
                    feats = z["features"]
                    for sha, row in zip(z["sha256"].tolist(), feats):
                        rows[sha] = row
            except (OSError, ValueError, KeyError):
                continue
        return rows

    def add_chunk(self, shas, feats):
        existing = self.chunks()
        number = 1 + max((int(n[6:-4]) for n in existing if n[6:-4].isdigit()), default=0)

        def write(tmp):
            with open(tmp, "wb") as handle:
                np.savez(handle, sha256=np.asarray(shas, dtype="U64"), features=np.asarray(feats, np.float32))

        atomic_write(os.path.join(self.dir, f"chunk-{number:05d}.npz"), write)

    def compact(self, rows):
        """Rewrite all chunks as one once a run is complete (fewer files to open next time)."""
        names = self.chunks()
        if len(names) <= 1:
            return
        shas = sorted(rows)
        self.add_chunk(shas, np.stack([rows[s] for s in shas]) if shas else np.zeros((0, 0), np.float32))
        for name in names:
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass


def folder_features(folder, extractor, batch_size=32, chunk_size=512, workers=None, progress=NO_PROGRESS,
                    cache=True, cache_root=None, log=None):
    """:class:`FolderFeatures` of ``folder`` with ``extractor``, through the folder's feature cache.

    ``progress`` counts files (hashing, then extracting the ones not cached); interrupting (the progress
    object's ``check_interrupt`` raising, or Ctrl-C) keeps every finished chunk for the next run.
    """
    folder = os.path.abspath(os.fspath(folder))
    rels = folder_images(folder)
    workers = workers or min(8, os.cpu_count() or 2)
    if not cache:
        return _extract_uncached(folder, rels, extractor, batch_size, workers, progress)
    store = FeatureCache(folder, extractor.key, cache_root)
    with locked(os.path.join(store.dir, ".lock"),
                message=f"waiting for another process extracting features of {folder} ..."):
        known = store.read_files()
        files, hashed = {}, 0
        for i, rel in enumerate(rels):
            path = os.path.join(folder, rel)
            try:
                st = os.stat(path)
            except OSError as exc:
                files[rel] = [0, 0, "", f"cannot stat: {exc}"]
                continue
            old = known.get(rel)
            if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
                files[rel] = old
            else:
                files[rel] = [st.st_size, st.st_mtime_ns, file_sha256(path), None]
                hashed += 1
            if i % 64 == 0:
                progress.check_interrupt()
        rows = store.load_rows()
        todo, seen = [], set()
        for rel in rels:
            size, mtime, sha, err = files[rel]
            if err is None and sha not in rows and sha not in seen:
                todo.append(rel)
                seen.add(sha)
        total = len(todo)
        if log and total:
            log(f"extracting features of {total} image(s) in {folder} ({len(rels) - total} cached)")
        done = 0
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for start in range(0, total, chunk_size):
                    part = todo[start:start + chunk_size]
                    decoded = list(prefetch_map(pool, lambda r: _safe_read(os.path.join(folder, r)), part,
                                                ahead=max(2 * batch_size, 4 * workers)))
                    good = [(rel, arr) for rel, (arr, err) in zip(part, decoded) if err is None]
                    for rel, (arr, err) in zip(part, decoded):
                        if err is not None:
                            files[rel][3] = err
                    feats = extract_arrays(extractor, [a for _, a in good], batch_size, progress, done, total) \
                        if good else np.zeros((0, extractor.dim), np.float32)
                    done += len(part)
                    progress.update(done, total)
                    shas = [files[rel][2] for rel, _ in good]
                    if shas:
                        store.add_chunk(shas, feats)
                        rows.update(zip(shas, feats))
                    store.write_files(files)
        finally:
            store.write_files(files)
        store.compact(rows)
    paths, feats, skipped = [], [], []
    for rel in rels:
        size, mtime, sha, err = files[rel]
        if err is not None:
            skipped.append({"path": rel, "reason": err})
        elif sha in rows:
            paths.append(rel)
            feats.append(rows[sha])
    features = np.stack(feats).astype(np.float32) if feats else np.zeros((0, extractor.dim), np.float32)
    extracted = sum(1 for rel in todo if files[rel][3] is None)
    return FolderFeatures(folder, features, paths, skipped, len(paths) - extracted, extracted, hashed)


def _safe_read(path):
    try:
        return read_rgb8(path), None
    except UnreadableImage as exc:
        return None, str(exc).split(": ", 1)[-1]


def _extract_uncached(folder, rels, extractor, batch_size, workers, progress):
    paths, arrays, skipped = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rel, (arr, err) in zip(rels, prefetch_map(pool, lambda r: _safe_read(os.path.join(folder, r)), rels,
                                                        ahead=max(2 * batch_size, 4 * workers))):
            if err is None:
                paths.append(rel)
                arrays.append(arr)
            else:
                skipped.append({"path": rel, "reason": err})
    feats = extract_arrays(extractor, arrays, batch_size, progress)
    return FolderFeatures(folder, feats, paths, skipped, 0, len(paths), 0)


class ClipImageFeatures:
    """The pack's open_clip image tower as a feature extractor: L2-normalised embeddings (the style
    databases' rows), keyed by architecture and weights hash."""

    def __init__(self, embedder, batch_size=64):
        self.embedder = embedder
        self.dim = int(embedder.dim)
        self.key = f"clip-{embedder.name}-{embedder.weights_hash}"
        self.batch_size = batch_size

    def __call__(self, batch_uint8):
        x = batch_uint8.float().div(255.0)
        return self.embedder.encode_image(x, batch_size=self.batch_size).cpu().numpy().astype(np.float32)
