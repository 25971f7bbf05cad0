"""Command line for the metrics, outside ComfyUI.

    python -m metrics fid A B [--kid] --inception weights-inception-2015-12-05-6726825d.pth [--json]
    python -m metrics alpha-fid G I1 I2 --inception ... [--json]
    python -m metrics stats IMAGES -o reference.npz --inception ...
    python -m metrics clip-score IMAGES --prompt "a fish" --arch ViT-L-14 --weights ViT-L-14-openai.safetensors
    python -m metrics style-train COLLECTION --out styles.safetensors --arch ... --weights ...
    python -m metrics style-score styles.safetensors IMAGES [--target Impressionism] [--baseline IMAGES2] ...

Every image set is a folder of images or a statistics .npz (``mu``/``sigma`` as pytorch-fid writes them, or
``features``). Folder features are cached by file hash: a second run over the same folder reads no image,
and an interrupted extraction resumes. ``--json`` prints one JSON object on stdout (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..common.progress import TqdmProgress
from .frechet import MetricsError

INCEPTION_ENV = "ATELIER_FID_INCEPTION"


def _progress(args, desc):
    return TqdmProgress(desc, unit="img", enabled=not args.quiet)


def _inception(args):
    from .inception import WEIGHTS_FILE, WEIGHTS_HELP, load_inception
    from ..retrieval.embedder import pick_device

    path = args.inception or os.environ.get(INCEPTION_ENV)
    if not path:
        raise MetricsError(f"no Inception weights given: pass --inception {WEIGHTS_FILE} (or set {INCEPTION_ENV}). "
                           + WEIGHTS_HELP)
    return load_inception(path, dim=args.dims, resize=args.resize, device=pick_device(args.device))


def _embedder(args):
    import open_clip

    from ..retrieval.embedder import OpenClipEmbedder

    if not args.arch or not args.weights:
        raise MetricsError("give the open_clip model: --arch (e.g. ViT-L-14) and --weights (a local weights file)")
    for cfg in args.model_config or []:
        open_clip.add_model_config(cfg)
    return OpenClipEmbedder(args.arch, args.weights, device=args.device)


def _add_common(p):
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")


def _add_inception(p):
    p.add_argument("--inception", help=f"FID Inception weights file (default ${INCEPTION_ENV}), e.g. "
                                       "weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048),
                   help="Inception feature layer (2048 = pool3, the standard FID)")
    p.add_argument("--resize", default="tf-bilinear", choices=("tf-bilinear", "antialias"),
                   help="resize to 299 px: TensorFlow 1.x bilinear (the original FID, pytorch-fid's published "
                        "statistics) or antialiased bilinear (torchmetrics' default)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the folder feature cache")


def _add_clip(p):
    p.add_argument("--arch", help="open_clip architecture, e.g. ViT-L-14")
    p.add_argument("--weights", help="local open_clip weights file (.safetensors preferred)")
    p.add_argument("--model-config", action="append", help="extra open_clip model config json (custom architectures)")


def build_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m metrics", description="FID, KID, α-FID, CLIP score and the "
                                 "style classifier of the pack's papers", formatter_class=fmt)
    sub = ap.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("fid", help="FID (and KID) between two image sets", formatter_class=fmt)
    f.add_argument("a", help="folder of images or statistics .npz")
    f.add_argument("b", help="folder of images or statistics .npz")
    f.add_argument("--kid", action="store_true", help="also KID (needs features: folders or features .npz)")
    f.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    f.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (cut to the set size)")
    _add_inception(f)
    _add_common(f)

    a = sub.add_parser("alpha-fid", help="α-FID of a generated set against two reference sets (eq. 6 of the "
                                         "multistage-guidance paper)", formatter_class=fmt)
    a.add_argument("g", help="generated images: folder or .npz")
    a.add_argument("i1", help="images of the first object: folder or .npz")
    a.add_argument("i2", help="images of the second object: folder or .npz")
    _add_inception(a)
    _add_common(a)

    s = sub.add_parser("stats", help="write a set's statistics (.npz with mu, sigma, as pytorch-fid)",
                       formatter_class=fmt)
    s.add_argument("images", help="folder of images (or a features .npz)")
    s.add_argument("-o", "--out", required=True, help="output .npz")
    _add_inception(s)
    _add_common(s)

    c = sub.add_parser("clip-score", help="CLIP score, 100·max(cos, 0), of images and prompts", formatter_class=fmt)
    c.add_argument("images", help="folder of images")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt for every image")
    group.add_argument("--prompts", help=".txt with one prompt per line (images in sorted path order), or CSV/JSONL "
                                         "with a path/file column and a prompt column")
    _add_clip(c)
    _add_common(c)

    t = sub.add_parser("style-train", help="train the style classifier (two-layer MLP on CLIP image features)",
                       formatter_class=fmt)
    t.add_argument("source", help="a style database folder (its embeddings are used) or a labelled image folder "
                                  "(WikiArt/ArtBench layout Style/artist_title.jpg)")
    t.add_argument("--out", required=True, help="output .safetensors")
    t.add_argument("--label", default="style", choices=("style", "artist", "genre"), help="what to classify")
    t.add_argument("--metadata", help="CSV/JSONL table overriding labels per file (image folders)")
    t.add_argument("--hidden", type=int, default=512, help="hidden units of the MLP")
    t.add_argument("--epochs", type=int, default=100, help="training epochs")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of each label held out for validation")
    t.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    _add_clip(t)
    _add_common(t)

    r = sub.add_parser("style-score", help="classify images by style; relative accuracy against a baseline set",
                       formatter_class=fmt)
    r.add_argument("classifier", help="classifier .safetensors from style-train")
    r.add_argument("images", help="folder of images (sub-folders name the intended style unless --target)")
    r.add_argument("--target", help="intended style of every image (default: each image's sub-folder)")
    r.add_argument("--baseline", help="folder of baseline images (e.g. prompt-suffix stylisation) to compare with")
    r.add_argument("--top-k", type=int, default=3, help="styles listed per image")
    _add_clip(r)
    _add_common(r)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result, text = COMMANDS[args.cmd](args)
    except (MetricsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(text)
    return 0


def _warn_lines(result):
    return "".join(f"\nwarning: {w}" for w in result.get("warnings", []))


def cmd_fid(args):
    from .fid import fid

    ex = _inception(args)
    bar = _progress(args, "Inception features")
    try:
        res = fid(args.a, args.b, ex, with_kid=args.kid, kid_subsets=args.kid_subsets,
                  kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, progress=bar,
                  cache=not args.no_cache)
    finally:
        bar.close()
    text = f"FID {res['fid']:.4f}  ({res['n_a']} vs {res['n_b']} images; {ex.key})"
    if args.kid:
        text += f"\nKID {res['kid']:.6f} ± {res['kid_std']:.6f}"
    return res, text + _warn_lines(res)


def cmd_alpha_fid(args):
    from .fid import alpha_fid_sets

    ex = _inception(args)
    bar = _progress(args, "Inception features")
    try:
        res = alpha_fid_sets(args.g, args.i1, args.i2, ex, batch_size=args.batch_size, progress=bar,
                             cache=not args.no_cache)
    finally:
        bar.close()
    text = (f"α-FID {res['alpha_fid']:.4f}\n  x = FID(G, I1) {res['x']:.4f}  ({res['n_g']} vs {res['n_1']} images)\n"
            f"  y = FID(G, I2) {res['y']:.4f}  ({res['n_g']} vs {res['n_2']} images)")
    return res, text + _warn_lines(res)


def cmd_stats(args):
    from .fid import write_stats

    ex = _inception(args)
    bar = _progress(args, "Inception features")
    try:
        res = write_stats(args.images, args.out, ex, batch_size=args.batch_size, progress=bar, cache=not args.no_cache)
    finally:
        bar.close()
    return res, f"wrote {res['stats']}: {res['n']} images, {res['dim']}-d ({ex.key})" + _warn_lines(res)


def _prompts_arg(args):
    if args.prompt is not None:
        return args.prompt
    path = args.prompts
    if not os.path.isfile(path):
        raise MetricsError(f"prompts file not found: '{path}'")
    if path.lower().endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]
    from ..common.artdata import load_metadata_table

    table = load_metadata_table(path)
    out = {}
    for key, row in table.items():
        text = row.get("prompt") or row.get("caption") or row.get("text")
        if text:
            out[key] = text
    return out


def cmd_clip_score(args):
    import numpy as np

    from .clip_score import folder_clip_scores, pair_prompts, score_table, summary_line

    emb = _embedder(args)
    prompts = _prompts_arg(args)
    bar = _progress(args, "CLIP image features")
    try:
        paths, scores, skipped = folder_clip_scores(emb, args.images, prompts, args.batch_size, bar)
    finally:
        bar.close()
    used = prompts if isinstance(prompts, list) and len(prompts) == len(paths) else None
    if isinstance(prompts, dict):
        from .clip_score import _lookup

        used = [_lookup(prompts, p) for p in paths]
    used = used or pair_prompts(prompts, len(paths))
    res = {"clip_score": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
           "n": len(scores), "scores": {p: float(s) for p, s in zip(paths, scores)},
           "skipped": skipped, "clip": f"{emb.name}/{emb.weights_hash}"}
    text = score_table(paths, used, scores) if len(paths) <= 200 else summary_line(scores)
    text += "".join(f"\nskipped {s['path']}: {s['reason']}" for s in skipped)
    return res, text


def cmd_style_train(args):
    from .style import labelled_features, train_classifier

    db = None
    if os.path.isfile(os.path.join(args.source, "manifest.json")):
        from ..retrieval.db import load_db

        db = load_db(args.source, load_index=False)
    emb = _embedder(args) if (args.arch or args.weights or db is None) else None
    bar = _progress(args, "CLIP image features")
    try:
        feats, labels, info, skipped = labelled_features(args.source, emb, args.label, args.metadata, db,
                                                         args.batch_size, bar)
    finally:
        bar.close()
    bar = TqdmProgress("training", unit="epoch", enabled=not args.quiet)
    try:
        clf, report = train_classifier(feats, labels, info, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                                       weight_decay=args.weight_decay, val_fraction=args.val_fraction,
                                       seed=args.seed, progress=bar)
    finally:
        bar.close()
    clf.save(args.out)
    report.update({"out": args.out, "source": "style database" if db is not None else "image folder",
                   "embedder": info, "skipped": len(skipped)})
    val = report["val_accuracy"]
    text = (f"wrote {args.out}: {report['labels']} {args.label} labels, {report['images']} images "
            f"({'style database' if db is not None else 'image folder'}; open_clip {info['name']}/"
            f"{info['weights_hash']})\ntop-1 accuracy: {report['train_accuracy']:.3f} on {report['train_images']} "
            f"training images" + (f", {val:.3f} on {report['val_images']} held-out images" if val is not None else ""))
    text += "".join(f"\nskipped {s['path']}: {s['reason']}" for s in skipped[:20])
    return report, text


def _folder_targets(clf, folder, paths, target):
    from ..common.artdata import parse_wikiart

    if target:
        clf.label_index(target)
        return [target] * len(paths)
    targets = [parse_wikiart(p)["style"] for p in paths]
    missing = [p for p, t in zip(paths, targets) if not t]
    if missing:
        raise MetricsError(f"{missing[0]} in '{folder}' is not in a style sub-folder: give --target STYLE, or put the "
                           "images in folders named after the intended style")
    return targets


def _clip_folder(emb, folder, batch_size, progress):
    from .features import ClipImageFeatures, folder_features

    ff = folder_features(folder, ClipImageFeatures(emb, batch_size), batch_size=batch_size, progress=progress)
    if not len(ff):
        raise MetricsError(f"no readable image in '{folder}'")
    return ff


def cmd_style_score(args):
    from .style import load_classifier, relative_accuracy, relative_table, top_table

    clf = load_classifier(args.classifier)
    emb = _embedder(args)
    clf.check_embedder(emb)
    bar = _progress(args, "CLIP image features")
    try:
        ff = _clip_folder(emb, args.images, args.batch_size, bar)
        base = _clip_folder(emb, args.baseline, args.batch_size, bar) if args.baseline else None
    finally:
        bar.close()
    probs = clf.probabilities(ff.features)
    tops = clf.top(probs, args.top_k)
    res = {"images": {p: [[n, s] for n, s in top] for p, top in zip(ff.paths, tops)},
           "skipped": ff.skipped + (base.skipped if base else [])}
    text = top_table(ff.paths, tops) if len(ff.paths) <= 200 else f"{len(ff.paths)} images classified"
    targets = None
    if args.target or base is not None or all("/" in p for p in ff.paths):
        targets = _folder_targets(clf, args.images, ff.paths, args.target)
    if base is not None:
        base_probs = clf.probabilities(base.features)
        comp = relative_accuracy(clf, probs, targets, base_probs,
                                 _folder_targets(clf, args.baseline, base.paths, args.target))
        res["comparison"] = comp
        text += "\n\n" + relative_table(comp, os.path.basename(os.path.normpath(args.images)),
                                        os.path.basename(os.path.normpath(args.baseline)))
    elif targets is not None:
        from .style import per_style

        res["per_style"] = {k: {"images": n, "accuracy": a, "target_probability": p}
                            for k, (n, a, p) in per_style(clf, probs, targets).items()}
        text += "\n\n" + "\n".join(f"{k}: top-1 {100 * v['accuracy']:.1f}% of {v['images']}, mean p(target) "
                                   f"{100 * v['target_probability']:.1f}%" for k, v in res["per_style"].items())
    return res, text


COMMANDS = {"fid": cmd_fid, "alpha-fid": cmd_alpha_fid, "stats": cmd_stats, "clip-score": cmd_clip_score,
            "style-train": cmd_style_train, "style-score": cmd_style_score}
