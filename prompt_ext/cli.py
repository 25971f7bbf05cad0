"""Command line: build and inspect knowledge bases, fit a TF-IDF model, try an extension.

    python -m prompt_ext build --jsonl articles.jsonl --out models/atelier_knowledge/mine.sqlite
    python -m prompt_ext build --wiki enwiki-latest-pages-articles.xml.bz2 --out wiki.sqlite [--max-articles N]
    python -m prompt_ext info wiki.sqlite
    python -m prompt_ext query wiki.sqlite "urbanization of china" [-k 5]
    python -m prompt_ext tfidf --corpus captions.txt --out wiki.tfidf.json
    python -m prompt_ext extend "a painting of urbanization of china" [--kb FILE] [--lm DIR] [-n 4] [--seed 0]

Run from the pack root (the folder that holds ``prompt_ext/``).
"""
import argparse
import sys
import time


def cmd_build(args):
    from ..common.progress import TqdmProgress
    from .kb import build_kb
    from .wiki import count_jsonl, iter_jsonl, iter_wiki_dump

    if bool(args.jsonl) == bool(args.wiki):
        sys.exit("give exactly one source: --jsonl FILE or --wiki DUMP")
    if args.jsonl:
        source, articles, total = args.jsonl, iter_jsonl(args.jsonl), count_jsonl(args.jsonl)
    else:
        source, articles = args.wiki, iter_wiki_dump(args.wiki, max_articles=args.max_articles)
        total = args.max_articles
    progress = TqdmProgress("building knowledge base", unit=" articles")
    t = time.perf_counter()
    try:
        n_art, n_pass = build_kb(articles, args.out, source=source, max_words=args.max_words, progress=progress,
                                 total=total)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"build failed: {e}")
    finally:
        progress.close()
    print(f"{args.out}: {n_art} articles, {n_pass} passages in {time.perf_counter() - t:.1f} s")


def cmd_info(args):
    from .kb import KnowledgeBase

    with KnowledgeBase(args.kb) as base:
        for k, v in sorted(base.meta.items()):
            print(f"{k}: {v}")


def cmd_query(args):
    from .kb import KnowledgeBase

    with KnowledgeBase(args.kb) as base:
        t = time.perf_counter()
        hits = base.retrieve(args.query, k=args.k)
        dt = (time.perf_counter() - t) * 1000
        for p in hits:
            print(f"[{p.score:.3f}] {p.title}: {p.text[:160]}")
        print(f"({len(hits)} passages in {dt:.1f} ms)")


def cmd_tfidf(args):
    from .kb import split_sentences
    from .tfidf import TfidfModel

    def lines():
        with open(args.corpus, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield from split_sentences(line) if args.split else [line]

    model = TfidfModel.fit(lines())
    model.save(args.out)
    print(f"{args.out}: {model.n_docs} documents, {len(model.df)} words")


def cmd_extend(args):
    from . import extend as ext
    from .lm import load_lm

    base = ext.open_knowledge_base(args.kb) if args.kb else ext.default_knowledge_base()
    lm = load_lm(args.lm) if args.lm else None
    extender = ext.PromptExtender(base, lm=lm, tfidf=ext.tfidf_for(args.kb))
    try:
        result = extender.extend(args.prompt, n_candidates=args.n, lambda1=args.lambda1, lambda2=args.lambda2,
                                 seed=args.seed, artist=args.artist)
    except ext.PromptError as e:
        sys.exit(str(e))
    print(result.report)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m prompt_ext", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a knowledge base from JSONL or a Wikipedia dump")
    b.add_argument("--jsonl", help='JSONL file, one {"title": ..., "text": ...} per line')
    b.add_argument("--wiki", help="MediaWiki XML dump (.xml, .xml.bz2 or .xml.gz)")
    b.add_argument("--out", required=True, help="output .sqlite file (written atomically)")
    b.add_argument("--max-articles", type=int, default=None, help="stop after this many articles (dumps)")
    b.add_argument("--max-words", type=int, default=80, help="longest passage in words (default 80)")
    b.set_defaults(fn=cmd_build)
    i = sub.add_parser("info", help="print a knowledge base's metadata")
    i.add_argument("kb")
    i.set_defaults(fn=cmd_info)
    q = sub.add_parser("query", help="retrieve passages for a query")
    q.add_argument("kb")
    q.add_argument("query")
    q.add_argument("-k", type=int, default=5)
    q.set_defaults(fn=cmd_query)
    t = sub.add_parser("tfidf", help="fit a TF-IDF model on a text corpus (one prompt/caption per line)")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True, help="e.g. <knowledge base name>.tfidf.json, next to the base")
    t.add_argument("--split", action="store_true", help="treat each sentence of a line as a document")
    t.set_defaults(fn=cmd_tfidf)
    e = sub.add_parser("extend", help="extend a prompt and print the score report")
    e.add_argument("prompt")
    e.add_argument("--kb", help="knowledge base (.sqlite or .jsonl); default: the bundled one")
    e.add_argument("--lm", help="local Hugging Face model directory (GPT-2, DialoGPT, T5)")
    e.add_argument("-n", type=int, default=4)
    e.add_argument("--lambda1", type=float, default=1.0)
    e.add_argument("--lambda2", type=float, default=0.05)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--artist", default="")
    e.set_defaults(fn=cmd_extend)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except RuntimeError as e:  # KnowledgeBaseError, ModelDirError: already readable
        sys.exit(str(e))

