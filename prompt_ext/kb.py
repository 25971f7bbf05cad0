"""Knowledge bases: passages in one SQLite file with an FTS5 index, ranked by FTS5's Okapi BM25.

Why SQLite FTS5: it ships with Python's stdlib, answers a BM25 query over a million passages well
under 50 ms on a 2-core CPU (``bench/bench_prompt_ext.py`` compares it with bm25s), keeps text and
index in one memory-light file and needs no pickles. FTS5's ``bm25()`` uses k1 = 1.2, b = 0.75,
idf = ln((N - n + 0.5) / (n + 0.5)) (clamped to 1e-6 when not positive) and, with column weights,
a term frequency that is the weighted sum of its hits in each column, and |D| the row's token count.

File layout (format version ``FORMAT_VERSION``):
- ``meta(key, value)``: ``format`` = ``atelier-knowledge``, ``version``, ``tokenizer``, ``passages``,
  ``articles``, ``source``;
- ``passages``: FTS5 table ``(title, text)``; the rowid is the passage id, passages of one article are
  consecutive;
- ``titles(norm, first, count)``: normalised article title -> its passages, for title matching
  ("Creative Painting with Latent Diffusion Models" first matches the prompt against the list of
  article titles).
"""
import os
import re
import sqlite3
import threading
import unicodedata
from dataclasses import dataclass

from ..common.files import atomic_file
from ..common.progress import NO_PROGRESS

FORMAT_NAME = "atelier-knowledge"
FORMAT_VERSION = 1
TOKENIZER = "unicode61 remove_diacritics 2"
# Postings budget of one query: above it the commonest query words (lowest idf) are left out, which keeps a
# query on a million passages under 50 ms; below it (every realistic prompt) the ranking is exact BM25.
MAX_POSTINGS = 50_000
TITLE_WEIGHT = 2.0  # a query word in the title counts twice (BM25 column weight)
MAX_TITLE_WORDS = 6

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

# Query words that carry no knowledge: matching them would rank passages by "of" and "the".
STOPWORDS = frozenset(
    """a an the of and or in on at to for from by with without into onto over under about as is are was were be
    been being it its this that these those there here his her their our your my some any all no not very
    painting paintings picture image photo""".split()
)
# "painting of ...", "a picture of ..." describe the medium, not the subject: never query on them.


class KnowledgeBaseError(RuntimeError):
    """A knowledge base file is missing, corrupt, or of another format version."""


@dataclass(frozen=True)
class Passage:
    id: int
    title: str
    text: str
    score: float  # BM25 (higher is better); title matches get +inf-like priority in retrieve()


def words(text):
    """Lower-case word tokens (letters and digits) with diacritics folded ("Dalí" -> "dali"): the terms
    FTS5's ``unicode61 remove_diacritics 2`` tokenizer makes, so df lookups find them."""
    folded = unicodedata.normalize("NFKD", text.lower())
    return _WORD.findall("".join(c for c in folded if not unicodedata.combining(c)))


def normalise_title(title):
    return " ".join(words(title))


# ----------------------------------------------------------------------------------------------------
# Splitting articles into passages

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text):
    """Sentences of a paragraph: split after . ! ? followed by a capital or digit (good enough for prose)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def split_passages(text, max_words=80):
    """Cut an article into passages of whole sentences, at most ``max_words`` words each.

    Paragraph breaks always end a passage; a single sentence longer than the limit is cut by words.
    """
    passages = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        current, count = [], 0
        for sentence in split_sentences(paragraph):
            n = len(sentence.split())
            if n > max_words:
                if current:
                    passages.append(" ".join(current))
                    current, count = [], 0
                tokens = sentence.split()
                for i in range(0, len(tokens), max_words):
                    passages.append(" ".join(tokens[i : i + max_words]))
                continue
            if current and count + n > max_words:
                passages.append(" ".join(current))
                current, count = [], 0
            current.append(sentence)
            count += n
        if current:
            passages.append(" ".join(current))
    return passages


# ----------------------------------------------------------------------------------------------------
# Building


def check_fts5():
    """Raise a clear error when this Python's SQLite was compiled without FTS5."""
    try:
        con = sqlite3.connect(":memory:")
        con.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
        con.close()
    except sqlite3.OperationalError as e:
        raise KnowledgeBaseError(
            f"this Python's SQLite ({sqlite3.sqlite_version}) has no FTS5 full-text module ({e}); "
            "use a Python build whose sqlite3 includes FTS5 (the python.org and conda builds do)"
        ) from e


def build_kb(articles, out_path, source="", max_words=80, progress=NO_PROGRESS, batch=5000, total=None):
    """Write a knowledge base from ``(title, text)`` pairs; atomic (temp file, then rename).

    ``progress`` (a ``common.progress.Progress``) gets ``update(records read, total)`` after every batch of
    passages (``total``: the number of records when known, else None) and ``check_interrupt()`` before it;
    an interrupt leaves no file behind. Returns (articles, passages).
    """
    check_fts5()
    with atomic_file(out_path) as tmp:
        con = sqlite3.connect(tmp)
        try:
            return _fill_kb(con, articles, source, max_words, progress, batch, total)
        finally:
            con.close()


def _create_tables(con):
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute(f"CREATE VIRTUAL TABLE passages USING fts5(title, text, tokenize='{TOKENIZER}')")
    con.execute("CREATE VIRTUAL TABLE passages_vocab USING fts5vocab(passages, row)")
    con.execute("CREATE TABLE titles(norm TEXT PRIMARY KEY, first INTEGER NOT NULL, count INTEGER NOT NULL)")


def _fill_kb(con, articles, source, max_words, progress, batch, total):
    _create_tables(con)
    rowid = 0
    n_articles = read = 0
    rows, title_rows = [], {}
    for title, text in articles:
        read += 1
        title = " ".join(str(title).split())
        chunks = split_passages(str(text), max_words=max_words)
        if not title or not chunks:
            continue
        n_articles += 1
        norm = normalise_title(title)
        if norm and norm not in title_rows:
            title_rows[norm] = (rowid + 1, len(chunks))
        for chunk in chunks:
            rowid += 1
            rows.append((rowid, title, chunk))
        if len(rows) >= batch:
            progress.check_interrupt()
            con.executemany("INSERT INTO passages(rowid, title, text) VALUES (?, ?, ?)", rows)
            rows = []
            progress.update(read, total)
    if rows:
        con.executemany("INSERT INTO passages(rowid, title, text) VALUES (?, ?, ?)", rows)
    if rowid == 0:
        raise KnowledgeBaseError("no passages to index: every article was empty (need records with a title and a text)")
    con.executemany("INSERT INTO titles(norm, first, count) VALUES (?, ?, ?)",
                    [(k, v[0], v[1]) for k, v in title_rows.items()])
    con.execute("INSERT INTO passages(passages) VALUES('optimize')")  # one b-tree: faster queries
    meta = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "tokenizer": TOKENIZER,
        "passages": str(rowid),
        "articles": str(n_articles),
        "source": str(source),
    }
    con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(meta.items()))
    con.commit()
    progress.update(read, read)
    return n_articles, rowid


# ----------------------------------------------------------------------------------------------------
# Reading


class KnowledgeBase:
    """A read-only knowledge base file. Thread-safe (ComfyUI runs nodes in a worker thread)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise KnowledgeBaseError(
                f"knowledge base {self.path!r} does not exist; build one with "
                "'python -m prompt_ext build --jsonl FILE.jsonl --out FILE.sqlite' (see docs/prompt_extender.md)"
            )
        check_fts5()
        self._lock = threading.Lock()
        try:
            uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            rows = self._con.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as e:
            raise KnowledgeBaseError(
                f"{self.path!r} is not a readable Atelier knowledge base ({e}); it may be corrupt or another kind "
                "of file: rebuild it with 'python -m prompt_ext build'"
            ) from e
        self.meta = dict(rows)
        if self.meta.get("format") != FORMAT_NAME:
            self.close()
            raise KnowledgeBaseError(f"{self.path!r} is not an Atelier knowledge base (format {self.meta.get('format')!r})")
        version = self.meta.get("version")
        if version != str(FORMAT_VERSION):
            self.close()
            raise KnowledgeBaseError(
                f"{self.path!r} is a knowledge base of format version {version}, this Atelier reads version "
                f"{FORMAT_VERSION}: rebuild it from its JSONL or dump with 'python -m prompt_ext build'"
            )
        try:
            self.n_passages = int(self.meta["passages"])
        except (KeyError, ValueError) as e:
            self.close()
            raise KnowledgeBaseError(f"{self.path!r}: corrupt metadata (passage count missing)") from e

    def close(self):
        con = getattr(self, "_con", None)
        if con is not None:
            con.close()
            self._con = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self.n_passages

    def _query(self, sql, args=()):
        with self._lock:
            try:
                return self._con.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise KnowledgeBaseError(f"{self.path!r}: query failed ({e}); the file may be corrupt, rebuild it") from e

    @staticmethod
    def query_terms(query, max_terms=32):
        """The content words of a free-text query, in order, without repeats."""
        seen = []
        for w in words(query):
            if w not in STOPWORDS and w not in seen:
                seen.append(w)
        return seen[:max_terms]

    def document_frequencies(self, terms):
        """{term: number of passages containing it} (0 for unknown words), from FTS5's own vocabulary."""
        marks = ",".join("?" * len(terms))
        rows = self._query(f"SELECT term, doc FROM passages_vocab WHERE term IN ({marks})", tuple(terms))
        df = dict.fromkeys(terms, 0)
        df.update({t: int(d) for t, d in rows})
        return df

    def plan(self, query, max_postings=MAX_POSTINGS):
        """(terms to query, terms left out). Words in more than half the passages have idf <= 0, which
        FTS5 clamps to 1e-6: leaving them out changes no ranking among passages that match another word.
        Then, while the summed postings exceed ``max_postings``, the commonest word is left out too."""
        terms = self.query_terms(query)
        if not terms:
            return [], []
        df = self.document_frequencies(terms)
        keep = [t for t in terms if 0 < df[t] and 2 * df[t] <= self.n_passages]
        dropped = [t for t in terms if t not in keep and df[t] > 0]
        if not keep and dropped:
            keep = [min(dropped, key=lambda t: (df[t], t))]
            dropped.remove(keep[0])
        while len(keep) > 1 and sum(df[t] for t in keep) > max_postings:
            worst = max(keep, key=lambda t: (df[t], t))
            keep.remove(worst)
            dropped.append(worst)
        return keep, dropped

    def search(self, query, k=5, max_postings=MAX_POSTINGS):
        """Top-k passages by BM25 over title and text (title words weigh ``TITLE_WEIGHT``)."""
        terms, _ = self.plan(query, max_postings)
        if not terms:
            return []
        expr = " OR ".join(f'"{t}"' for t in terms)
        rows = self._query(
            f"SELECT rowid, title, text, bm25(passages, {TITLE_WEIGHT}, 1.0) AS s FROM passages "
            "WHERE passages MATCH ? ORDER BY s, rowid LIMIT ?",
            (expr, int(k)),
        )
        return [Passage(int(r[0]), r[1], r[2], -float(r[3])) for r in rows]

    def match_titles(self, text, max_words=MAX_TITLE_WORDS):
        """Article titles that occur word for word in ``text`` (longest first, no overlaps).

        This is the first step of "Creative Painting with Latent Diffusion Models": "match [the prompt] with
        the title list in wikipedia".
        """
        tokens = words(text)
        found, used = [], set()
        for n in range(min(max_words, len(tokens)), 0, -1):
            for i in range(len(tokens) - n + 1):
                span = set(range(i, i + n))
                if span & used:
                    continue
                gram = tokens[i : i + n]
                if n == 1 and gram[0] in STOPWORDS:
                    continue
                row = self._query("SELECT first, count FROM titles WHERE norm = ?", (" ".join(gram),))
                if row:
                    found.append((i, " ".join(gram), int(row[0][0]), int(row[0][1])))
                    used |= span
        found.sort()
        return [(norm, first, count) for _, norm, first, count in found]

    def article_passages(self, first, count, limit=3):
        rows = self._query(
            "SELECT rowid, title, text FROM passages WHERE rowid >= ? AND rowid < ? ORDER BY rowid LIMIT ?",
            (first, first + count, limit),
        )
        return [Passage(int(r[0]), r[1], r[2], float("inf")) for r in rows]

    def retrieve(self, query, k=5, per_title=2):
        """Passages for a query: leading passages of articles whose title is in the query, then BM25 hits."""
        out, seen = [], set()
        for _, first, count in self.match_titles(query):
            for p in self.article_passages(first, count, limit=per_title):
                if p.id not in seen:
                    out.append(p)
                    seen.add(p.id)
        for p in self.search(query, k=k):
            if p.id not in seen:
                out.append(p)
                seen.add(p.id)
        return out
