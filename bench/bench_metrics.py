"""Metrics benchmark: prints figures, asserts nothing.

1. Inception feature extraction throughput (images/s) from uint8 batches: the tiny stand-in network of the
   tests and the full-size FID Inception with random weights (speed does not depend on the weights' values),
   at the 2048-d pool layer and the 64-d first layer.
2. A folder through the feature cache: first run (hash, decode, extract, write chunks) against the second run
   (no image read), and the resulting speed-up.
3. Fréchet distance on 2048-d statistics (two symmetric eigendecompositions).

Run from the pack folder:

    python -m bench.bench_metrics                      # CPU, 32 images per measurement
    python -m bench.bench_metrics --images 256 --device cuda
"""
import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from atelier.metrics import features as F
from atelier.metrics.frechet import frechet_distance, stats_from_features
from atelier.metrics.inception import load_inception
from atelier.tests.fixtures.tiny_clip import make_wikiart_folder
from atelier.tests.fixtures.tiny_inception import tiny_extractor, write_random_inception


def throughput(extractor, n, size, batch):
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    F.extract_batch(extractor, x[:batch], batch)  # warm-up
    t = time.perf_counter()
    F.extract_batch(extractor, x, batch)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=512, help="side of the input images (resized to 299 inside)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    os.environ["ATELIER_CACHE_DIR"] = str(tmp / "cache")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    weights = write_random_inception(tmp / "weights-inception-2015-12-05-6726825d.pth")
    tiny = tiny_extractor()
    full = load_inception(weights, dim=2048, device=args.device)
    stem = load_inception(weights, dim=64, device=args.device)
    print("\n1. extraction throughput (uint8 %d² inputs, batch %d)" % (args.size, args.batch))
    for name, ex in (("tiny stand-in", tiny), ("full Inception, 2048-d", full), ("full Inception, 64-d", stem)):
        print(f"   {name:<24} {throughput(ex, args.images, args.size, args.batch):8.1f} images/s")
    print("\n2. folder through the feature cache (%d PNGs of %d²)" % (args.images, args.size))
    make_wikiart_folder(tmp / "folder", n=args.images, size=args.size, with_csv=False)
    for name, ex in (("tiny stand-in", tiny), ("full Inception, 2048-d", full)):
        t = time.perf_counter()
        F.folder_features(tmp / "folder", ex, batch_size=args.batch)
        first = time.perf_counter() - t
        t = time.perf_counter()
        F.folder_features(tmp / "folder", ex, batch_size=args.batch)
        second = time.perf_counter() - t
        print(f"   {name:<24} first {first:7.2f} s, second {second:6.3f} s: {first / second:7.1f}x faster")
    print("\n3. Fréchet distance, 2048-d")
    rng = np.random.default_rng(0)
    a, b = stats_from_features(rng.normal(size=(3000, 2048))), stats_from_features(rng.normal(size=(3000, 2048)))
    t = time.perf_counter()
    frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    print(f"   {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
