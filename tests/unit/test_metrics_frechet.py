"""Fréchet distance, α-FID, KID and statistics files: exact maths against closed forms and SciPy."""
import math

import numpy as np
import pytest
import scipy.linalg

from atelier.metrics.frechet import (MetricsError, Stats, alpha_fid, frechet_distance, kid, load_stats,
                                     save_stats, stats_from_features)


def rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def closed_form_commuting(mu1, a, mu2, b):
    """W2² between N(mu1, Q diag(a) Qᵀ) and N(mu2, Q diag(b) Qᵀ): |Δμ|² + Σ (√a − √b)²."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def scipy_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's formula: sqrtm of the product, ε on the diagonal when it is singular."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("spectrum", ["well", "ill", "rank-deficient"])
def test_frechet_distance_matches_the_closed_form(spectrum):
    d = 24
    rng = np.random.default_rng(1)
    q = rotation(d, 2)
    if spectrum == "well":
        a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    elif spectrum == "ill":
        a, b = np.logspace(-12, 3, d), np.logspace(3, -12, d)
    else:
        a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
        a[d // 2:] = 0.0
        b[: d // 3] = 0.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = closed_form_commuting(mu1, a, mu2, b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_of_one_dimensional_gaussians():
    # W2² of N(m1, s1²) and N(m2, s2²) is (m1 − m2)² + (s1 − s2)²
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_agrees_with_scipy_on_random_features():
    rng = np.random.default_rng(3)
    fa = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    fb = rng.normal(size=(250, 32)) @ rng.normal(size=(32, 32)) + 0.5
    a, b = stats_from_features(fa), stats_from_features(fb)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(scipy_reference(a.mu, a.sigma, b.mu, b.sigma), rel=1e-8)
    assert ours > 1.0


def test_rank_deficient_features_need_no_epsilon():
    """Fewer images than dimensions (the usual FID case): finite, symmetric, zero against itself."""
    rng = np.random.default_rng(4)
    fa, fb = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.1
    a, b = stats_from_features(fa), stats_from_features(fb)
    ab = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert np.isfinite(ab) and ab == pytest.approx(frechet_distance(b.mu, b.sigma, a.mu, a.sigma), rel=1e-9)
    assert frechet_distance(a.mu, a.sigma, a.mu, a.sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    f = np.random.default_rng(5).normal(size=(200, 48))
    s = stats_from_features(f)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-8)


def test_alpha_fid_by_hand():
    # x = 30, y = 20: √((900 + 400 + 100)/2) = √700
    assert alpha_fid(30.0, 20.0) == pytest.approx(math.sqrt(700.0))
    assert alpha_fid(10.0, 10.0) == pytest.approx(10.0)  # balanced: equals either FID
    assert alpha_fid(0.0, 0.0) == 0.0
    assert alpha_fid(3.0, 1.0) == alpha_fid(1.0, 3.0)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(6)
    a, b, c = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 1.0
    same, _ = kid(a, b, subsets=20, subset_size=100)
    other, std = kid(a, c, subsets=20, subset_size=100)
    assert abs(same) < 0.05 < other and std >= 0


def test_fewer_than_two_images_is_an_error():
    with pytest.raises(MetricsError, match="1 image.*at least 2"):
        stats_from_features(np.zeros((1, 8)))


def test_statistics_round_trip_in_pytorch_fid_layout(tmp_path):
    s = stats_from_features(np.random.default_rng(7).normal(size=(20, 6)), extractor="x")
    path = save_stats(tmp_path / "ref.npz", s)
    with np.load(path) as z:
        assert {"mu", "sigma"} <= set(z.files)  # what pytorch-fid reads
        np.testing.assert_array_equal(z["mu"], s.mu)
    back = load_stats(path, dim=6)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert (back.n, back.extractor) == (20, "x")
    np.savez(tmp_path / "plain.npz", mu=s.mu, sigma=s.sigma)  # pytorch-fid --save-stats: only mu and sigma
    assert load_stats(tmp_path / "plain.npz").n == 0


def test_statistics_of_the_wrong_dimension_are_refused(tmp_path):
    np.savez(tmp_path / "ref768.npz", mu=np.zeros(768), sigma=np.eye(768))
    with pytest.raises(MetricsError, match="768-d features but the feature extractor gives 2048-d"):
        load_stats(tmp_path / "ref768.npz", dim=2048)


@pytest.mark.parametrize("arrays, match", [
    ({"a": np.zeros(3)}, "needs 'mu' and 'sigma'"),
    ({"mu": np.zeros(3), "sigma": np.eye(4)}, "expected \\[d\\] and \\[d, d\\]"),
])
def test_malformed_statistics_files(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MetricsError, match=match):
        load_stats(tmp_path / "bad.npz")


def test_features_npz_gives_statistics(tmp_path):
    f = np.random.default_rng(8).normal(size=(15, 5))
    np.savez(tmp_path / "feats.npz", features=f)
    s = load_stats(tmp_path / "feats.npz")
    np.testing.assert_allclose(s.mu, f.mean(0))
    assert s.n == 15 and isinstance(s, Stats)


def test_nan_statistics_are_refused():
    with pytest.raises(MetricsError, match="NaN"):
        frechet_distance([0.0, np.nan], np.eye(2), [0.0, 0.0], np.eye(2))
