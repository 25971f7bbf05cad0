"""Equation 26, TF-IDF, entity counting, the 75-token window and the user's words (retrieval path, no LM)."""
import json
import math

import pytest

from atelier.prompt_ext import extend as ext
from atelier.prompt_ext import kb as kbmod
from atelier.prompt_ext.entities import EntityCounter
from atelier.prompt_ext.tfidf import TfidfEncoder, TfidfModel, terms
from atelier.prompt_ext.window import WINDOW, ClipTokenCounter, _tokenizer_module


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "atelier-cache"))


# ---------------------------------------------------------------------------------------------- TF-IDF


def test_tfidf_hand_computed():
    model = TfidfModel.fit(["red cat", "red dog", "blue bird"])
    idf_max = math.log(4) + 1
    idf_red = math.log(4 / 3) + 1
    idf_cat = math.log(4 / 2) + 1
    assert model.idf_max == pytest.approx(idf_max)
    assert model.score("red cat") == pytest.approx((idf_red + idf_cat) / (2 * idf_max))
    assert model.score("red zebra") == pytest.approx(idf_red / (2 * idf_max))  # unseen words earn 0
    assert model.score("Red cats!") == pytest.approx(model.score("red cat"))  # case, plural, punctuation
    assert model.score("") == 0.0
    vec = model.vector("red red cat")
    norm = math.hypot(2 * idf_red, idf_cat)
    assert vec == pytest.approx({"red": 2 * idf_red / norm, "cat": idf_cat / norm})


def test_tfidf_encoder_cosine_and_round_trip(tmp_path):
    model = TfidfModel.fit(["red cat", "red dog", "blue bird"])
    enc = TfidfEncoder(model)
    assert enc.cosines("red cat", ["red cat", "blue bird", "red dog"]) == pytest.approx(
        [1.0, 0.0, (math.log(4 / 3) + 1) ** 2 / ((math.log(4 / 3) + 1) ** 2 + (math.log(2) + 1) ** 2)])
    path = tmp_path / "m.tfidf.json"
    model.save(path)
    again = TfidfModel.load(path)
    assert again.score("red cat") == model.score("red cat")
    data = json.loads(path.read_text())
    data["version"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version 7"):
        TfidfModel.load(path)


def test_plural_folding():
    assert terms("Fields, cities and glass buses") == ["field", "city", "and", "glass", "buse"]


# ---------------------------------------------------------------------------------------------- entities

ENTITY_TABLE = [
    ("a quiet street in Paris at dusk", 2),
    ("the Great Wall of China in winter", 3),
    ("a bowl of fruit on a table", 0),
    ("Hokusai painted Mount Fuji in the 19th century", 2),  # "Mount Fuji" once, not "Fuji" again
    ("on 12 March 1889 in Arles", 2),  # a full date is one entity
    ("Kyoto during the Edo period, spring morning", 4),
    ("a nice turkey dinner in may", 0),  # ambiguous words are not places or months
    ("New York in the 1920s at 5 pm", 3),
    ("the Tang dynasty capital Xi'an", 2),
    ("sunset over the Seine", 2),
    ("a train runs on the snow-capped mountains of the Qinghai-Tibet Plateau", 1),
    ("harbour of Le Havre, May 1874, at 17:30", 3),
    ("the late nineteenth century in Saint Petersburg", 2),
    ("a portrait of a woman with a red hat", 0),
    ("in 300 BC, along the Silk Road in Central Asia", 3),
]


@pytest.mark.parametrize("sentence, expected", ENTITY_TABLE)
def test_entity_count_table(sentence, expected):
    counter = EntityCounter()
    assert counter.count(sentence) == expected, counter.spans(sentence)


def test_entity_spans_do_not_overlap():
    spans = EntityCounter().spans("Mount Fuji at dawn in the Edo period")
    assert [s[3] for s in spans] == ["Mount Fuji", "dawn", "Edo period"]
    assert [s[2] for s in spans] == ["place", "time", "time"]


# ---------------------------------------------------------------------------------------------- window


def test_window_fit_counts_clip_tokens():
    tok = ClipTokenCounter()
    text = "a painting of urbanization of China, 19th-century Shenzhen!"
    ids = _tokenizer_module().SimpleTokenizer()(text)[0]  # open_clip's own 77-slot encoding: SOT ... EOT 0 0
    assert tok.count(text) == int((ids != 0).sum()) - 2
    long = " ".join(["skyscrapers"] * 100)
    cut = tok.fit(long, 20)
    assert tok.count(cut) <= 20 and tok.count(cut + " skyscrapers") > 20
    assert tok.fit("a red cat and the dog", 4) == "a red cat"  # dangling conjunction dropped; never cut inside a word
    assert tok.fit("anything", 0) == ""


# ---------------------------------------------------------------------------------------------- equation 26


class StubKB:
    """A knowledge base that returns fixed passages: the ranking test controls every candidate."""

    path = "stub.sqlite"

    def __init__(self, passages):
        self.passages = passages

    def __len__(self):
        return len(self.passages)

    def retrieve(self, query, k=5):
        return self.passages

    def search(self, query, k=5):
        return []


class StubEncoder:
    name = "stub"

    def __init__(self, table):
        self.table = table

    def cosines(self, u, candidates):
        return [self.table[c.split(", ", 1)[1]] for c in candidates]


def test_score_formula():
    assert ext.score(0.25, 0.5, 3, 2.0, 0.1) == pytest.approx(0.25 + 2.0 * 0.5 + 0.1 * 3)
    assert ext.score(0.4, -0.2, 0, 1.0, 5.0) == pytest.approx(0.2)


def test_equation_26_ranking_hand_computed():
    passages = [kbmod.Passage(1, "A", "Quiet canal with boats. Paris and Rome in winter at dawn.", 3.0)]
    model = TfidfModel.fit(["quiet canal with boats", "paris and rome in winter at dawn", "boats"])
    cos = {"Quiet canal with boats": 0.9, "Paris and Rome in winter at dawn": 0.2}
    extender = ext.PromptExtender(StubKB(passages), tfidf=model, encoder=StubEncoder(cos))
    u = "old city"
    t_a = model.score(u + ", Quiet canal with boats")
    t_b = model.score(u + ", Paris and Rome in winter at dawn")
    # the second candidate mentions Paris, Rome, winter, dawn: n = 4; the first none
    for lam1, lam2 in [(1.0, 0.0), (1.0, 0.5), (0.0, 0.01)]:
        res = extender.extend(u, n_candidates=2, lambda1=lam1, lambda2=lam2)
        w = {c.text: c.score for c in res.candidates}
        w_a = t_a + lam1 * 0.9 + lam2 * 0
        w_b = t_b + lam1 * 0.2 + lam2 * 4
        assert w[u + ", Quiet canal with boats"] == pytest.approx(w_a)
        assert w[u + ", Paris and Rome in winter at dawn"] == pytest.approx(w_b)
        assert res.best == (u + ", Quiet canal with boats" if w_a > w_b else u + ", Paris and Rome in winter at dawn")
        assert [c.score for c in res.candidates] == sorted(w.values(), reverse=True)
    assert {c.entities for c in res.candidates} == {0, 4}


# ---------------------------------------------------------------------------------------------- whole path


@pytest.fixture(scope="module")
def extender():
    return ext.PromptExtender(ext.default_knowledge_base())


def test_bundled_knowledge_base_is_large_enough_and_written_for_the_pack():
    with open(ext.DEFAULT_KB_JSONL, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    titles = {r["title"] for r in records}
    passages = sum(len(kbmod.split_passages(r["text"])) for r in records)
    assert passages >= 150
    styles = ["Abstract Expressionism", "Action painting", "Analytical Cubism", "Art Nouveau", "Baroque",
              "Color Field Painting", "Contemporary Realism", "Cubism", "Early Renaissance", "Expressionism",
              "Fauvism", "High Renaissance", "Impressionism", "Mannerism", "Minimalism", "Naive Art", "New Realism",
              "Northern Renaissance", "Pointillism", "Pop Art", "Post-Impressionism", "Realism", "Rococo",
              "Romanticism", "Symbolism", "Synthetic Cubism", "Ukiyo-e"]
    assert len(styles) == 27 and set(styles) <= titles
    for artist in ["Vincent van Gogh", "Nicholas Roerich", "Pierre-Auguste Renoir", "Claude Monet"]:
        assert artist in titles


def test_extension_keeps_words_fits_window_and_is_deterministic(extender):
    u = "a painting of urbanization of china"
    a = extender.extend(u, n_candidates=4, seed=0)
    b = extender.extend(u, n_candidates=4, seed=0)
    assert a.prompts == b.prompts and a.report == b.report
    assert len(a.prompts) == 4 and len(set(a.prompts)) == 4
    tok = ClipTokenCounter()
    for p in a.prompts + [c.text for c in a.candidates]:
        assert p.startswith(u + ", ")
        assert tok.count(p) <= WINDOW
    assert "urbanization of China" in a.best or "China" in a.best
    assert a.best == a.prompts[0] and "w(v)" in a.report


def test_long_prompt_and_artist_still_fit(extender):
    tok = ClipTokenCounter()
    u = ("a quiet harbour with fishing boats at dawn, mist over the water, gulls, a lighthouse on a rocky cape, "
         "nets drying on the beach, old stone houses")
    artist = "by Claude Monet, impressionism"
    res = extender.extend(u, n_candidates=3, artist=artist)
    for p in res.prompts:
        assert p.startswith(u + ", ") and p.endswith(", " + artist)
        assert tok.count(p) <= WINDOW


def test_bad_prompts(extender):
    with pytest.raises(ext.PromptError, match="empty"):
        extender.extend("   ")
    with pytest.raises(ext.PromptError, match="more than the 75-token window"):
        extender.extend(" ".join(["landscape"] * 80))
    with pytest.raises(ext.PromptError, match="plus the artist prompt"):
        extender.extend(" ".join(["landscape"] * 70), artist="by " + " ".join(["Monet"] * 10))


def test_nothing_found_keeps_the_prompt(extender):
    res = extender.extend("zzqx vvbn")
    assert res.prompts == ["zzqx vvbn"] and res.warnings and "nothing relevant" in res.report


def test_jsonl_knowledge_base_is_built_once_into_the_cache(tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_text(json.dumps({"title": "Lighthouse", "text": "A lighthouse stands on the rocky cape at night."}) + "\n")
    a = ext.open_knowledge_base(src)
    b = ext.open_knowledge_base(src)
    assert a is b and len(a) == 1
    assert a.path.startswith(ext.cache_dir())


def test_tfidf_saved_next_to_a_knowledge_base_is_used(tmp_path):
    kb_path = tmp_path / "mine.sqlite"
    assert ext.tfidf_for(str(kb_path)) is ext.default_tfidf()
    TfidfModel.fit(["harbour boats", "harbour"]).save(tmp_path / "mine.tfidf.json")
    model = ext.tfidf_for(str(kb_path))
    assert model.n_docs == 2 and model.idf("boat") > model.idf("harbour") > 0
