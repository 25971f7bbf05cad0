"""Gaussian statistics of feature sets, the Fréchet distance between them (FID), α-FID and KID.

FID is the squared 2-Wasserstein distance between two Gaussians fitted to feature sets:
``|μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)``. The trace of the matrix square root is computed from
the eigenvalues of the symmetric positive semi-definite matrix ``Σ₁^½ Σ₂ Σ₁^½`` (float64, round-off below
zero clipped), so rank-deficient and ill-conditioned covariances (fewer images than feature dimensions, the
usual case) need no ε added to the diagonal, unlike ``scipy.linalg.sqrtm(Σ₁ Σ₂)``.

Statistics files are ``.npz`` with ``mu`` [d] and ``sigma`` [d, d], the layout of pytorch-fid (``--save-stats``)
and of published reference statistics; this package adds ``n`` (the number of images) and ``extractor`` (what
computed the features), which other tools ignore.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..common.files import atomic_write

# Below this many images per set FID is dominated by its bias (it shrinks like 1/n): numbers from sets of
# different sizes cannot be compared, and with fewer images than feature dimensions the covariance is
# rank-deficient. 2048 matches the feature dimension; the FID literature uses 10k-50k.
MIN_IMAGES_RELIABLE = 2048


class MetricsError(ValueError):
    """An input a metric cannot use; the message says what was wrong and how to fix it."""


@dataclass
class Stats:
    """Mean and covariance of a feature set (n images; ``extractor`` names what computed the features)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0
    extractor: str = ""
    source: str = ""

    @property
    def dim(self):
        return int(self.mu.shape[0])


def stats_from_features(features, extractor="", source=""):
    """Stats of a [n, d] feature array (unbiased covariance, float64); needs n ≥ 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise MetricsError(f"features must be a [n, d] array, got shape {f.shape}")
    if f.shape[0] < 2:
        raise MetricsError(f"{source or 'the image set'} has {f.shape[0]} image(s); FID needs at least 2 (the "
                           "covariance of one sample is undefined), and thousands for a meaningful value")
    return Stats(f.mean(axis=0), np.cov(f, rowvar=False), int(f.shape[0]), extractor, source)


def save_stats(path, stats):
    """Write a pytorch-fid compatible ``.npz`` (mu, sigma, plus n and extractor) atomically."""
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez(handle, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(stats.extractor))

    atomic_write(path, write)
    return path


def load_stats(path, dim=None):
    """Stats from an ``.npz`` with ``mu``/``sigma`` (pytorch-fid layout) or with ``features`` [n, d]."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsError(f"statistics file not found: '{path}'")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MetricsError(f"'{path}' is not a readable .npz statistics file ({exc})") from None
    with data:
        keys = set(data.files)
        extractor = str(data["extractor"]) if "extractor" in keys else ""
        if {"mu", "sigma"} <= keys:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            n = int(data["n"]) if "n" in keys else 0
            stats = Stats(mu, sigma, n, extractor, path)
        elif "features" in keys:
            stats = stats_from_features(data["features"], extractor, path)
        else:
            raise MetricsError(f"'{path}' has the arrays {sorted(keys)}; a statistics file needs 'mu' and 'sigma' "
                               "(pytorch-fid's layout) or 'features' [n, d]")
    if stats.mu.ndim != 1 or stats.sigma.shape != (stats.dim, stats.dim):
        raise MetricsError(f"'{path}': mu has shape {stats.mu.shape} and sigma {stats.sigma.shape}; expected [d] "
                           "and [d, d]")
    check_dim(stats, dim)
    return stats


def check_dim(stats, dim):
    if dim is not None and stats.dim != dim:
        raise MetricsError(f"{stats.source or 'the statistics'} hold {stats.dim}-d features but the feature "
                           f"extractor gives {dim}-d ones: use statistics computed with the same Inception "
                           "features (2048-d pool features for FID), or recompute them from the images")


def _sqrt_psd(matrix):
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """``|μ₁−μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½`` in float64, never negative."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise MetricsError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma "
                           f"{sigma1.shape} vs {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all() and np.isfinite(mu1).all()
            and np.isfinite(mu2).all()):
        raise MetricsError("the statistics contain NaN or infinite values (a broken feature extractor or file)")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def fid_from_stats(a, b):
    check_dim(b, a.dim)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def alpha_fid(x, y):
    """α-FID = √([x² + y² + (x − y)²] / 2) with x = FID(G, I⁽¹⁾), y = FID(G, I⁽²⁾) (eq. 6; smaller is better)."""
    x, y = float(x), float(y)
    return math.sqrt((x * x + y * y + (x - y) ** 2) / 2.0)


def kid(features_a, features_b, subsets=100, subset_size=1000, degree=3, gamma=None, coef=1.0, seed=0):
    """Kernel Inception Distance (polynomial-kernel MMD², torchmetrics' kernel) over random subsets:
    (mean, std). ``subset_size`` is cut to the smaller set's size; needs 2 images per set."""
    import torch
    from torchmetrics.image.kid import poly_mmd

    fa = torch.as_tensor(np.asarray(features_a), dtype=torch.float64)
    fb = torch.as_tensor(np.asarray(features_b), dtype=torch.float64)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise MetricsError(f"KID needs two [n, d] feature sets of the same d, got {tuple(fa.shape)} and "
                           f"{tuple(fb.shape)}")
    size = min(int(subset_size), fa.shape[0], fb.shape[0])
    if size < 2:
        raise MetricsError("KID needs at least 2 images in each set")
    gen = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(max(1, int(subsets))):
        ia = torch.randperm(fa.shape[0], generator=gen)[:size]
        ib = torch.randperm(fb.shape[0], generator=gen)[:size]
        values.append(float(poly_mmd(fa[ia], fb[ib], degree=degree, gamma=gamma, coef=coef)))
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1) if len(arr) > 1 else 0.0)
