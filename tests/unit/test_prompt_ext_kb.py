"""Knowledge bases: BM25 against a reference computation, title matching, builders, versions, bad files."""
import bz2
import json
import math
import random
import sqlite3
from xml.sax.saxutils import escape

import pytest

from atelier.prompt_ext import kb as kbmod
from atelier.prompt_ext.cli import main as cli
from atelier.prompt_ext.wiki import count_jsonl, iter_jsonl, iter_wiki_dump, strip_wiki_markup
from atelier.tests.fixtures.progress import Interrupted, RecordingProgress

VOCAB = ["amber", "birch", "canal", "delta", "ember", "fjord", "grove", "harbor", "iris", "jade", "kiln", "lagoon",
         "meadow", "nectar", "orchard", "pebble", "quarry", "reef", "spruce", "tundra", "umber", "valley", "willow",
         "yarrow", "zenith", "acorn", "bramble", "cedar", "dune", "estuary", "fern", "glacier", "heath", "islet",
         "juniper", "knoll", "lichen", "marsh", "nook", "oasis"]


def fixture_docs(n=40, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        title = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 2))) + f" {i}"
        text = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 14)))
        docs.append((title, text))
    return docs


def reference_bm25(docs, query_terms, weights=(kbmod.TITLE_WEIGHT, 1.0), k1=1.2, b=0.75):
    """Okapi BM25 as SQLite FTS5's bm25() defines it, written out independently:

    score(D) = sum_q idf(q) * f(q,D) * (k1 + 1) / (f(q,D) + k1 * (1 - b + b * |D| / avgdl))
    idf(q)   = ln((N - n(q) + 0.5) / (n(q) + 0.5)), replaced by 1e-6 when <= 0
    f(q,D)   = sum over columns of (column weight * occurrences of q in that column)
    |D|      = tokens of the row over all columns, avgdl = mean |D|, n(q) = rows containing q.
    """
    toks = [(t.lower().split(), x.lower().split()) for t, x in docs]
    N = len(docs)
    lengths = [len(a) + len(c) for a, c in toks]
    avgdl = sum(lengths) / N
    scores = {}
    for q in query_terms:
        n = sum(1 for a, c in toks if q in a or q in c)
        idf = math.log((N - n + 0.5) / (n + 0.5))
        if idf <= 0:
            idf = 1e-6
        for i, (a, c) in enumerate(toks):
            f = weights[0] * a.count(q) + weights[1] * c.count(q)
            if f == 0:
                continue
            s = idf * f * (k1 + 1) / (f + k1 * (1 - b + b * lengths[i] / avgdl))
            scores[i + 1] = scores.get(i + 1, 0.0) + s
    return scores


@pytest.fixture(scope="module")
def fixture_kb(tmp_path_factory):
    path = tmp_path_factory.mktemp("kb") / "fixture.sqlite"
    docs = fixture_docs()
    kbmod.build_kb(docs, path, source="fixture", max_words=1000)
    base = kbmod.KnowledgeBase(path)
    yield docs, base
    base.close()


@pytest.mark.parametrize("query", ["canal lagoon", "birch", "ember fjord kiln", "orchard meadow nectar jade"])
def test_bm25_matches_reference(fixture_kb, query):
    docs, base = fixture_kb
    terms = query.split()
    ref = reference_bm25(docs, terms)
    assert all(2 * sum(1 for t, x in docs if q in (t + " " + x).split()) <= len(docs) for q in terms), \
        "fixture query words must be in at most half the rows (no word is left out of the query)"
    k = 8
    hits = base.search(query, k=k)
    expected = sorted(ref.values(), reverse=True)[:k]
    assert [h.score for h in hits] == pytest.approx(expected, rel=1e-9)
    for h in hits:  # each passage carries its own reference score
        assert h.score == pytest.approx(ref[h.id], rel=1e-9)


def test_word_in_most_rows_is_left_out_without_changing_the_ranking(tmp_path):
    docs = [(f"doc {i}", "common " + ("rare " if i % 7 == 0 else "") + "filler " * (i % 5)) for i in range(30)]
    path = tmp_path / "c.sqlite"
    kbmod.build_kb(docs, path, max_words=1000)
    with kbmod.KnowledgeBase(path) as base:
        keep, dropped = base.plan("common rare")
        assert keep == ["rare"] and dropped == ["common"]
        hits = base.search("common rare", k=5)
    ref = reference_bm25(docs, ["common", "rare"])
    top = sorted(ref, key=lambda i: (-ref[i], i))[:5]
    assert [h.id for h in hits] == top
    # the scores differ from the full query only by the clamped 1e-6 idf of the dropped word
    assert [h.score for h in hits] == pytest.approx([ref[i] for i in top], abs=1e-5)


def test_postings_budget_leaves_out_the_commonest_word(fixture_kb):
    _, base = fixture_kb
    keep, dropped = base.plan("canal lagoon birch", max_postings=1)
    df = base.document_frequencies(["canal", "lagoon", "birch"])
    assert len(keep) == 1 and keep[0] == min(df, key=lambda t: (df[t], t))
    assert sorted(keep + dropped) == sorted(df)


def test_stopwords_and_diacritics():
    assert kbmod.KnowledgeBase.query_terms("A painting of the Café in Arles") == ["cafe", "arles"]
    assert kbmod.words("Dalí's Persistence") == ["dali", "s", "persistence"]


def test_title_matching_longest_first(tmp_path):
    docs = [("China", "China is a large country in Asia with many provinces and rivers."),
            ("Urbanization of China", "Cities in China grew very fast after the reforms, with many new towers."),
            ("Urbanization", "Urbanization is the growth of towns and cities."),
            ("Great Wall of China", "A long wall across the north of China.")]
    path = tmp_path / "t.sqlite"
    kbmod.build_kb(docs, path)
    with kbmod.KnowledgeBase(path) as base:
        found = [t for t, _, _ in base.match_titles("a painting of urbanization of china at dawn")]
        assert found == ["urbanization of china"]
        found = [t for t, _, _ in base.match_titles("china and the great wall of china")]
        assert found == ["china", "great wall of china"]
        hits = base.retrieve("urbanization of china", k=3)
        assert hits[0].title == "Urbanization of China" and hits[0].score == float("inf")
        assert len({h.id for h in hits}) == len(hits)


def test_split_passages_respects_sentences_and_limit():
    text = ("One two three four. Five six seven eight. Nine ten eleven twelve.\n\n"
            "A new paragraph starts here. Long " + " ".join(f"w{i}" for i in range(25)) + ".")
    passages = kbmod.split_passages(text, max_words=10)
    assert passages[0] == "One two three four. Five six seven eight."
    assert passages[1] == "Nine ten eleven twelve."
    assert passages[2] == "A new paragraph starts here."
    assert all(len(p.split()) <= 10 for p in passages)
    assert " ".join(passages).split() == text.split()


def test_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "v.sqlite"
    kbmod.build_kb([("A", "Some text about a place.")], path)
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    con.commit()
    con.close()
    with pytest.raises(kbmod.KnowledgeBaseError, match="format version 99.*rebuild"):
        kbmod.KnowledgeBase(path)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(kbmod.KnowledgeBaseError, match="does not exist.*prompt_ext build"):
        kbmod.KnowledgeBase(tmp_path / "nope.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(kbmod.KnowledgeBaseError, match="corrupt"):
        kbmod.KnowledgeBase(bad)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE meta(key TEXT, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    con.commit()
    con.close()
    with pytest.raises(kbmod.KnowledgeBaseError, match="not an Atelier knowledge base"):
        kbmod.KnowledgeBase(other)


def test_build_is_atomic_and_refuses_empty_input(tmp_path):
    out = tmp_path / "empty.sqlite"
    with pytest.raises(kbmod.KnowledgeBaseError, match="no passages"):
        kbmod.build_kb([("Title", "   ")], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


ARLES_WIKITEXT = """
{{Infobox settlement|name=Arles|population={{formatnum:52000}}}}
'''Arles''' is a city in [[Provence]] on the [[Rhône|river Rhône]] in the south of [[France]].<ref>A source</ref>
It has a [[Roman amphitheatre]] and was home to [[Vincent van Gogh]] in 1888.<ref name="x"/>
[[File:Arles.jpg|thumb|The arena of [[Arles]]]]

== History ==
{| class="wikitable"
| a || b
|}
The town was an important Roman city, with a theatre, baths and a circus along the river banks.
<!-- hidden -->
* A list item about the old town and its cloister, with arches and sculpture.

== References ==
{{reflist}}
[[Category:Cities in France]]
"""

# A dump escapes the wikitext (it is XML character data), exactly as saxutils.escape does.
WIKI = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Arles</title><ns>0</ns><id>1</id><revision><id>5</id>
    <text xml:space="preserve">{escape(ARLES_WIKITEXT)}</text></revision></page>
  <page><title>Arelate</title><ns>0</ns><id>2</id><redirect title="Arles"/><revision><text>#REDIRECT [[Arles]]</text></revision></page>
  <page><title>Talk:Arles</title><ns>1</ns><id>3</id><revision><text>Talk page text that is long enough to count as prose here.</text></revision></page>
</mediawiki>"""


def test_wiki_dump_bz2_stream_strip_and_build(tmp_path, capsys):
    dump = tmp_path / "mini.xml.bz2"
    dump.write_bytes(bz2.compress(WIKI.encode("utf-8")))
    articles = list(iter_wiki_dump(dump, min_words=5))
    assert [t for t, _ in articles] == ["Arles"]
    text = articles[0][1]
    assert text.startswith("Arles is a city in Provence on the river Rhône in the south of France.")
    for junk in ("{{", "}}", "[[", "]]", "<ref", "'''", "wikitable", "Category", "reflist", "File:", "hidden", "=="):
        assert junk not in text
    assert "The town was an important Roman city" in text and "A list item about the old town" in text

    out = tmp_path / "wiki.sqlite"
    cli(["build", "--wiki", str(dump), "--out", str(out)])
    with kbmod.KnowledgeBase(out) as base:
        assert base.meta["articles"] == "1" and base.meta["format"] == kbmod.FORMAT_NAME
        assert base.retrieve("roman amphitheatre")[0].title == "Arles"


def test_strip_wiki_markup_links_and_external():
    s = strip_wiki_markup("See [[Paris|the capital]] and [https://example.org the site] or [[Lyon]] ''now''. "
                          "More words follow here.")
    assert s == "See the capital and the site or Lyon now. More words follow here."


def test_jsonl_builder_and_errors(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"title": f"T{i}", "text": f"Passage number {i} about canals."})
                             for i in range(3)) + "\n", encoding="utf-8")
    out = tmp_path / "a.sqlite"
    cli(["build", "--jsonl", str(src), "--out", str(out)])
    with kbmod.KnowledgeBase(out) as base:
        assert len(base) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x", "text": "ok"}\n{"title": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*string \"title\" and \"text\""):
        list(iter_jsonl(bad))
    bad.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        list(iter_jsonl(bad))


def test_build_reports_progress_per_batch_and_an_interrupt_leaves_no_file(tmp_path):
    docs = [(f"Title {i}", f"Some words about canal number {i}.") for i in range(10)]
    seen = RecordingProgress()
    assert kbmod.build_kb(docs, tmp_path / "kb.sqlite", batch=3, progress=seen, total=len(docs)) == (10, 10)
    assert seen.updates == [(3, 10), (6, 10), (9, 10), (10, 10)] and seen.checks == 3
    stop = RecordingProgress(stop_at=2)
    with pytest.raises(Interrupted):
        kbmod.build_kb(docs, tmp_path / "stopped.sqlite", batch=3, progress=stop)
    assert stop.updates == [(3, None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb.sqlite"]  # no half-built file, no temp file


def test_count_jsonl_counts_records(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"title": "a", "text": "b"}\n\n{"title": "c", "text": "d"}\n  \n', encoding="utf-8")
    assert count_jsonl(src) == 2
