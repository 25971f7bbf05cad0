"""Folder walk, WikiArt names, captions, CLIP filter, buckets, latent cache and batch sharding."""
import os

import pytest
import torch
from PIL import Image

from atelier.training import data as D
from atelier.tests.fixtures.progress import RecordingProgress
from atelier.tests.fixtures.training_toys import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _img(path, w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_wikiart_names_are_read_relative_to_the_data_folder():
    """The style is the folder under the data root (the root's own name is not a style)."""
    got = D.parse_wikiart_name("/data/Impressionism/claude-monet_water-lilies-1916.jpg", "/data")
    assert {k: got[k] for k in ("artist", "style", "title", "year")} == \
        {"artist": "Claude Monet", "style": "Impressionism", "title": "Water Lilies", "year": "1916"}
    assert D.parse_wikiart_name("/data/Impressionism/x.png", "/data/Impressionism")["style"] == ""


def test_captions_from_template_sidecar_or_both():
    meta = {"artist": "Claude Monet", "style": "Impressionism", "year": "1916", "genre": ""}
    assert D.fill_template(D.DEFAULT_TEMPLATE, meta) == "a painting by Claude Monet, Impressionism, 1916"
    assert D.fill_template(D.DEFAULT_TEMPLATE, {**meta, "genre": "landscape", "year": ""}) == \
        "a landscape painting by Claude Monet, Impressionism"
    assert D.fill_template(D.DEFAULT_TEMPLATE, {"style": "Cubism"}) == "a painting, Cubism"
    assert D.build_caption(meta, "ponds\n", "sidecar", D.DEFAULT_TEMPLATE) == "ponds"
    assert D.build_caption(meta, "ponds", "both", "{artist}") == "Claude Monet, ponds"
    assert D.build_caption(meta, None, "both", "{artist}", trigger="mnt") == "mnt, Claude Monet"
    with pytest.raises(D.DataError, match="caption mode"):
        D.build_caption(meta, None, "tags", "{artist}")


def test_scan_folder_wikiart_layout(tmp_path):
    _img(str(tmp_path / "Impressionism" / "claude-monet_haystacks-1891.jpg"), 80, 64)
    _img(str(tmp_path / "Impressionism" / "claude-monet_rouen-1894.png"), 64, 64, seed=1)
    (tmp_path / "Impressionism" / "claude-monet_rouen-1894.txt").write_text("a cathedral facade")
    (tmp_path / "Impressionism" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "meta.csv").write_text("path,genre\nImpressionism/claude-monet_haystacks-1891.jpg,landscape\n")
    res = D.scan_folder(str(tmp_path), 64, metadata_file=str(tmp_path / "meta.csv"))
    caps = sorted(s.caption for s in res.samples)
    assert caps == ["a landscape painting by Claude Monet, Impressionism, 1891",
                    "a painting by Claude Monet, Impressionism, 1894, a cathedral facade"]
    assert [os.path.basename(p) for p, _ in res.skipped] == ["broken.jpg"]
    assert "unreadable" in res.skipped[0][1]
    assert all(len(s.content_hash) == 64 for s in res.samples)


def test_scan_folder_bad_inputs(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.scan_folder(str(tmp_path / "missing"), 64)
    with pytest.raises(D.DataError, match="no images"):
        D.scan_folder(str(tmp_path), 64)
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="no usable images.*unreadable"):
        D.scan_folder(str(tmp_path), 64)
    _img(str(tmp_path / "small" / "x_tiny-1900.jpg"), 40, 30)
    with pytest.raises(D.DataError, match=r"smaller than the training resolution 64x64: small.x_tiny-1900.jpg \(40x30\)"):
        D.scan_folder(str(tmp_path), 64, small_images="error")
    with pytest.raises(D.DataError, match="no usable"):
        D.scan_folder(str(tmp_path), 64)  # skipping small images is the default
    with pytest.raises(D.DataError, match="smaller than the training resolution"):
        D.scan_folder(str(tmp_path), 64, small_images="error")
    assert len(D.scan_folder(str(tmp_path), 64, small_images="upscale").samples) == 1


def test_buckets():
    buckets = D.make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0 for w, h in buckets)
    assert D.nearest_bucket(1000, 500, buckets) == max(buckets, key=lambda b: b[0] / b[1])
    assert D.nearest_bucket(500, 1000, buckets) == max(buckets, key=lambda b: b[1] / b[0])
    assert D.nearest_bucket(600, 400, buckets) == (640, 384)  # 1.5 vs 1.67 (640x384) and 1.33 (576x448)
    assert D.nearest_bucket(300, 300, buckets) == (512, 512)
    with pytest.raises(D.DataError):
        D.make_buckets(500, 64)


def test_latent_cache_keys_and_reuse(tmp_path):
    _img(str(tmp_path / "d" / "a_b-1900.png"), 64, 64)
    samples = D.scan_folder(str(tmp_path / "d"), 64).samples
    D.assign_buckets(samples, 64)
    calls = []

    def encode(images):
        calls.append(images.shape)
        return images[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4] * 2

    cache = str(tmp_path / "cache")
    first = D.cache_latents(samples, encode, cache, "vae1").items[0].latent
    again = D.cache_latents(samples, encode, cache, "vae1").items[0].latent
    assert len(calls) == 1 and torch.equal(first, again) and first.shape == (4, 8, 8)
    D.cache_latents(samples, encode, cache, "vae2")  # another VAE never reuses stale latents
    assert len(calls) == 2 and len(os.listdir(cache)) == 2
    assert all(n.endswith(".safetensors") for n in os.listdir(cache))
    img = D.load_image(samples[0].path, (64, 64))
    torch.testing.assert_close(first, encode(img[None])[0])


def _encode(images):
    return images[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]


def test_flip_caches_the_mirrored_latent_and_crop_the_cover_latent(tmp_path):
    """--flip: the second latent is the encoding of the mirrored image; --random-crop: the cached latent covers the
    whole resized image and each view is a bucket-sized window of it."""
    _img(str(tmp_path / "d" / "a_wide-1900.png"), 96, 64)
    samples = D.scan_folder(str(tmp_path / "d"), 64).samples
    D.assign_buckets(samples, 64, use_buckets=False)  # square 64x64 bucket for a 3:2 image
    cached = D.cache_latents(samples, _encode, str(tmp_path / "c"), "v", flip=True, crop=True)
    item = cached.items[0]
    img = D.load_image(samples[0].path, (64, 64), cover=True)
    assert img.shape == (3, 64, 96) and item.latent.shape == (4, 8, 12) and item.size == (8, 8)
    torch.testing.assert_close(item.latent, _encode(img[None])[0])
    torch.testing.assert_close(item.flipped, _encode(img.flip(-1)[None])[0], atol=1e-6, rtol=0)
    assert torch.equal(item.view(False, 0.0, 0.0), item.latent[:, :, 0:8])
    assert torch.equal(item.view(False, 0.0, 0.99), item.latent[:, :, 4:12])
    assert torch.equal(item.view(True, 0.0, 0.5), item.flipped[:, :, 2:10])
    plain = D.cache_latents(samples, _encode, str(tmp_path / "c"), "v").items[0]
    assert plain.latent.shape == (4, 8, 8) and plain.flipped is None
    assert len(os.listdir(tmp_path / "c")) == 3  # cover, cover+flip, centre crop: separate cache entries


def test_truncated_jpeg_is_skipped_with_a_reason_not_a_crash(tmp_path):
    _img(str(tmp_path / "d" / "a_good-1900.jpg"), 64, 64)
    _img(str(tmp_path / "d" / "a_cut-1901.jpg"), 64, 64, seed=3)
    data = (tmp_path / "d" / "a_cut-1901.jpg").read_bytes()
    (tmp_path / "d" / "a_cut-1901.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact, data cut
    samples = D.scan_folder(str(tmp_path / "d"), 64).samples
    D.assign_buckets(samples, 64)
    cached = D.cache_latents(samples, _encode, str(tmp_path / "c"), "v")
    assert [os.path.basename(s.path) for s in cached.samples] == ["a_good-1900.jpg"]
    assert [os.path.basename(p) for p, _ in cached.skipped] == ["a_cut-1901.jpg"]
    assert "unreadable image" in cached.skipped[0][1] and "truncated" in cached.skipped[0][1]


def test_latent_cache_progress_and_interrupt_keep_what_was_cached(tmp_path):
    for i in range(3):
        _img(str(tmp_path / "d" / f"a_b{i}-1900.png"), 64, 64, seed=i)
    samples = D.scan_folder(str(tmp_path / "d"), 64).samples
    D.assign_buckets(samples, 64)

    def encode(images):
        return images[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]

    cache = str(tmp_path / "cache")
    stop = RecordingProgress(stop_at=3, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        D.cache_latents(samples, encode, cache, "vae", stop)
    assert stop.updates == [(1, 3), (2, 3)] and len(os.listdir(cache)) == 2  # whole files only
    seen = RecordingProgress()
    D.cache_latents(samples, encode, cache, "vae", seen)
    assert seen.updates == [(1, 3), (2, 3), (3, 3)] and len(os.listdir(cache)) == 3


def test_batch_sampler_shards_like_a_doubled_batch():
    buckets = [(64, 64)] * 5 + [(128, 32)] * 3
    one = D.BucketBatchSampler(buckets, 4, seed=3)
    two = [D.BucketBatchSampler(buckets, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    accum = D.BucketBatchSampler(buckets, 1, seed=3, rank=1, world_size=2, accum=2)
    for step in range(7):
        gb, _ = one.batch_at(step)
        assert two[0].local(two[0].batch_at(step)[0]) + two[1].local(two[1].batch_at(step)[0]) == gb
        assert [accum.local(accum.batch_at(step)[0], m) for m in (0, 1)] == [gb[1:2], gb[3:4]]
        assert len({buckets[i] for i in gb}) == 1  # one bucket per batch
    epoch = one.epoch_batches(0)
    assert sorted({i for b in epoch for i in b}) == list(range(8))  # nothing dropped
    assert one.batch_at(one.batches_per_epoch())[1] == 1


class TinyClip:
    """ATELIER_CLIP-contract adapter around a tiny random open_clip model (what retrieval.embedder provides)."""

    def __init__(self):
        import open_clip
        torch.manual_seed(0)
        self.model = open_clip.CLIP(
            embed_dim=16,
            vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
        self.image_size = 32

    @torch.no_grad()
    def encode_text(self, texts):
        return torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(texts)).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images):
        x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        mean = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
        std = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)
        return torch.nn.functional.normalize(self.model.encode_image((x - mean) / std).float(), dim=-1)


def test_clip_filter_on_tiny_random_clip(tmp_path):
    for i in range(5):
        _img(str(tmp_path / "Style" / f"some-artist_work-{i}-19{10 + i}.png"), 40, 40, seed=i)
    samples = D.scan_folder(str(tmp_path), 32).samples
    clip = TinyClip()
    imgs = torch.stack([D.load_image(s.path, (32, 32)) for s in samples])
    reference = (clip.encode_image(imgs) * clip.encode_text([s.caption for s in samples])).sum(-1)
    threshold = float(reference.median())
    kept, dropped = D.clip_filter(samples, clip, threshold, batch_size=2)
    assert {s.path for s in kept} == {s.path for s, r in zip(samples, reference) if r >= threshold}
    assert sorted(sc for _, sc in dropped) == pytest.approx(sorted(r for r in reference.tolist() if r < threshold),
                                                            abs=1e-5)
    assert 0 < len(dropped) < len(samples)
    assert len(D.clip_filter(samples, clip, -1.0)[0]) == 5 and len(D.clip_filter(samples, clip, 1.01)[1]) == 5
