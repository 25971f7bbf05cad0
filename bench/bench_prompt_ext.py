"""Prompt extender benchmarks (prints figures; never asserts timings).

1. BM25 engine choice: SQLite FTS5 (stdlib) vs bm25s (SciPy sparse), build time and query latency on
   synthetic Zipf-distributed passages (10k / 100k / 1M).
2. Knowledge-base query latency of the shipped engine (``prompt_ext.kb``) at the same sizes.
3. End-to-end latency per prompt: bundled knowledge base + a GPT-2-small-shaped random LM on CPU
   (and on the GPU when one is present).

Run from the pack root:  python -m bench.bench_prompt_ext [--sizes 10000,100000,1000000] [--engines fts5,bm25s]
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from atelier.prompt_ext import kb as kbmod

_CONS = "bcdfghjklmnprstvz"
_VOW = "aeiou"


def vocabulary(n):
    """Pronounceable pseudo-words (three consonant-vowel syllables), so stemmers behave as on prose."""
    sylls = [c + v for c in _CONS for v in _VOW]
    out = []
    for i in range(n):
        a, b, c = i % len(sylls), (i // len(sylls)) % len(sylls), (i // len(sylls) ** 2) % len(sylls)
        out.append(sylls[a] + sylls[b] + sylls[c] + "n")
    return out


def synthetic_corpus(n_docs, vocab_size=50000, mean_len=60, seed=0):
    rng = np.random.default_rng(seed)
    vocab = np.array(vocabulary(vocab_size))
    ranks = np.arange(1, vocab_size + 1)
    p = 1.0 / ranks**1.07
    p /= p.sum()
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2, size=n_docs)
    ids = rng.choice(vocab_size, size=int(lengths.sum()), p=p)
    docs, pos = [], 0
    for n in lengths:
        docs.append(" ".join(vocab[ids[pos : pos + n]]))
        pos += n
    titles = [" ".join(vocab[rng.integers(200, vocab_size, size=2)]) for _ in range(n_docs)]
    return titles, docs, vocab


def queries(vocab, n=50, seed=1, common=False):
    """Queries of 3 mid-frequency words (typical prompts); ``common`` adds one top-100 word (worst case)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ws = list(vocab[rng.integers(100, 20000, size=3)])
        if common:
            ws.append(vocab[rng.integers(5, 100)])
        out.append(" ".join(ws))
    return out


def timed(fn, qs):
    """Wall-clock and CPU-time percentiles (ms). On a shared machine the wall clock includes waiting for a
    core; the process CPU time is what the query costs on an idle core (SQLite and numpy are single-threaded)."""
    fn(qs[0])  # warm
    wall, cpu = [], []
    for q in qs:
        t, c = time.perf_counter(), time.process_time()
        fn(q)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    out = []
    for ts in (wall, cpu):
        ts.sort()
        out += [statistics.median(ts), ts[int(0.95 * (len(ts) - 1))], ts[-1]]
    return out


def fmt(t):
    return (f"wall p50 {t[0]:7.2f} p95 {t[1]:7.2f} max {t[2]:7.2f} ms | "
            f"cpu p50 {t[3]:7.2f} p95 {t[4]:7.2f} max {t[5]:7.2f} ms")


def bench_fts5(titles, docs, vocab, tmpdir):
    path = os.path.join(tmpdir, f"kb_{len(docs)}.sqlite")
    t = time.perf_counter()
    kbmod.build_kb(zip(titles, docs), path, source="synthetic", max_words=10**6, batch=20000)
    build = time.perf_counter() - t
    size = os.path.getsize(path) / 2**20
    with kbmod.KnowledgeBase(path) as base:
        typ = timed(lambda q: base.search(q, k=5), queries(vocab))
        com = timed(lambda q: base.search(q, k=5), queries(vocab, common=True))
        full = timed(lambda q: base.retrieve(q, k=5), queries(vocab))
    os.remove(path)
    print(f"  fts5   build {build:7.1f} s  file {size:7.1f} MiB")
    print(f"  fts5   search typical      {fmt(typ)}")
    print(f"  fts5   search +common word {fmt(com)}")
    print(f"  fts5   retrieve (titles+bm25) {fmt(full)}")


def bench_bm25s(titles, docs, vocab):
    try:
        import bm25s
    except ImportError:
        print("  bm25s  not installed (pip install bm25s) - skipped")
        return
    corpus = [t + " " + d for t, d in zip(titles, docs)]
    t = time.perf_counter()
    tokens = bm25s.tokenize(corpus, stopwords=None, show_progress=False)
    retriever = bm25s.BM25()  # default Lucene variant, k1=1.5 b=0.75
    retriever.index(tokens, show_progress=False)
    build = time.perf_counter() - t

    def q(text):
        qt = bm25s.tokenize([text], stopwords=None, show_progress=False)
        return retriever.retrieve(qt, k=5, show_progress=False)

    typ = timed(q, queries(vocab))
    com = timed(q, queries(vocab, common=True))
    print(f"  bm25s  build {build:7.1f} s (in memory; text kept separately)")
    print(f"  bm25s  search typical      {fmt(typ)}")
    print(f"  bm25s  search +common word {fmt(com)}")


def bench_end_to_end(n_candidates=4, max_new_tokens=40):
    import torch

    from atelier.prompt_ext import extend as ext
    from atelier.prompt_ext import lm as lmmod
    from atelier.tests.fixtures.tiny_lm import make_tiny_gpt2

    prompts = ["a painting of urbanization of china", "children running in a wheat field",
               "a harbour at night with fishing boats"]
    base = ext.default_knowledge_base()
    extender = ext.PromptExtender(base, lm=None)
    extender.extend(prompts[0])  # warm: CLIP tokenizer, TF-IDF
    ts = []
    for p in prompts:
        t = time.perf_counter()
        extender.extend(p, n_candidates=n_candidates, seed=0)
        ts.append(time.perf_counter() - t)
    print(f"  retrieval only (LM none), bundled base: mean {statistics.mean(ts) * 1000:.1f} ms per prompt")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_gpt2(os.path.join(tmp, "gpt2-small-random"), n_layer=12, n_embd=768, n_head=12,
                                   vocab_size=50257, n_positions=1024)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            lm = lmmod.load_lm(model_dir, device=device)
            extender = ext.PromptExtender(base, lm=lm)
            extender.extend(prompts[0], n_candidates=n_candidates, seed=0, max_new_tokens=max_new_tokens)  # warm
            ts, gen = [], []
            for p in prompts:
                t = time.perf_counter()
                lm.generate(p, n=n_candidates, seed=0, max_new_tokens=max_new_tokens)
                gen.append(time.perf_counter() - t)
                t = time.perf_counter()
                extender.extend(p, n_candidates=n_candidates, seed=0, max_new_tokens=max_new_tokens)
                ts.append(time.perf_counter() - t)
            print(f"  GPT-2-small-shaped random LM (124M), {n_candidates} candidates x {max_new_tokens} new tokens, "
                  f"{device} ({torch.get_num_threads()} threads): generation {statistics.mean(gen):.2f} s, "
                  f"end to end {statistics.mean(ts):.2f} s per prompt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--engines", default="fts5,bm25s")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); 1 is "
                    "much faster when the cores are busy with other work")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    print(f"CPU cores: {os.cpu_count()}  load average {os.getloadavg()[0]:.1f}  sqlite {kbmod.sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",") if s]:
            t = time.perf_counter()
            titles, docs, vocab = synthetic_corpus(n)
            print(f"== {n} synthetic passages (~60 words, Zipf vocabulary of 50k; made in {time.perf_counter() - t:.0f} s)")
            if "fts5" in engines:
                bench_fts5(titles, docs, vocab, tmp)
            if "bm25s" in engines:
                bench_bm25s(titles, docs, vocab)
            del titles, docs
    if not args.skip_e2e:
        print("== end to end")
        bench_end_to_end()


if __name__ == "__main__":
    main()
