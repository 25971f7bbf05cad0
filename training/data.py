"""Training data: folder walk, WikiArt names, captions, CLIP filter, aspect buckets, cached latents, batches.

Pure (PIL + torch + safetensors). The VAE and the CLIP embedder come in as plain callables/objects, so
everything here is tested without ComfyUI.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..common.artdata import IMAGE_EXTS, MetadataError, load_metadata_table, parse_wikiart, row_metadata
from ..common.files import atomic_write, file_sha256
from ..common.progress import NO_PROGRESS, Progress

DEFAULT_TEMPLATE = "a {genre} painting by {artist}, {style}, {year}"
MANIFEST = ".atelier_captions.json"  # what python -m training caption wrote into a data folder
CAPTION_MODES = ("template", "sidecar", "both")


class DataError(ValueError):
    """Bad training data: the message says what is wrong and how to fix it."""


@dataclass
class Sample:
    path: str
    caption: str
    meta: dict
    width: int
    height: int
    content_hash: str
    bucket: tuple[int, int] | None = None


@dataclass
class ScanResult:
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# ---------------------------------------------------------------- names and captions
def parse_wikiart_name(path: str, root: str) -> dict:
    """``root/Impressionism/claude-monet_water-lilies-1916.jpg`` → artist, style, title, year, genre.

    WikiArt stores one folder per style and ``artist-slug_title-slug-year.ext``; other names still get a
    title, and no artist. (The parsing is common.artdata's, shared with the style databases.)
    """
    return parse_wikiart(os.path.relpath(path, root).replace(os.sep, "/"))


def fill_template(template: str, meta: dict) -> str:
    """Format ``template`` with ``meta``; empty fields vanish cleanly ("a  painting" → "a painting")."""
    fields = {k: str(v) if v is not None else "" for k, v in meta.items()}
    for name in re.findall(r"{(\w+)}", template):
        fields.setdefault(name, "")
    text = template.format(**fields)
    text = re.sub(r"\b(by|in|from)\s*(?=,|$)", "", text)  # "by ," when the artist is unknown
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(\s*,\s*)+", ", ", text)          # collapse empty comma slots
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return text.strip(" ,;")


def build_caption(meta: dict, sidecar: str | None, mode: str, template: str, trigger: str = "") -> str:
    """Caption for one image: template over metadata, sidecar text, or template then sidecar text."""
    if mode not in CAPTION_MODES:
        raise DataError(f"caption mode must be one of {CAPTION_MODES}, got {mode!r}")
    parts = []
    if mode in ("template", "both"):
        parts.append(fill_template(template, meta))
    if mode in ("sidecar", "both") and sidecar:
        parts.append(sidecar.strip())
    text = ", ".join(p for p in parts if p)
    if trigger:
        text = f"{trigger}, {text}" if text else trigger
    return text


def scan_folder(root: str, resolution: int, caption_mode: str = "both", template: str = DEFAULT_TEMPLATE,
                trigger: str = "", artist: str = "", small_images: str = "skip",
                metadata_file: str | None = None) -> ScanResult:
    """Walk ``root`` for images, parse names, build captions, check sizes.

    ``small_images``: images with fewer pixels than ``resolution``² would be upscaled to fill their bucket;
    "error" refuses them (listing them), "skip" leaves them out (reported), "upscale" keeps them.
    """
    if small_images not in ("error", "skip", "upscale"):
        raise DataError(f"small_images must be error, skip or upscale, got {small_images!r}")
    _check_folder(root)
    try:
        table = load_metadata_table(metadata_file)
    except (OSError, MetadataError) as e:
        raise DataError(f"cannot use metadata file {metadata_file}: {e}") from e
    paths = image_paths(root)
    manifest = read_manifest(root)
    samples, skipped, small = [], [], []
    for p in paths:
        rel = os.path.normpath(os.path.relpath(p, root))
        size, reason = _image_size(p, resolution, small_images)
        if reason == "small":
            small.append(f"{rel} ({size[0]}x{size[1]})")
        elif reason:
            skipped.append((p, reason))
        else:
            sample, reason = _sample(p, rel, size, table, caption_mode, template, trigger, artist, manifest, root)
            if sample is None:
                skipped.append((p, reason))
            else:
                samples.append(sample)
    if small:
        raise DataError(f"{len(small)} image(s) are smaller than the training resolution {resolution}x{resolution}: "
                        f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}. Use larger images, a lower "
                        "--resolution, or --small-images skip / upscale")
    if not samples:
        reasons = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in skipped[:5])
        raise DataError(f"no usable images under {root!r} ({len(skipped)} skipped: {reasons})")
    return ScanResult(samples, skipped)


def _check_folder(root):
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a folder")
    try:
        os.listdir(root)
    except OSError as e:
        raise DataError(f"cannot read data folder {root!r}: {e}") from e


def image_paths(root: str) -> list[str]:
    """The image files under ``root`` in a stable order (hidden files left out); DataError when none."""
    _check_folder(root)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: (_ for _ in ()).throw(
            DataError(f"cannot read {e.filename!r}: {e.strerror}"))):
        dirnames.sort()
        for fn in sorted(filenames):
            if os.path.splitext(fn)[1].lower() in IMAGE_EXTS and not fn.startswith("."):
                paths.append(os.path.join(dirpath, fn))
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root!r}; put one artist's paintings "
                        "there (WikiArt layout Style/artist-name_title-year.jpg or any folder)")
    return paths


def _image_size(path, resolution, small_images):
    """((w, h), None) for a usable image; the reason otherwise ("small" when the caller must refuse it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # PIL raises many types for broken files
        return None, f"unreadable image: {e}"
    if w * h < resolution * resolution and small_images != "upscale":
        return (w, h), "small" if small_images == "error" else f"smaller than {resolution}x{resolution} ({w}x{h})"
    return (w, h), None


def _sample(path, rel, size, table, caption_mode, template, trigger, artist, manifest, root):
    """(Sample, None), or (None, reason) when caption mode "sidecar" finds no caption file or the CLIP filter
    of ``python -m training caption`` dropped the image's machine caption."""
    meta = row_metadata(rel.replace(os.sep, "/"), table)  # WikiArt name + metadata-file columns
    if artist:
        meta["artist"] = artist
    sidecar_path = os.path.splitext(path)[0] + ".txt"
    sidecar = None
    if os.path.exists(sidecar_path):
        with open(sidecar_path, encoding="utf-8") as f:
            sidecar = f.read()
    machine = machine_entry(root, rel.replace(os.sep, "/"), sidecar, manifest)
    if machine and machine.get("dropped") and caption_mode != "template":
        return None, f"its machine caption was dropped by the CLIP filter (similarity {machine.get('score')})"
    if sidecar is None and caption_mode == "sidecar":
        return None, f"no caption file {os.path.basename(sidecar_path)} (caption mode 'sidecar')"
    if machine and machine.get("merged") and caption_mode == "both":
        caption_mode = "sidecar"  # the machine caption already holds the metadata template
    caption = build_caption(meta, sidecar, caption_mode, template, trigger)
    return Sample(path, caption, meta, size[0], size[1], file_sha256(path)), None


# ---------------------------------------------------------------- machine captions (python -m training caption)
def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(root: str) -> dict:
    """{"entries": {relative path: entry}} of a folder ({} entries when it has none or it is unreadable)."""
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("entries"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"entries": {}}


def machine_entry(root: str, rel: str, sidecar_text: str | None, manifest: dict | None = None) -> dict | None:
    """The manifest entry of ``rel`` if its sidecar is still the one this tool wrote (or it was dropped by the
    CLIP filter and has no sidecar); None for the user's own captions."""
    entry = (manifest or read_manifest(root))["entries"].get(rel)
    if not entry:
        return None
    if entry.get("dropped"):
        return entry if sidecar_text is None else None
    return entry if sidecar_text is not None and text_hash(sidecar_text) == entry.get("sha256") else None


# ---------------------------------------------------------------- images
def cover_size(image_size: tuple[int, int], size: tuple[int, int], step: int = 8) -> tuple[int, int]:
    """(w, h) of the image scaled to cover ``size``, each side a multiple of ``step`` and at least ``size``'s."""
    (iw, ih), (w, h) = image_size, size
    scale = max(w / iw, h / ih)
    return max(w, round(iw * scale) // step * step), max(h, round(ih * scale) // step * step)


def load_image(path: str, size: tuple[int, int], cover: bool = False, flip: bool = False) -> torch.Tensor:
    """RGB float tensor [3, H, W] in [0, 1], resized to cover ``size`` (w, h) then centre-cropped to it; with
    ``cover`` the whole covering image (sides multiples of 8, for random crops of its latent); ``flip`` mirrors."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return pil_to_tensor(ImageOps.exif_transpose(im), size, cover, flip)


def pil_to_tensor(im, size: tuple[int, int], cover: bool = False, flip: bool = False) -> torch.Tensor:
    """A PIL image as :func:`load_image` gives it."""
    from PIL import Image, ImageOps

    w, h = size
    im = im.convert("RGB")
    scale = max(w / im.width, h / im.height)
    nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    if cover:
        w, h = cover_size((im.width, im.height), size)
    left, top = (nw - w) // 2, (nh - h) // 2
    im = im.crop((left, top, left + w, top + h))
    if flip:
        im = ImageOps.mirror(im)
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1).float() / 255.0


# ---------------------------------------------------------------- CLIP filter
def clip_filter(samples: list[Sample], embedder, threshold: float = 0.2, batch_size: int = 16):
    """Drop image–caption pairs whose CLIP cosine similarity is below ``threshold`` (0.2 in "Novel Paintings from
    the Latent Diffusion Model through Transfer Learning").

    ``embedder`` follows the ATELIER_CLIP contract (``encode_text``, ``encode_image``, ``image_size``).
    Returns (kept, dropped) where dropped is a list of (sample, score).
    """
    kept, dropped = [], []
    size = int(embedder.image_size)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = torch.stack([load_image(s.path, (size, size)) for s in chunk])
        img = embedder.encode_image(images).float()
        txt = embedder.encode_text([s.caption for s in chunk]).float()
        scores = (img * txt).sum(-1).tolist()
        for s, score in zip(chunk, scores):
            if score >= threshold:
                kept.append(s)
            else:
                dropped.append((s, score))
    return kept, dropped


# ---------------------------------------------------------------- aspect buckets
def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) pairs, multiples of ``step``, area at most ``resolution``², aspect within ``max_ratio``."""
    if resolution % step:
        raise DataError(f"resolution {resolution} must be a multiple of {step}")
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
        w += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Bucket whose aspect ratio is closest in log space (ties → larger area)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def assign_buckets(samples: list[Sample], resolution: int, use_buckets: bool = True, step: int = 64,
                   max_ratio: float = 2.0) -> None:
    buckets = make_buckets(resolution, step, max_ratio) if use_buckets else [(resolution, resolution)]
    for s in samples:
        s.bucket = nearest_bucket(s.width, s.height, buckets)


# ---------------------------------------------------------------- latent cache
def latent_cache_key(content_hash: str, vae_hash: str, bucket: tuple[int, int], variant: str = "") -> str:
    extra = f"|{variant}" if variant else ""
    return hashlib.sha256(f"{content_hash}|{vae_hash}|{bucket[0]}x{bucket[1]}{extra}".encode()).hexdigest()[:32]


@dataclass
class CachedLatents:
    """What :func:`cache_latents` gives: one LatentItem per kept sample, and the images it could not read."""

    items: list
    samples: list
    skipped: list = field(default_factory=list)  # (path, reason)


def cache_latents(samples: list[Sample], encode_fn, cache_dir: str, vae_hash: str,
                  progress: Progress = NO_PROGRESS, flip: bool = False, crop: bool = False) -> CachedLatents:
    """Latents per sample, read from ``cache_dir`` or computed with ``encode_fn(images[B,3,H,W]) → latents``.

    Files are keyed by image content hash + VAE hash + bucket (+ "cover" for random crops, whose latent covers
    the whole resized image, and "flip" for the mirrored copy), so renaming images keeps the cache and changing
    the VAE or resolution does not reuse stale latents. An image that cannot be decoded (truncated, corrupt) is
    skipped and listed, not fatal. ``progress.update(done, len(samples))`` after each sample,
    ``progress.check_interrupt()`` before it: an interrupted run keeps what it cached.
    """
    from .diffusion import LatentItem

    out = CachedLatents([], [])
    for i, s in enumerate(samples):
        progress.check_interrupt()
        try:
            lat = _cached_latent(s, encode_fn, cache_dir, vae_hash, crop, False)
            mirrored = _cached_latent(s, encode_fn, cache_dir, vae_hash, crop, True) if flip else None
        except _Unreadable as e:
            out.skipped.append((s.path, f"unreadable image: {e}"))
        else:
            out.items.append(LatentItem(lat, (s.bucket[1] // 8, s.bucket[0] // 8), mirrored))
            out.samples.append(s)
        progress.update(i + 1, len(samples))
    return out


class _Unreadable(Exception):
    pass


def _cached_latent(s, encode_fn, cache_dir, vae_hash, cover, flip):
    from safetensors.torch import load_file, save_file

    variant = "+".join(v for v, on in (("cover", cover), ("flip", flip)) if on)
    path = os.path.join(cache_dir, latent_cache_key(s.content_hash, vae_hash, s.bucket, variant) + ".safetensors")
    if os.path.exists(path):
        try:
            return load_file(path)["latent"]
        except Exception:  # damaged cache file: recompute
            pass
    try:
        img = load_image(s.path, s.bucket, cover=cover, flip=flip).unsqueeze(0)
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for broken image data
        raise _Unreadable(str(e)) from None
    lat = encode_fn(img)[0].detach().float().cpu().contiguous()
    if not torch.isfinite(lat).all():
        raise DataError(f"the VAE produced non-finite latents for {s.path}: the checkpoint's VAE is broken")
    md = {"source": s.meta.get("path", ""), "bucket": f"{s.bucket[0]}x{s.bucket[1]}", "variant": variant}
    try:
        atomic_write(path, lambda tmp: save_file({"latent": lat}, tmp, metadata=md))
    except OSError as e:
        raise DataError(f"cannot write the latent cache in {cache_dir!r}: {e}. Free space or give a writable "
                        "--cache-dir; what was cached so far is kept") from None
    return lat


# ---------------------------------------------------------------- batches
class BucketBatchSampler:
    """Deterministic global batches from one bucket at a time: ``batch_size × world_size × accum`` items per
    optimiser step.

    Epoch e shuffles with seed+e; a bucket's last incomplete batch is filled by cycling that bucket, so no
    image is dropped and every rank gets the same number of items. Micro-batch m of rank r is slice
    ``m·world + r`` of the global batch (:meth:`local`), so 2 ranks × batch B, or 2 accumulated micro-batches
    of B, see exactly the items of 1 rank × batch 2B.
    """

    def __init__(self, buckets: list, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accum: int = 1):
        self.keys = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accum = accum
        self.global_batch = batch_size * world_size * accum

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
        groups = {}
        for i, b in enumerate(self.keys):
            groups.setdefault(tuple(b) if b is not None else None, []).append(i)
        batches = []
        for key in sorted(groups, key=str):
            idx = groups[key]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            n = math.ceil(len(idx) / self.global_batch) * self.global_batch
            idx = [idx[j % len(idx)] for j in range(n)]
            batches += [idx[j:j + self.global_batch] for j in range(0, n, self.global_batch)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[o] for o in order]

    def local(self, global_batch: list[int], micro: int = 0) -> list[int]:
        lo = (micro * self.world_size + self.rank) * self.batch_size
        return global_batch[lo:lo + self.batch_size]

    def batches_per_epoch(self) -> int:
        counts = {}
        for b in self.keys:
            counts[tuple(b) if b is not None else None] = counts.get(tuple(b) if b is not None else None, 0) + 1
        return sum(math.ceil(c / self.global_batch) for c in counts.values())

    def batch_at(self, step: int) -> tuple[list[int], int]:
        """(global batch for optimisation step ``step``, epoch) — a pure function of step, so resume is exact."""
        epoch, pos = divmod(step, self.batches_per_epoch())
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached = self.epoch_batches(epoch)
            self._cached_epoch = epoch
        return self._cached[pos], epoch
