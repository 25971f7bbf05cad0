"""What the metric nodes show: one call per node that scores a ComfyUI image batch (and an optional baseline
batch, the other arm of a comparison workflow) and returns the numbers with a readable report."""
from __future__ import annotations

import numpy as np

from ..common.progress import NO_PROGRESS
from .clip_score import clip_scores, pair_prompts, score_table, summary_line
from .features import ClipImageFeatures, extract_batch
from .fid import alpha_fid_sets, fid as fid_sets, fid_table
from .frechet import MetricsError
from .images import comfy_to_uint8


def _warnings(res):
    return "".join(f"\nwarning: {w}" for w in res.get("warnings", []))


def split_prompts(text):
    """A node's prompt box: one prompt per non-empty line (one line = the same prompt for every image)."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        raise MetricsError("CLIP Score: write the prompt the images were made from (one line for all images, or "
                           "one line per image)")
    return lines


def clip_score_report(embedder, images, prompts, baseline=None, label="images", baseline_label="baseline",
                      progress=NO_PROGRESS):
    """{"score", "baseline_score" (None without a baseline), "text"} for ComfyUI IMAGE batches."""
    lines = split_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    x = comfy_to_uint8(images)
    scores = clip_scores(embedder, x, lines, progress=progress)
    names = [f"#{i + 1}" for i in range(len(scores))]
    text = score_table(names, pair_prompts(lines, len(scores)), scores)
    out = {"score": float(np.mean(scores)), "baseline_score": None, "scores": scores.tolist()}
    if baseline is not None:
        b = comfy_to_uint8(baseline)
        base = clip_scores(embedder, b, lines if len(lines) in (1, b.shape[0]) else lines[:1], progress=progress)
        out["baseline_score"] = float(np.mean(base))
        text += "\n" + summary_line(base, baseline_label)
        text += f"\ndifference ({label} − {baseline_label}): {out['score'] - out['baseline_score']:+.2f}"
    out["text"] = f"CLIP score, 100·max(cos, 0), open_clip {embedder.name}\n" + text
    return out


def fid_report(extractor, reference, images=None, folder="", baseline=None, label="images",
               baseline_label="baseline", progress=NO_PROGRESS, log=None):
    """FID of an image batch or folder (and of an optional baseline batch) against a reference set."""
    if images is None and not folder:
        raise MetricsError("FID: connect images or give an image folder")
    first = comfy_to_uint8(images) if images is not None else folder
    res = fid_sets(first, reference, extractor, progress=progress, log=log)
    rows = [(label if images is not None else folder, res["fid"], res["n_a"])]
    out = {"fid": res["fid"], "baseline_fid": None}
    warn = list(res["warnings"])
    if baseline is not None:
        rb = fid_sets(comfy_to_uint8(baseline), reference, extractor, progress=progress, log=log)
        out["baseline_fid"] = rb["fid"]
        rows.append((baseline_label, rb["fid"], rb["n_a"]))
        warn += [w for w in rb["warnings"] if w not in warn]
    out["text"] = (f"FID against {reference} ({res['n_b']} reference images; {extractor.key})\n" + fid_table(rows)
                   + _warnings({"warnings": warn}))
    return out


def alpha_fid_report(extractor, images, reference_1, reference_2, baseline=None, label="images",
                     baseline_label="baseline", progress=NO_PROGRESS, log=None):
    """α-FID (eq. 6) of an image batch (and an optional baseline batch) against two reference sets."""
    res = alpha_fid_sets(comfy_to_uint8(images), reference_1, reference_2, extractor, progress=progress, log=log)
    out = {"alpha_fid": res["alpha_fid"], "x": res["x"], "y": res["y"], "baseline": None}
    rows = [(label, res)]
    if baseline is not None:
        rb = alpha_fid_sets(comfy_to_uint8(baseline), reference_1, reference_2, extractor, progress=progress,
                            log=log)
        out["baseline"] = {k: rb[k] for k in ("alpha_fid", "x", "y")}
        rows.append((baseline_label, rb))
    width = max(len("set"), *(len(r[0]) for r in rows))
    lines = [f"α-FID = √([x² + y² + (x − y)²]/2), x = FID(G, I1), y = FID(G, I2)",
             f"I1: {reference_1} ({res['n_1']} images), I2: {reference_2} ({res['n_2']} images); {extractor.key}",
             f"{'set':<{width}}  {'α-FID':>9}  {'x':>9}  {'y':>9}  {'images':>6}"]
    lines += [f"{name:<{width}}  {r['alpha_fid']:>9.3f}  {r['x']:>9.3f}  {r['y']:>9.3f}  {r['n_g']:>6}"
              for name, r in rows]
    out["text"] = "\n".join(lines) + _warnings(res)
    return out


def style_score_report(classifier, embedder, images, top_k=3, target="", baseline=None, label="images",
                       baseline_label="baseline", progress=NO_PROGRESS):
    """Top styles per image; with a target style its top-1 accuracy, and with a baseline batch the relative
    improvement of the paper's comparison."""
    from .style import relative_accuracy, relative_table, target_accuracy, top_table

    classifier.check_embedder(embedder)
    extractor = ClipImageFeatures(embedder)
    probs = classifier.probabilities(extract_batch(extractor, comfy_to_uint8(images), progress=progress))
    tops = classifier.top(probs, top_k)
    names = [f"#{i + 1}" for i in range(len(tops))]
    out = {"top_styles": "\n".join(t[0][0] for t in tops), "accuracy": -1.0, "baseline_accuracy": -1.0,
           "relative_improvement": None}
    text = top_table(names, tops)
    target = (target or "").strip()
    if baseline is not None and not target:
        raise MetricsError("Style Score: give target_style (the style both arms were asked for) to compare the "
                           "images with the baseline")
    if target:
        out["accuracy"], prob = target_accuracy(classifier, probs, target)
        text += f"\n{label}: {target} is the top-1 style of {100 * out['accuracy']:.1f}% (mean p {100 * prob:.1f}%)"
    if baseline is not None:
        bprobs = classifier.probabilities(extract_batch(extractor, comfy_to_uint8(baseline), progress=progress))
        comp = relative_accuracy(classifier, probs, target, bprobs, target)
        out["baseline_accuracy"] = comp["overall"]["baseline_accuracy"]
        out["relative_improvement"] = comp["overall"]["relative_improvement"]
        text += "\n\n" + relative_table(comp, label, baseline_label)
    out["text"] = f"style classifier: {len(classifier.labels)} styles on open_clip {embedder.name}\n" + text
    return out
