"""FID, KID and α-FID between image sets: folders (through the feature cache), in-memory batches, or
statistics/feature ``.npz`` files.

An image set is given as a folder path, an ``.npz`` path (``mu``/``sigma``, pytorch-fid's layout, or
``features``), a uint8 tensor [B, 3, H, W] (see ``images.comfy_to_uint8``), or an already computed
:class:`ImageSet`. Every result carries the sizes of its sets and the warnings that belong with the number
(too few images for FID to be comparable, statistics from another extractor, skipped files).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..common.progress import NO_PROGRESS
from .features import extract_batch, folder_features
from .frechet import (MIN_IMAGES_RELIABLE, MetricsError, Stats, alpha_fid, check_dim, fid_from_stats, kid,
                      load_stats, save_stats, stats_from_features)


@dataclass
class ImageSet:
    """One side of a comparison: its statistics, its features when known (KID needs them), a label."""

    label: str
    stats: Stats
    features: Optional[np.ndarray] = None
    skipped: list = field(default_factory=list)
    note: str = ""

    @property
    def n(self):
        return int(self.stats.n)


def image_set(spec, extractor, label=None, batch_size=32, progress=NO_PROGRESS, cache=True, cache_root=None,
              log=None):
    """Resolve a set given as folder, ``.npz``, uint8 tensor or ImageSet (see the module docstring)."""
    if isinstance(spec, ImageSet):
        check_dim(spec.stats, extractor.dim)
        return spec
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        name = label or path
        if os.path.isdir(path):
            ff = folder_features(path, extractor, batch_size=batch_size, progress=progress, cache=cache,
                                 cache_root=cache_root, log=log)
            if len(ff) < 2:
                skipped = f" ({len(ff.skipped)} unreadable file(s) skipped, e.g. {ff.skipped[0]['path']})" \
                    if ff.skipped else ""
                raise MetricsError(f"folder '{path}' has {len(ff)} readable image(s){skipped}; FID needs at least "
                                   "2 (the covariance of one image is undefined)")
            stats = stats_from_features(ff.features, extractor.key, path)
            return ImageSet(name, stats, ff.features, ff.skipped, ff.summary())
        if path.lower().endswith(".npz"):
            stats = load_stats(path, dim=extractor.dim)
            features = None
            with np.load(path, allow_pickle=False) as z:
                if "features" in z.files:
                    features = np.asarray(z["features"], np.float32)
            note = f"statistics of {stats.n or 'an unknown number of'} image(s) from {os.path.basename(path)}"
            return ImageSet(name, stats, features, [], note)
        if os.path.exists(path):
            raise MetricsError(f"'{path}' is neither a folder of images nor a statistics .npz file")
        raise MetricsError(f"'{path}' not found: give a folder of images or a statistics .npz file")
    if hasattr(spec, "shape") and hasattr(spec, "dtype"):
        if int(spec.shape[0]) < 2:
            raise MetricsError(f"{label or 'the image batch'} has {int(spec.shape[0])} image(s); FID needs at "
                               "least 2 (the covariance of one image is undefined). Generate a larger batch.")
        feats = extract_batch(extractor, spec, batch_size, progress)
        return ImageSet(label or "images", stats_from_features(feats, extractor.key, label or "images"), feats,
                        [], f"{len(feats)} image(s) in the batch")
    raise MetricsError(f"cannot use {type(spec).__name__} as an image set: give a folder, a .npz file or images")


def warnings_for(extractor, *sets):
    """What a reader of the numbers must know: small sets, statistics from another extractor, skips."""
    out = []
    small = [s for s in sets if 0 < s.n < MIN_IMAGES_RELIABLE]
    if small:
        sizes = ", ".join(f"{s.label}: {s.n}" for s in small)
        out.append(f"few images ({sizes}): FID is biased upwards below about {MIN_IMAGES_RELIABLE} images per set "
                   "and only comparable with FID from sets of the same sizes")
    for s in sets:
        if s.stats.extractor and s.stats.extractor != extractor.key:
            out.append(f"{s.label}: its statistics were computed with {s.stats.extractor}, not {extractor.key}; "
                       "numbers from different feature extractors or resize modes do not compare")
        if s.skipped:
            names = ", ".join(x["path"] for x in s.skipped[:3])
            out.append(f"{s.label}: {len(s.skipped)} unreadable file(s) skipped ({names}"
                       f"{' ...' if len(s.skipped) > 3 else ''})")
    return out


def fid(a, b, extractor, with_kid=False, kid_subsets=100, kid_subset_size=1000, **kwargs):
    """FID between sets ``a`` and ``b``: {"fid", "n_a", "n_b", "warnings"} (+ "kid", "kid_std")."""
    sa = image_set(a, extractor, **kwargs)
    sb = image_set(b, extractor, **kwargs)
    out = {"fid": fid_from_stats(sa.stats, sb.stats), "n_a": sa.n, "n_b": sb.n, "a": sa.label, "b": sb.label}
    if with_kid:
        if sa.features is None or sb.features is None:
            raise MetricsError("KID needs the features of both sets, not only their mean and covariance: give "
                               "folders, images, or .npz files with 'features'")
        out["kid"], out["kid_std"] = kid(sa.features, sb.features, kid_subsets, kid_subset_size)
    out["warnings"] = warnings_for(extractor, sa, sb)
    return out


def alpha_fid_sets(g, i1, i2, extractor, **kwargs):
    """α-FID of generated set ``g`` against reference sets ``i1``, ``i2``: {"alpha_fid", "x", "y", ...}."""
    sg = image_set(g, extractor, **kwargs)
    s1 = image_set(i1, extractor, **kwargs)
    s2 = image_set(i2, extractor, **kwargs)
    x, y = fid_from_stats(sg.stats, s1.stats), fid_from_stats(sg.stats, s2.stats)
    return {"alpha_fid": alpha_fid(x, y), "x": x, "y": y, "n_g": sg.n, "n_1": s1.n, "n_2": s2.n,
            "g": sg.label, "i1": s1.label, "i2": s2.label, "warnings": warnings_for(extractor, sg, s1, s2)}


def write_stats(spec, out_path, extractor, **kwargs):
    """Compute a set's statistics and save them (pytorch-fid's .npz layout plus n and extractor)."""
    s = image_set(spec, extractor, **kwargs)
    save_stats(out_path, s.stats)
    return {"stats": os.fspath(out_path), "n": s.n, "dim": s.stats.dim, "warnings": warnings_for(extractor, s)}


def fid_table(rows):
    """Plain-text table of FID rows: (label, fid, n) ..."""
    width = max([len("set")] + [len(r[0]) for r in rows])
    lines = [f"{'set':<{width}}  {'FID':>9}  {'images':>6}"]
    lines += [f"{label:<{width}}  {value:>9.3f}  {n:>6}" for label, value, n in rows]
    return "\n".join(lines)
