"""CLIP score: 100 · max(cos(E_image, E_text), 0) between each image and its prompt (Hessel et al.'s
CLIPScore without its w = 2.5 rescaling, as torchmetrics defines it), with the pack's open_clip loader."""
from __future__ import annotations

import os

import numpy as np

from ..common.progress import NO_PROGRESS
from .features import ClipImageFeatures, extract_arrays, extract_batch
from .frechet import MetricsError
from .images import UnreadableImage, folder_images, read_rgb8


def pair_prompts(prompts, n):
    """One prompt per image: a single prompt is used for every image; otherwise the counts must match."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if not prompts or not any(p.strip() for p in prompts):
        raise MetricsError("CLIP score needs a prompt: give one for all images, or one per image")
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise MetricsError(f"{len(prompts)} prompts for {n} images: give one prompt for all images, or exactly one "
                           "per image (in the images' order)")
    return prompts


def scores_from_embeddings(image_emb, text_emb):
    """100 · max(cos, 0) row by row (both [n, d]; normalised here)."""
    a = np.asarray(image_emb, np.float64)
    b = np.asarray(text_emb, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return 100.0 * np.clip((a * b).sum(axis=1), 0.0, None)


def clip_scores(embedder, images_uint8, prompts, batch_size=32, progress=NO_PROGRESS):
    """CLIP scores [B] of a uint8 [B, 3, H, W] batch (or a list of uint8 [H, W, 3] arrays) and prompts."""
    extractor = ClipImageFeatures(embedder, batch_size)
    if isinstance(images_uint8, list):
        emb = extract_arrays(extractor, images_uint8, batch_size, progress)
    else:
        emb = extract_batch(extractor, images_uint8, batch_size, progress)
    prompts = pair_prompts(prompts, len(emb))
    text = embedder.encode_text(prompts, batch_size=batch_size).float().cpu().numpy()
    return scores_from_embeddings(emb, text)


def folder_clip_scores(embedder, folder, prompts, batch_size=32, progress=NO_PROGRESS):
    """(paths, scores, skipped) for the images of a folder; ``prompts`` is one text, a list in file order, or a
    {relative path or file name or stem: prompt} mapping."""
    rels = folder_images(folder)
    arrays, paths, skipped = [], [], []
    for rel in rels:
        try:
            arrays.append(read_rgb8(os.path.join(folder, rel)))
            paths.append(rel)
        except UnreadableImage as exc:
            skipped.append({"path": rel, "reason": str(exc).split(": ", 1)[-1]})
    if not paths:
        raise MetricsError(f"no readable image in '{folder}'")
    if isinstance(prompts, dict):
        missing = [p for p in paths if _lookup(prompts, p) is None]
        if missing:
            raise MetricsError(f"no prompt for {len(missing)} image(s), e.g. {missing[0]}: the prompts table needs a "
                               "row per image (by relative path, file name or stem)")
        prompts = [_lookup(prompts, p) for p in paths]
    elif isinstance(prompts, list) and len(prompts) == len(rels) and len(paths) != len(rels):
        prompts = [p for p, rel in zip(prompts, rels) if rel in set(paths)]
    return paths, clip_scores(embedder, arrays, prompts, batch_size, progress), skipped


def _lookup(table, rel):
    base = os.path.basename(rel)
    for key in (rel, base, os.path.splitext(base)[0]):
        if key in table:
            return table[key]
    return None


def score_table(labels, prompts, scores):
    """Readable table: image, CLIP score, prompt; then mean ± standard deviation."""
    scores = np.asarray(scores, np.float64)
    width = max([5] + [len(x) for x in labels])
    lines = [f"{'image':<{width}}  {'CLIP score':>10}  prompt"]
    for label, prompt, s in zip(labels, prompts, scores):
        short = prompt if len(prompt) <= 70 else prompt[:67] + "..."
        lines.append(f"{label:<{width}}  {s:>10.2f}  {short}")
    lines.append(summary_line(scores))
    return "\n".join(lines)


def summary_line(scores, label="mean"):
    scores = np.asarray(scores, np.float64)
    std = scores.std(ddof=1) if len(scores) > 1 else 0.0
    return f"{label}: {scores.mean():.2f} ± {std:.2f} over {len(scores)} image(s)"
