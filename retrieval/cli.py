"""Command line for style databases, outside ComfyUI.

    python -m retrieval build  IMAGES OUT --arch ViT-L-14 --weights ViT-L-14-openai.safetensors [--shard 0/4]
    python -m retrieval add    DB IMAGES --arch ... --weights ... [--prune]
    python -m retrieval merge  OUT SHARD_DB [SHARD_DB ...]
    python -m retrieval import SOURCE OUT [--format compvis-npz] [--arch ViT-L-14] [--weights FILE]
    python -m retrieval info   DB
    python -m retrieval search DB --text "a stormy sea" --arch ... --weights ... [-k 19] [--style impressionism]
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from ..common.progress import TqdmProgress
from . import build as B
from .db import DEFAULT_K, Filters, StyleDBError, load_db
from .importers.formats import DEFAULT_ARCH, FORMATS, import_source


def _embedder(args):
    import open_clip

    from .embedder import OpenClipEmbedder

    for cfg in args.model_config or []:
        open_clip.add_model_config(cfg)
    return OpenClipEmbedder(args.arch, args.weights, device=args.device)


def _add_model_args(p):
    p.add_argument("--arch", required=True, help="open_clip architecture, e.g. ViT-L-14, ViT-B-32, ViT-H-14")
    p.add_argument("--weights", required=True, help="local open_clip weights file (.safetensors preferred)")
    p.add_argument("--model-config", action="append", help="extra open_clip model config json (custom archs)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")


def _parser():
    ap = argparse.ArgumentParser(prog="python -m retrieval", description="Atelier style databases")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="embed an image folder into a new database (resumes an interrupted build)")
    b.add_argument("images")
    b.add_argument("out")
    _add_model_args(b)
    b.add_argument("--metadata", help="CSV or JSONL with a path/file column and artist/style/genre/title/year")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--workers", type=int, default=None, help="image decoding threads")
    b.add_argument("--chunk-size", type=int, default=1024, help="images per checkpointed chunk")
    b.add_argument("--shard", default=None, help="i/n: embed only shard i of n (merge the n outputs afterwards)")
    b.add_argument("--index", choices=["auto", "exact", "ivf"], default="auto")
    b.add_argument("--no-resume", action="store_true", help="discard a partial build instead of resuming it")

    a = sub.add_parser("add", help="embed new or changed images of a folder into an existing database")
    a.add_argument("db")
    a.add_argument("images")
    _add_model_args(a)
    a.add_argument("--metadata")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--workers", type=int, default=None)
    a.add_argument("--prune", action="store_true", help="drop rows whose file is gone from the folder")
    a.add_argument("--index", choices=["auto", "exact", "ivf"], default="auto")

    m = sub.add_parser("merge", help="merge databases (shards of one build) into one")
    m.add_argument("out")
    m.add_argument("parts", nargs="+")
    m.add_argument("--index", choices=["auto", "exact", "ivf"], default="auto")

    im = sub.add_parser("import", help="import precomputed embeddings (no images) into a new database; resumes")
    im.add_argument("source", help="CompVis retrieval database folder of *.npz parts (or one .npz)")
    im.add_argument("out")
    im.add_argument("--format", choices=list(FORMATS), default="auto")
    im.add_argument("--arch", default=DEFAULT_ARCH, help="open_clip architecture that computed the embeddings")
    im.add_argument("--weights", default=None,
                    help="the local open_clip weights file of that model: binds the database to it (optional)")
    im.add_argument("--style", default=None, help="style of every row (default: from an artbench-<style> folder)")
    im.add_argument("--index", choices=["auto", "exact", "ivf"], default="auto")
    im.add_argument("--no-resume", action="store_true", help="discard a partial import instead of resuming it")

    i = sub.add_parser("info", help="print a database's manifest summary")
    i.add_argument("db")

    s = sub.add_parser("search", help="query a database by text")
    s.add_argument("db")
    s.add_argument("--text", required=True)
    _add_model_args(s)
    s.add_argument("-k", type=int, default=DEFAULT_K)
    s.add_argument("--artist", default="")
    s.add_argument("--style", default="")
    s.add_argument("--genre", default="")
    s.add_argument("--year-min", type=int, default=None)
    s.add_argument("--year-max", type=int, default=None)

    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except StyleDBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args):
    if args.cmd == "info":
        print(load_db(args.db).info_text())
        return 0
    if args.cmd == "merge":
        return _merge(args)
    if args.cmd == "import":
        return _import(args)
    return {"build": _build, "add": _add, "search": _search}[args.cmd](args, _embedder(args))


def _merge(args):
    with contextlib.closing(TqdmProgress("merging", unit="db")) as bar:
        res = B.merge_dbs(args.out, args.parts, index=args.index, progress=bar)
    print(f"merged {res['parts']} database(s) into {res['path']}: {res['count']} images")
    return 0


def _build(args, emb):
    with contextlib.closing(TqdmProgress(f"embedding {args.images}", unit="img")) as bar:
        res = B.build_db(args.images, args.out, emb, metadata_file=args.metadata, batch_size=args.batch_size,
                         workers=args.workers, chunk_size=args.chunk_size, shard=args.shard, index=args.index,
                         progress=bar, resume=not args.no_resume)
    print(f"wrote {res['path']}: {res['count']} images ({len(res['skipped'])} unreadable, "
          f"{len(res['duplicates'])} duplicates, {len(res['ignored'])} non-image files ignored)")
    for s in res["skipped"][:20]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


def _add(args, emb):
    with contextlib.closing(TqdmProgress(f"adding {args.images}", unit="img")) as bar:
        B.add_to_db(args.db, args.images, emb, metadata_file=args.metadata, batch_size=args.batch_size,
                    workers=args.workers, prune=args.prune, index=args.index, progress=bar)
    return 0


def _search(args, emb):
    db = load_db(args.db)
    db.check_embedder(emb)
    q = emb.encode_text([args.text])[0].cpu().numpy()
    f = Filters(args.artist, args.style, args.genre, args.year_min, args.year_max)
    n = db.neighbors(q, args.k, f)
    if n.reason:
        print(f"note: {n.reason}")
    for rank, (s, meta) in enumerate(zip(n.scores, n.metadata), 1):
        print(f"{rank:3d} {s:.4f} {meta['artist']} | {meta['style']} | {meta['title']} {meta['year']} | "
              f"{meta['path']}")
    return 0


def _import(args):
    with contextlib.closing(TqdmProgress(f"importing {args.source}", unit="row")) as bar:
        res = import_source(args.source, args.out, args.format, args.arch, weights=args.weights, index=args.index,
                            style=args.style, progress=bar, resume=not args.no_resume)
    print(f"imported {res['count']} rows from {res['parts']} {res['format']} part(s) into {res['path']}")
    return 0
