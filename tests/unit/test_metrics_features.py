"""Image decoding, the folder feature cache (hash keys, no re-reads, resume, skips) and the real Inception
loading path (random weights in the FID file's layout through torchmetrics)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.metrics import features as F
from atelier.metrics import fid, images, inception
from atelier.metrics.frechet import MetricsError
from atelier.tests.fixtures.tiny_clip import make_wikiart_folder
from atelier.tests.fixtures.tiny_inception import tiny_extractor, write_random_inception


class CountingExtractor:
    """Wraps an extractor and counts the images it was given."""

    def __init__(self, inner, interrupt_after=None):
        self.inner, self.key, self.dim, self.seen = inner, inner.key, inner.dim, 0
        self.interrupt_after = interrupt_after

    def __call__(self, batch):
        if self.interrupt_after is not None and self.seen >= self.interrupt_after:
            raise KeyboardInterrupt
        self.seen += int(batch.shape[0])
        return self.inner(batch)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_modes_decode_to_rgb8(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((9, 7), 10, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(images.read_rgb8(tmp_path / "rgba.png"), rgb)  # alpha dropped
    grey = images.read_rgb8(tmp_path / "grey.png")
    assert grey.shape == (9, 7, 3) and (grey == rgb[..., :1]).all()
    # 16-bit greyscale is scaled by its range, not clipped to white as PIL's convert("RGB") would
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    np.testing.assert_array_equal(images.read_rgb8(tmp_path / "grey16.png")[..., 0], rgb[..., 0])


def test_corrupt_image_raises_naming_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(images.UnreadableImage, match="broken.png"):
        images.read_rgb8(tmp_path / "broken.png")


def test_comfy_batches_round_like_saveimage():
    x = torch.tensor([[[[0.0, 0.5, 1.0], [0.999, 0.0011, 2.0]]]])  # [1, 1, 2, 3]
    out = images.comfy_to_uint8(x)
    assert out.shape == (1, 3, 1, 2) and out.dtype == torch.uint8
    expected = np.clip(255.0 * x.numpy(), 0, 255).astype(np.uint8)  # what SaveImage writes
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).numpy(), expected)
    grey = images.comfy_to_uint8(torch.full((2, 4, 4, 1), 0.5))
    assert grey.shape == (2, 3, 4, 4) and int(grey[1, 2, 0, 0]) == 127


def test_mixed_sizes_are_batched_per_size():
    ex = CountingExtractor(tiny_extractor())
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(20, 30, 3), (40, 40, 3), (20, 30, 3)]]
    feats = F.extract_arrays(ex, arrays, batch_size=8)
    one_by_one = np.concatenate([F.extract_arrays(ex, [a]) for a in arrays])
    np.testing.assert_allclose(feats, one_by_one, rtol=1e-5, atol=1e-6)


def test_second_run_reads_no_image(tmp_path, cache, monkeypatch):
    make_wikiart_folder(tmp_path / "ref", n=9)
    ex = CountingExtractor(tiny_extractor())
    first = F.folder_features(tmp_path / "ref", ex, batch_size=4, chunk_size=4)
    assert (len(first), first.extracted, first.hashed, ex.seen) == (9, 9, 9, 9)
    opened = []
    monkeypatch.setattr(F, "read_rgb8", lambda p: opened.append(p))
    monkeypatch.setattr(F, "file_sha256", lambda p: opened.append(p))
    second = F.folder_features(tmp_path / "ref", ex, batch_size=4)
    assert opened == [] and ex.seen == 9 and (second.cached, second.extracted, second.hashed) == (9, 0, 0)
    np.testing.assert_array_equal(first.features, second.features)
    assert len(os.listdir(F.FeatureCache(tmp_path / "ref", ex.key).dir)) <= 3  # chunks compacted into one


def test_changed_and_new_files_are_redone_by_content(tmp_path, cache):
    make_wikiart_folder(tmp_path / "ref", n=6)
    ex = CountingExtractor(tiny_extractor())
    F.folder_features(tmp_path / "ref", ex)
    rel = sorted(images.folder_images(tmp_path / "ref"))[0]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ref" / rel)  # changed content
    Image.open(tmp_path / "ref" / rel).save(tmp_path / "ref" / "copy_of_changed.png")  # same content, new name
    again = F.folder_features(tmp_path / "ref", ex)
    assert ex.seen == 7 and again.extracted == 1 and len(again) == 7  # the duplicate shares the new row


def test_interrupted_extraction_resumes(tmp_path, cache):
    make_wikiart_folder(tmp_path / "big", n=10)
    ex = CountingExtractor(tiny_extractor(), interrupt_after=4)
    with pytest.raises(KeyboardInterrupt):
        F.folder_features(tmp_path / "big", ex, batch_size=2, chunk_size=4)
    assert ex.seen == 4
    resumed = CountingExtractor(tiny_extractor())
    out = F.folder_features(tmp_path / "big", resumed, batch_size=2, chunk_size=4)
    assert resumed.seen == 6 and len(out) == 10
    fresh = F.folder_features(tmp_path / "big", tiny_extractor(), cache=False)
    np.testing.assert_allclose(out.features, fresh.features, rtol=1e-5, atol=1e-6)


def test_corrupt_file_in_folder_is_skipped_counted_and_remembered(tmp_path, cache):
    make_wikiart_folder(tmp_path / "ref", n=4)
    (tmp_path / "ref" / "broken.jpg").write_bytes(b"not a jpeg at all")
    ex = CountingExtractor(tiny_extractor())
    out = F.folder_features(tmp_path / "ref", ex)
    assert len(out) == 4 and [s["path"] for s in out.skipped] == ["broken.jpg"]
    assert "not a readable image" in out.skipped[0]["reason"]
    again = F.folder_features(tmp_path / "ref", ex)
    assert [s["path"] for s in again.skipped] == ["broken.jpg"] and again.hashed == 0
    s = fid.image_set(str(tmp_path / "ref"), ex)
    assert any("1 unreadable file(s) skipped (broken.jpg)" in w for w in fid.warnings_for(ex, s))


def test_folder_with_one_readable_image_is_an_error(tmp_path, cache):
    make_wikiart_folder(tmp_path / "one", n=1)
    (tmp_path / "one" / "bad.png").write_bytes(b"junk")
    with pytest.raises(MetricsError, match="1 readable image.*bad.png.*at least 2"):
        fid.image_set(str(tmp_path / "one"), tiny_extractor())


def test_batch_of_one_image_is_an_error():
    with pytest.raises(MetricsError, match="1 image.*at least 2"):
        fid.image_set(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), tiny_extractor())


def test_fid_of_folder_against_its_statistics_and_itself(tmp_path, cache):
    make_wikiart_folder(tmp_path / "a", n=12)
    make_wikiart_folder(tmp_path / "b", n=9, size=40)
    ex = tiny_extractor()
    fid.write_stats(str(tmp_path / "a"), tmp_path / "a.npz", ex)
    assert fid.fid(str(tmp_path / "a"), str(tmp_path / "a.npz"), ex)["fid"] == pytest.approx(0.0, abs=1e-6)
    res = fid.fid(str(tmp_path / "b"), str(tmp_path / "a"), ex, with_kid=True, kid_subsets=5)
    assert res["fid"] > 1e-4 and (res["n_a"], res["n_b"]) == (9, 12) and "kid" in res
    assert any("few images" in w for w in res["warnings"])
    with pytest.raises(MetricsError, match="KID needs the features"):
        fid.fid(str(tmp_path / "b"), str(tmp_path / "a.npz"), ex, with_kid=True)
    a = fid.alpha_fid_sets(str(tmp_path / "b"), str(tmp_path / "a"), str(tmp_path / "a.npz"), ex)
    assert a["x"] == pytest.approx(a["y"]) and a["alpha_fid"] == pytest.approx(a["x"])


def test_statistics_from_another_extractor_are_flagged(tmp_path, cache):
    make_wikiart_folder(tmp_path / "a", n=5)
    fid.write_stats(str(tmp_path / "a"), tmp_path / "a.npz", tiny_extractor(seed=1))
    res = fid.fid(str(tmp_path / "a"), str(tmp_path / "a.npz"), tiny_extractor(seed=0))
    assert any("computed with tiny-inception-16-1" in w for w in res["warnings"])


@pytest.mark.parametrize("suffix, dim", [(".pth", 2048), (".safetensors", 64)])
def test_random_inception_in_the_file_layout_loads_and_gives_features(tmp_path, cache, suffix, dim):
    """The real path: torchvision's Inception3 layout (the FID file's), read safely, loaded by torchmetrics'
    NoTrainInceptionV3 through feature_extractor_weights_path."""
    path = write_random_inception(tmp_path / f"weights-inception-2015-12-05-6726825d{suffix}")
    ex = inception.load_inception(path, dim=dim)
    feats = ex(torch.randint(0, 256, (2, 3, 37, 45), dtype=torch.uint8))
    assert feats.shape == (2, dim) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert ex.key.startswith("inception-") and ex.key.endswith(f"-{dim}-tf-bilinear")
    assert not list((cache / "metrics").glob("inception-*"))  # the checked copy handed to torchmetrics is gone


def test_inception_file_of_another_layout_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(10, 2048)}, str(tmp_path / "not_inception.safetensors"))
    with pytest.raises(MetricsError, match="not the FID Inception: .*missing tensor.*weights-inception-2015-12-05"):
        inception.load_inception(tmp_path / "not_inception.safetensors")


def test_pickles_with_code_are_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(MetricsError, match="cannot read 'evil.pth'"):
        inception.load_inception(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_missing_inception_names_the_file(tmp_path):
    with pytest.raises(MetricsError, match="weights-inception-2015-12-05-6726825d.pth.*models/atelier_fid"):
        inception.load_inception(tmp_path / "nothing.pth")
