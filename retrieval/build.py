"""Building, resuming, sharding, merging and updating style databases.

The file list of a folder is sorted by relative path and cut into chunks of ``chunk_size`` files. Each chunk
is decoded (worker threads), embedded (batches) and checkpointed to ``<out>.partial/`` before the next one,
so an interrupted build resumes at the first unfinished chunk. Shard i of n takes the chunks j with
j % n == i; since every chunk is embedded exactly as in a single build, merging the n shards reproduces the
single build bit for bit.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..common import artdata
from ..common.artdata import IMAGE_EXTS, image_files, row_metadata
from ..common.files import atomic_write, file_sha256
from ..common.progress import NO_PROGRESS
from .db import StyleDBError, load_db, write_db

PARTIAL_VERSION = 1


# -- folder scanning and metadata (names parsed by common.artdata, shared with the trainer) ---------------------
def scan_folder(root):
    """(images, ignored): sorted relative posix paths of image files, and of other files (not images)."""
    if not os.path.isdir(root):
        raise StyleDBError(f"image folder not found: '{root}'")
    return image_files(root)


def load_metadata_table(path):
    """The metadata table of ``path`` (see common.artdata), errors as StyleDBError."""
    try:
        return artdata.load_metadata_table(path)
    except artdata.MetadataError as exc:
        raise StyleDBError(str(exc)) from None


# -- decoding ---------------------------------------------------------------------------------------------------
def read_image(path, size):
    """(sha256 of the file bytes, uint8 [size, size, 3]): shorter side to ``size`` (bicubic), centre crop."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced scale, much faster for big paintings
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return digest, np.asarray(img, dtype=np.uint8)


def _safe_read(path, size):
    try:
        return read_image(path, size), None
    except Exception as e:  # unreadable / not an image / truncated: skipped and listed
        if type(e).__name__ == "UnidentifiedImageError":
            return None, "not a readable image (unknown or damaged format)"
        return None, f"{type(e).__name__}: {e}"[:300]


def prefetch_map(executor, fn, items, ahead):
    """Ordered map that keeps at most ``ahead`` calls in flight (bounded memory, overlapped decoding)."""
    pending = collections.deque()
    it = iter(items)
    for item in it:
        pending.append(executor.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        for item in it:
            pending.append(executor.submit(fn, item))
            break
        yield result


def embed_uint8(embedder, arrays):
    """Raw (un-normalised) float32 embeddings of a list of uint8 [S,S,3] arrays, as numpy [B, dim]."""
    import torch

    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return embedder.encode_preprocessed(x).cpu().numpy().astype(np.float32)


def embedder_info(embedder):
    return {"name": embedder.name, "weights_hash": embedder.weights_hash, "dim": int(embedder.dim)}


# -- building ---------------------------------------------------------------------------------------------------
def parse_shard(text):
    """'i/n' → (i, n) with 0 ≤ i < n."""
    if text in (None, ""):
        return 0, 1
    if isinstance(text, (tuple, list)):
        i, n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise StyleDBError(f"shard must look like 'i/n' (e.g. 0/4), got {text!r}")
        i, n = int(m.group(1)), int(m.group(2))
    if not (n >= 1 and 0 <= i < n):
        raise StyleDBError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    return i, n


def _embed_files(root, rels, embedder, batch_size, workers, table, progress, done_before=0, total=None):
    """Decode+embed files in order. Returns (raw float32 [m, dim], rows, skipped).

    After every batch ``progress.check_interrupt()`` may stop the work, then ``progress.update(done, total)``
    (counted over the whole job: ``done_before`` files were finished before these)."""
    size = embedder.image_size
    total = len(rels) if total is None else total
    embs, rows, skipped = [], [], []
    batch, batch_rows = [], []
    done = reported = done_before

    def flush():
        nonlocal batch, batch_rows
        if batch:
            embs.append(embed_uint8(embedder, batch))
            rows.extend(batch_rows)
            batch, batch_rows = [], []

    def report():
        nonlocal reported
        progress.check_interrupt()
        progress.update(done, total)
        reported = done

    with ThreadPoolExecutor(max_workers=workers) as pool:
        reader = prefetch_map(pool, lambda rel: (rel, _safe_read(os.path.join(root, rel), size)), rels,
                              ahead=max(2 * batch_size, 4 * workers))
        for rel, (res, err) in reader:
            done += 1
            if err is not None:
                skipped.append({"path": rel, "reason": err})
                continue
            digest, arr = res
            meta = row_metadata(rel, table)
            meta["sha256"] = digest
            batch.append(arr)
            batch_rows.append(meta)
            if len(batch) >= batch_size:
                flush()
                report()
        flush()
        if reported != done:
            report()
    emb = np.concatenate(embs) if embs else np.zeros((0, embedder.dim), np.float32)
    return emb, rows, skipped


def _plan_digest(files, chunk_size, shard, info, metadata_file):
    h = hashlib.sha256()
    h.update(json.dumps({"v": PARTIAL_VERSION, "chunk": chunk_size, "shard": shard, "embedder": info,
                         "metadata": os.path.abspath(metadata_file) if metadata_file else ""}).encode())
    for f in files:
        h.update(f.encode() + b"\0")
    return h.hexdigest()


def _save_chunk(path, emb, rows, skipped):
    atomic_write(path, lambda tmp: np.savez(tmp, emb=emb, rows=np.array(json.dumps(rows)),
                                            skipped=np.array(json.dumps(skipped))))


def _load_chunk(path):
    with np.load(path) as z:
        return z["emb"], json.loads(str(z["rows"])), json.loads(str(z["skipped"]))


def dedup_sorted(emb, norms, rows):
    """Sort rows by path and keep one row per content hash (the first path); returns the duplicates list."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["path"])
    seen, keep, dups = {}, [], []
    for i in order:
        h = rows[i]["sha256"]
        if h in seen:
            dups.append({"path": rows[i]["path"], "same_as": seen[h]})
        else:
            seen[h] = rows[i]["path"]
            keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return emb[keep], norms[keep], [rows[i] for i in keep], dups


def normalise16(raw):
    """Raw float32 embeddings → (L2-normalised float16 rows, float32 norms): the stored form."""
    raw = np.asarray(raw, dtype=np.float32)
    norms = np.linalg.norm(raw, axis=1)
    emb = (raw / np.maximum(norms, 1e-12)[:, None]).astype(np.float16)
    return emb, norms.astype(np.float32)


def _workers(workers):
    return workers or min(8, (os.cpu_count() or 2))


def _source_files(source, metadata_file):
    """(image files, ignored files) of a build's source folder (the metadata table inside it is not 'ignored');
    refuses a folder without images."""
    files, ignored = scan_folder(source)
    meta_abs = os.path.abspath(metadata_file) if metadata_file else None
    if meta_abs and meta_abs.startswith(source + os.sep):
        ignored = [f for f in ignored if os.path.join(source, f) != meta_abs]
    if not files:
        raise StyleDBError(f"no image files (extensions {', '.join(sorted(IMAGE_EXTS))}) in '{source}'"
                           + (f"; found {len(ignored)} other file(s) such as {ignored[0]}" if ignored else ""))
    return files, ignored


def _open_partial(partial, plan, resume, log):
    """Keep the checkpoints in ``partial`` when resuming a build with the same plan (files, settings, embedder),
    else start it afresh; writes the plan."""
    plan_path = os.path.join(partial, "plan.json")
    if os.path.isdir(partial):
        try:
            with open(plan_path, encoding="utf-8") as f:
                same = json.load(f).get("digest") == plan["digest"]
        except (OSError, ValueError):
            same = False
        if not (resume and same):
            log(f"discarding the previous partial build in {partial}"
                + ("" if resume else " (resume off)") + ("" if same else " (different files or settings)"))
            shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    atomic_write(plan_path, json.dumps(plan))


def _chunk_path(partial, j):
    return os.path.join(partial, f"chunk_{j:06d}.npz")


def _embed_chunks(partial, chunks, mine, embed):
    """Embed and checkpoint this shard's chunks that are not checkpointed yet (``embed(files, done, total)``);
    returns how many were already there."""
    total = sum(len(chunks[j]) for j in mine)
    done, resumed = 0, 0
    for j in mine:
        cpath = _chunk_path(partial, j)
        if os.path.isfile(cpath):
            resumed += 1
        else:
            _save_chunk(cpath, *embed(chunks[j], done, total))
        done += len(chunks[j])
    return resumed


def _load_chunks(partial, mine, dim):
    """(raw float32 embeddings, rows, skipped) of the checkpointed chunks, in chunk order."""
    embs, rows, skipped = [], [], []
    for j in mine:
        e, r, s = _load_chunk(_chunk_path(partial, j))
        embs.append(e)
        rows.extend(r)
        skipped.extend(s)
    raw = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
    return raw, rows, skipped


def build_db(source, out, embedder, metadata_file=None, batch_size=64, workers=None, chunk_size=1024,
             shard=None, index="auto", progress=NO_PROGRESS, resume=True, log=print):
    """Build the database of an image folder into directory ``out``; returns a summary dict.

    ``progress`` (a ``common.progress.Progress``) is updated after every batch, and its ``check_interrupt()``
    may raise to stop: the finished chunks are kept in ``out.partial`` and the next call with ``resume=True``
    continues from there.
    """
    source, out = os.path.abspath(source), os.path.abspath(out)
    progress = progress or NO_PROGRESS
    metadata_file = str(metadata_file) if metadata_file else None
    shard_i, shard_n = parse_shard(shard)
    batch_size = max(1, int(batch_size))
    chunk_size = max(batch_size, int(chunk_size) // batch_size * batch_size)
    workers = _workers(workers)
    table = load_metadata_table(metadata_file)
    files, ignored = _source_files(source, metadata_file)
    info = embedder_info(embedder)
    chunks = [files[i:i + chunk_size] for i in range(0, len(files), chunk_size)]
    mine = [j for j in range(len(chunks)) if j % shard_n == shard_i]

    partial = out + ".partial"
    digest = _plan_digest(files, chunk_size, [shard_i, shard_n], info, metadata_file)
    _open_partial(partial, {"digest": digest, "source": source, "files": len(files), "chunk_size": chunk_size,
                            "shard": [shard_i, shard_n]}, resume, log)
    resumed = _embed_chunks(partial, chunks, mine, lambda rels, done, total: _embed_files(
        source, rels, embedder, batch_size, workers, table, progress, done, total))
    if resumed:
        log(f"resumed: {resumed} of {len(mine)} chunk(s) were already embedded")

    raw, rows, skipped = _load_chunks(partial, mine, info["dim"])
    if not rows:
        raise StyleDBError(f"none of the {len(files)} image file(s) in '{source}' could be read; first error: "
                           f"{skipped[0]['path']}: {skipped[0]['reason']}")
    emb16, norms, rows, dups = dedup_sorted(*normalise16(raw), rows)
    extra = {"shard": [shard_i, shard_n]} if shard_n > 1 else {}
    write_db(out, emb16, norms, rows, info, source_root=source, skipped=sorted(skipped, key=lambda s: s["path"]),
             duplicates=dups, index="exact" if shard_n > 1 else index, extra=extra)
    shutil.rmtree(partial, ignore_errors=True)
    return {"path": out, "count": len(rows), "files": sum(len(chunks[j]) for j in mine), "skipped": skipped,
            "duplicates": dups, "ignored": ignored, "resumed_chunks": resumed, "shard": [shard_i, shard_n]}


def merge_dbs(out, parts, index="auto", progress=NO_PROGRESS):
    """Merge databases (e.g. the shards of one build) into ``out``: rows re-sorted by path, deduplicated.

    ``progress`` counts the databases read; an interrupt leaves ``out`` as it was (it is written at the end)."""
    if not parts:
        raise StyleDBError("merge needs at least one database")
    progress = progress or NO_PROGRESS
    dbs = []
    for p in parts:
        progress.check_interrupt()
        dbs.append(load_db(p, load_index=False))
        progress.update(len(dbs), len(parts))
    first = dbs[0]
    for db in dbs[1:]:
        if (db.embedder_name, db.embedder_hash, db.dim) != (first.embedder_name, first.embedder_hash, first.dim):
            raise StyleDBError(f"cannot merge '{db.name}' ({db.embedder_name}/{db.embedder_hash}) with "
                               f"'{first.name}' ({first.embedder_name}/{first.embedder_hash}): different embedders")
    roots = {db.source_root() for db in dbs}
    root = first.source_root()
    rows, embs, norms = [], [], []
    for db in dbs:
        for r in db.metadata:
            r = dict(r)
            if len(roots) > 1 and not os.path.isabs(r["path"]):
                r["path"] = os.path.join(db.source_root(), r["path"]).replace(os.sep, "/")
            rows.append(r)
        embs.append(np.asarray(db.embeddings, dtype=np.float16))
        norms.append(db.norms if db.norms is not None else np.ones(db.count, np.float32))
    if len(roots) > 1:
        root = ""
    emb16, nrm, rows, dups = dedup_sorted(np.concatenate(embs), np.concatenate(norms), rows)
    skipped = sorted((s for db in dbs for s in db.manifest.get("skipped", [])), key=lambda s: s["path"])
    dups = sorted([d for db in dbs for d in db.manifest.get("duplicates", [])] + dups, key=lambda d: d["path"])
    info = {"name": first.embedder_name, "weights_hash": first.embedder_hash, "dim": first.dim}
    write_db(out, emb16, nrm, rows, info, source_root=root, skipped=skipped, duplicates=dups, index=index)
    return {"path": os.path.abspath(out), "count": len(rows), "parts": len(dbs)}


def _files_to_embed(source, files, stored_path, db, progress):
    """(files to embed, rows they replace, how many are unchanged): a file whose content hash is in the database
    is unchanged; a new hash at a stored path replaces that row; an unreadable file is embedded (and skipped)."""
    known_hash = {r["sha256"] for r in db.metadata}
    by_path = {r["path"]: i for i, r in enumerate(db.metadata)}
    new, replaced, unchanged = [], set(), 0
    for rel in files:
        progress.check_interrupt()
        try:
            digest = file_sha256(os.path.join(source, rel))
        except OSError:
            new.append(rel)  # listed as skipped by the reader
            continue
        if digest in known_hash:
            unchanged += 1
            continue
        if stored_path(rel) in by_path:
            replaced.add(by_path[stored_path(rel)])
        new.append(rel)
    return new, replaced, unchanged


def _with_new_rows(db, keep, emb, rows):
    """(float16 embeddings, norms, rows, duplicates) of the kept rows of ``db`` plus the new ones, sorted and
    deduplicated like a fresh build."""
    new16, new_norms = normalise16(emb)
    old16 = np.asarray(db.embeddings[keep], dtype=np.float16).reshape(len(keep), db.dim)
    old_norms = (db.norms[keep] if db.norms is not None else np.ones(len(keep), np.float32))
    return dedup_sorted(np.concatenate([old16, new16]), np.concatenate([old_norms, new_norms]),
                        [db.metadata[i] for i in keep] + rows)


def add_to_db(db_path, source, embedder, metadata_file=None, batch_size=64, workers=None, prune=False,
              index="auto", progress=NO_PROGRESS, log=print):
    """Add a folder's new or changed images to a database; images already in it (same content hash) are not
    embedded again. ``prune`` drops rows whose file no longer exists under ``source``.

    ``progress`` counts the images embedded; an interrupt (``progress.check_interrupt()``, while hashing or
    embedding) leaves the database as it was."""
    progress = progress or NO_PROGRESS
    db = load_db(db_path, load_index=False)
    db.check_embedder(embedder)
    source = os.path.abspath(source)
    root = db.source_root() or source
    files, _ = scan_folder(source)
    table = load_metadata_table(metadata_file)

    def stored_path(rel):
        return os.path.relpath(os.path.join(source, rel), root).replace(os.sep, "/")

    new, replaced, unchanged = _files_to_embed(source, files, stored_path, db, progress)
    emb, rows, skipped = _embed_files(source, new, embedder, max(1, int(batch_size)), _workers(workers), table,
                                      progress)
    for item in rows + skipped:
        item["path"] = stored_path(item["path"])
    keep = [i for i in range(db.count) if i not in replaced]
    if prune:
        present = {stored_path(rel) for rel in files}
        keep = [i for i in keep if db.metadata[i]["path"] in present]
    all16, all_norms, all_rows, dups = _with_new_rows(db, keep, emb, rows)
    embedded_paths = {stored_path(f) for f in new}
    old_skipped = [s for s in db.manifest.get("skipped", []) if s["path"] not in embedded_paths]
    write_db(db_path, all16, all_norms, all_rows, embedder_info(embedder), source_root=root,
             skipped=sorted(old_skipped + skipped, key=lambda s: s["path"]),
             duplicates=sorted(db.manifest.get("duplicates", []) + dups, key=lambda d: d["path"]), index=index)
    log(f"added {len(rows)} image(s), {unchanged} already embedded, {len(replaced)} changed, "
        f"{len(skipped)} unreadable; database now has {len(all_rows)}")
    return {"path": os.path.abspath(db_path), "count": len(all_rows), "embedded": len(rows), "unchanged": unchanged,
            "replaced": len(replaced), "pruned": db.count - len(replaced) - len(keep) if prune else 0,
            "skipped": skipped}
