"""Style-retrieval benchmark: prints figures, asserts nothing.

1. Build throughput vs the embedder's raw throughput (target >= 90 %): the same images embedded from
   pre-decoded tensors (raw) and through ``build_db`` (file read + hash + decode/resize in worker threads +
   embed + checkpoint + write).
2. k=19 query latency on synthetic 768-d vectors at 10k / 100k / 1M: exact (numpy float32, the default up to
   250k), exact chunked over the float16 store (bounded memory), torch, and the FAISS IVF index (auto above
   250k) with its recall@19 against exact.
3. Memory per million images.

Run from the pack root:

    python -m bench.bench_retrieval                       # everything, ViT-B-32 with random weights
    python -m bench.bench_retrieval --skip-build --sizes 10000,100000
    python -m bench.bench_retrieval --arch ViT-L-14 --images 256 --device cuda

Random weights are used (no downloads): speed does not depend on the weights' values. With CUDA, the query
table has a column for the exact search on the GPU (float16 store, as the retriever runs it there).
"""
import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from atelier.retrieval import db as D
from atelier.retrieval.build import build_db, embed_uint8, read_image


def random_open_clip(arch, folder):
    """Save a randomly initialised open_clip model of a stock architecture as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path = pathlib.Path(folder) / f"{arch}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def painting_folder(root, n, size=(640, 480)):
    """n JPEGs about the size of WikiArt files after its usual downscaling, in Style/artist_title-year form."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        style = ("Impressionism", "Baroque", "Cubism", "Ukiyo_e")[i % 4]
        os.makedirs(root / style, exist_ok=True)
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BICUBIC)
        img.save(root / style / f"artist-{i % 17}_painting-{i}-{1800 + i % 200}.jpg", quality=90)


def bench_build(args):
    from atelier.retrieval.embedder import OpenClipEmbedder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        weights = random_open_clip(args.arch, tmp)
        emb = OpenClipEmbedder(args.arch, str(weights), device=args.device)
        painting_folder(tmp / "imgs", args.images)
        files = sorted((tmp / "imgs").rglob("*.jpg"))
        arrays = [read_image(f, emb.image_size)[1] for f in files]
        embed_uint8(emb, arrays[: args.batch_size])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(arrays), args.batch_size):
            embed_uint8(emb, arrays[i:i + args.batch_size])
        if emb.device.type == "cuda":
            torch.cuda.synchronize()
        raw = len(arrays) / (time.perf_counter() - t)
        t = time.perf_counter()
        build_db(tmp / "imgs", tmp / "db", emb, batch_size=args.batch_size, workers=args.workers, log=lambda m: None)
        built = len(arrays) / (time.perf_counter() - t)
        print(f"\n== build throughput: open_clip {args.arch} (random weights), {len(arrays)} JPEG 640x480, "
              f"batch {args.batch_size}, device {emb.device}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPU cores")
        print(f"raw embed (pre-decoded tensors): {raw:8.1f} img/s")
        print(f"build_db (read+hash+decode+embed+write): {built:8.1f} img/s  -> {100 * built / raw:.0f} % of raw "
              "(target >= 90 %)")


def timeit(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def synthetic(n, d, rng, clusters=1000):
    """Clustered unit vectors (CLIP embeddings of a collection cluster by subject and style)."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float16)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d)).astype(np.float32) * 0.04
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _ivf_cells(x16, q, one, k, repeat):
    """(latency, nlist/nprobe, recall@k and build time) of the auto-tuned FAISS IVF index over x16."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        info = D.build_ivf(x16, os.path.join(tmp, "i.faiss"))
        build_s = time.perf_counter() - t
        index = faiss.read_index(os.path.join(tmp, "i.faiss"))
    index.nprobe = info["nprobe"]
    lat = timeit(lambda: index.search(one(), k), repeat)
    _, got = index.search(q, k)
    truth = D.exact_topk_chunked(q, x16, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])
    return [f"{lat:6.2f} ms", f"{info['nlist']:>5}/{info['nprobe']:<6}",
            f"{recall:.3f} (index built in {build_s:.0f} s)"]


def _query_row(n, d, k, rng, args, cuda):
    """One line of the latency table: N images of synthetic d-dim embeddings, one query at a time."""
    x16 = synthetic(n, d, rng)
    q = x16[rng.integers(0, n, 64)].astype(np.float32) + rng.standard_normal((64, d)).astype(np.float32) * 0.02
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    qi = iter(range(10**9))

    def one():
        return q[next(qi) % len(q)][None]

    row = [f"{n:>9,}"]
    x32 = x16.astype(np.float32) if n <= 300_000 else None  # a float32 copy of 1M x 768 is 3 GB
    if x32 is not None:
        row.append(f"{timeit(lambda: D.topk(one() @ x32.T, k), args.repeat):9.2f} ms")
    else:
        row.append(f"{'(3 GB, skip)':>12}")
    row.append(f"{timeit(lambda: D.exact_topk_chunked(one(), x16, k), max(3, args.repeat // 4)):14.2f} ms")
    if x32 is not None:
        xt = torch.from_numpy(x32)
        row.append(f"{timeit(lambda: torch.topk(torch.from_numpy(one()) @ xt.T, k), args.repeat):6.2f} ms")
    else:
        row.append(f"{'-':>9}")
    if cuda:
        xg = torch.from_numpy(x16).cuda()

        def on_gpu():
            idx = torch.topk(torch.from_numpy(one()).cuda().half() @ xg.T, k).indices
            return idx.cpu()  # the result back on the CPU: includes the synchronisation

        row.append(f"{timeit(on_gpu, args.repeat):9.2f} ms")
    row += _ivf_cells(x16, q, one, k, args.repeat) if n >= args.ivf_min else [f"{'-':>9}", f"{'-':>12}", "-"]
    return " | ".join(row)


def bench_queries(args):
    d, k = 768, D.DEFAULT_K
    rng = np.random.default_rng(0)
    cuda = torch.cuda.is_available()
    print(f"\n== query latency, k={k}, d={d}, one query at a time, median of {args.repeat} (CPU, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, faiss threads "
          f"{__import__('faiss').omp_get_max_threads()}" + (f"; GPU {torch.cuda.get_device_name()}" if cuda else "")
          + ")")
    print(f"{'N':>9} | {'exact np f32':>12} | {'exact chunked f16':>17} | {'torch f32':>9} | "
          + (f"{'torch GPU f16':>12} | " if cuda else "") + f"{'FAISS IVF':>9} | {'nlist/nprobe':>12} | recall@19")
    for n in args.sizes:
        print(_query_row(n, d, k, rng, args, cuda))
    print(f"(auto index: exact up to {D.IVF_THRESHOLD:,} images, IVF above; the exact path keeps a float32 copy "
          "in RAM)")
    if not cuda:
        print("torch on a GPU: no CUDA device here, column left out")


def memory_per_million(args):
    n, d = 1_000_000, args.dim
    meta_row = 230  # bytes per metadata.jsonl row with a 64-hex sha256 and a WikiArt path, measured below
    with tempfile.TemporaryDirectory() as tmp:
        rows = [{"path": f"Impressionism/claude-monet_water-lilies-{i}-1916.jpg", "artist": "Claude Monet",
                 "style": "Impressionism", "genre": "landscape", "title": f"Water Lilies {i}", "year": "1916",
                 "sha256": "0" * 64} for i in range(1000)]
        D.write_db(os.path.join(tmp, "m"), np.ones((1000, 8), np.float16), np.ones(1000), rows,
                   {"name": "x", "weights_hash": "0", "dim": 8}, index="exact")
        meta_row = os.path.getsize(os.path.join(tmp, "m", D.METADATA)) / 1000
    gb = 1e9
    print(f"\n== memory per million images, d={d}")
    print(f"embeddings.npy float16 (memory-mapped): {n * d * 2 / gb:.2f} GB")
    print(f"norms.npy float32: {n * 4 / gb:.3f} GB; metadata.jsonl: {n * meta_row / gb:.2f} GB on disk "
          f"({meta_row:.0f} B/row), about 2-3x that as Python dicts once loaded")
    print(f"exact search float32 working copy: {n * d * 4 / gb:.2f} GB (only below the IVF threshold)")
    print(f"FAISS IVF SQfp16 index: {n * (d * 2 + 8) / gb:.2f} GB (+ coarse centroids)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--ivf-min", type=int, default=100_000, help="build an IVF index from this size up")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-queries", action="store_true")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if not args.skip_build:
        bench_build(args)
    if not args.skip_queries:
        bench_queries(args)
    memory_per_million(args)


if __name__ == "__main__":
    main()
