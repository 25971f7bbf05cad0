"""Language-model path end to end with tiny random GPT-2 and T5 built here, the node's core call
(``prompt_ext.pipeline``) and the node around it."""
import os
import shutil

import pytest
from atelier.prompt_ext import extend as ext
from atelier.prompt_ext import lm as lmmod
from atelier.prompt_ext import pipeline
from atelier.prompt_ext.window import WINDOW, ClipTokenCounter
from atelier.tests.fixtures.progress import RecordingProgress
from atelier.tests.fixtures.tiny_lm import make_tiny_gpt2, make_tiny_t5
from atelier.tests.fixtures.training_toys import torch_threads

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "atelier-cache"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is much faster than several fighting for a few cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_expansion")
    gpt2 = make_tiny_gpt2(str(root / "tiny-gpt2"))
    dialo = shutil.copytree(gpt2, root / "tiny-DialoGPT")  # a dialogue model is a GPT-2 used turn by turn
    return {"gpt2": gpt2, "t5": make_tiny_t5(str(root / "tiny-t5")), "dialo": str(dialo), "root": str(root)}


@pytest.fixture(scope="module")
def gpt2(models):
    return lmmod.load_lm(models["gpt2"])


def test_causal_generation_is_seeded_and_length_limited(gpt2):
    a = gpt2.generate("a harbour at night", n=3, seed=7, max_new_tokens=6)
    b = gpt2.generate("a harbour at night", n=3, seed=7, max_new_tokens=6)
    c = gpt2.generate("a harbour at night", n=3, seed=8, max_new_tokens=6)
    assert a == b and a != c
    assert len(a) == 3 and all(0 < len(t.split()) <= 6 for t in a)
    assert gpt2.kind == "causal"
    # the global RNG is left as it was: generation does not disturb the user's other seeded work
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gpt2.generate("a harbour", n=1, seed=1, max_new_tokens=2)
    assert torch.equal(torch.rand(3), expected)


def test_dialogue_model_answers_a_query_turn(models):
    dialo = lmmod.load_lm(models["dialo"])
    assert dialo.kind == "dialogue" and dialo._input_text("hello").endswith(dialo.tokenizer.eos_token)
    assert len(dialo.generate("hello there", n=2, seed=0, max_new_tokens=4)) == 2


def test_gpt2_drives_the_whole_extension(gpt2):
    extender = ext.PromptExtender(ext.default_knowledge_base(), lm=gpt2)
    u = "a painting of urbanization of china"
    a = extender.extend(u, n_candidates=3, seed=0, max_new_tokens=8)
    b = extender.extend(u, n_candidates=3, seed=0, max_new_tokens=8)
    assert a.prompts == b.prompts and a.report == b.report
    sources = [c.source for c in a.candidates]
    assert any(s.startswith("tiny-gpt2 #") for s in sources)
    assert any(s.startswith("knowledge") for s in sources)
    tok = ClipTokenCounter()
    assert all(c.text.startswith(u + ", ") and tok.count(c.text) <= WINDOW for c in a.candidates)
    assert "language model: tiny-gpt2 (causal)" in a.report
    other = extender.extend(u, n_candidates=3, seed=1, max_new_tokens=8)
    lm_a = [c.text for c in a.candidates if c.source.startswith("tiny-gpt2 #")]
    lm_o = [c.text for c in other.candidates if c.source.startswith("tiny-gpt2 #")]
    assert lm_a != lm_o


def test_t5_continues_and_encodes(models):
    t5 = lmmod.load_lm(models["t5"])
    assert t5.kind == "seq2seq" and t5._input_text("a city").endswith("<extra_id_0>")
    out = t5.generate("a city by the river", n=2, seed=3, max_new_tokens=5)
    assert out == t5.generate("a city by the river", n=2, seed=3, max_new_tokens=5)
    e = t5.embed(["a city", "a river"])
    assert e.shape[0] == 2 and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    extender = ext.PromptExtender(ext.default_knowledge_base(), lm=t5)
    assert "encoder (mean-pooled)" in extender.encoder.name  # as in the paper, T5 embeds u and v
    res = extender.extend("a harbour with fishing boats", n_candidates=2, seed=0, max_new_tokens=5)
    for c in res.candidates:
        assert -1.0 - 1e-5 <= c.cosine <= 1.0 + 1e-5


def test_model_dir_missing_files(tmp_path, models):
    with pytest.raises(lmmod.ModelDirError, match="does not exist"):
        lmmod.load_lm(str(tmp_path / "absent"))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(models["gpt2"], "config.json"), broken / "config.json")
    with pytest.raises(lmmod.ModelDirError, match=r"lacks weights .*tokenizer files"):
        lmmod.load_lm(str(broken))


class ExplodingLM:
    name = "exploding"
    kind = "causal"
    seq2seq = False

    def generate(self, *a, **k):
        raise RuntimeError("CUDA error: out of memory")


def test_lm_failure_while_generating_falls_back_to_retrieval():
    res = ext.PromptExtender(ext.default_knowledge_base(), lm=ExplodingLM()).extend("a wheat field", n_candidates=2)
    assert res.prompts and "out of memory" in res.report and "retrieval only" in res.report


# ---------------------------------------------------------------------------------------------- node


class Folders:
    """host.folders' three lookups over the test's model folders (and no knowledge bases)."""

    def __init__(self, models):
        self.found = {os.path.basename(p): p for p in (models["gpt2"], models["t5"])}
        broken = os.path.join(models["root"], "broken-lm")
        os.makedirs(broken, exist_ok=True)
        shutil.copy(os.path.join(models["gpt2"], "config.json"), os.path.join(broken, "config.json"))
        self.found["broken-lm"] = broken

    def subfolders(self, folder, has_file=None):
        assert folder == "prompt_expansion" and has_file == "config.json"
        return dict(self.found)

    def files(self, folder):
        return []

    def full_path(self, folder, name):
        return None


@pytest.fixture
def node(pack, models, monkeypatch):
    from atelier.host import folders
    from atelier.nodes import prompt_ext as mod

    fake = Folders(models)
    monkeypatch.setattr(folders, "subfolders", fake.subfolders)
    return mod


def run(mod, **kw):
    args = dict(prompt="a painting of urbanization of china", enabled=True, knowledge_base=mod.DEFAULT_KB,
                language_model=mod.NO_LM, candidates=3, lambda1=1.0, lambda2=0.05, seed=0)
    args.update(kw)
    return mod.AtelierPromptExtender().extend(**args)


def test_node_outputs(node):
    out = run(node, artist_prompt="by Nicholas Roerich")
    best, prompts, report = out["result"]
    assert isinstance(prompts, list) and len(prompts) == 3 and best == prompts[0]
    assert all(p.startswith("a painting of urbanization of china, ") and p.endswith(", by Nicholas Roerich")
               for p in prompts)
    assert out["ui"]["text"] == [report] and "w(v)" in report
    assert node.AtelierPromptExtender.OUTPUT_IS_LIST == (False, True, False)


def test_node_switched_off_passes_through(node):
    best, prompts, report = run(node, enabled=False, prompt="  a  red boat ", artist_prompt="by Monet")["result"]
    assert best == "a red boat, by Monet" and prompts == [best] and "off" in report


def test_node_with_lm_and_with_a_broken_lm(node):
    best, prompts, report = run(node, language_model="tiny-gpt2")["result"]
    assert "tiny-gpt2 (causal)" in report and "WARNING" not in report
    best, prompts, report = run(node, language_model="broken-lm")["result"]
    assert "WARNING: could not load language model 'broken-lm'" in report and "retrieval only" in report
    assert prompts and best.startswith("a painting of urbanization of china")


def test_node_errors(node):
    with pytest.raises(ValueError, match="prompt is empty"):
        run(node, prompt="")
    with pytest.raises(ValueError, match="window"):
        run(node, prompt=" ".join(["mountain"] * 90))
    with pytest.raises(ValueError, match="not found in models/atelier_knowledge"):
        run(node, knowledge_base="missing.sqlite")


def test_node_schema(node):
    spec = node.AtelierPromptExtender.INPUT_TYPES()
    assert spec["required"]["language_model"][0] == ["none", "broken-lm", "tiny-gpt2", "tiny-t5"]
    assert spec["required"]["entity_recognizer"][0] == ["regex + gazetteer"]
    for section in spec.values():
        for name, (kind, opts) in section.items():
            assert opts.get("tooltip"), name
            if isinstance(kind, list):
                assert opts["default"] in kind
    assert spec["required"]["knowledge_base"][0][0] == node.DEFAULT_KB
    assert spec["required"]["language_model"][0][0] == node.NO_LM


def test_local_ner_model_adds_its_entities(tmp_path):
    """A token-classification folder (random tiny BERT, labels O/LOC/DATE) runs through the NER path."""
    from atelier.prompt_ext.entities import EntityCounter, NerModel, is_token_classifier
    from atelier.tests.fixtures.tiny_lm import save_word_tokenizer
    from transformers import BertConfig, BertForTokenClassification

    d = tmp_path / "tiny-ner"
    n = save_word_tokenizer(str(d), "gpt2")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=n, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     id2label={0: "O", 1: "B-LOC", 2: "B-DATE"}, label2id={"O": 0, "B-LOC": 1, "B-DATE": 2})
    model = BertForTokenClassification(cfg)
    with torch.no_grad():  # make the classifier say LOC for every word: a known answer from random weights
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    model.save_pretrained(d)
    assert is_token_classifier(str(d)) and not lmmod.is_language_model(str(d))
    counter = EntityCounter(ner=NerModel(str(d)))
    assert "NER (tiny-ner)" in counter.name
    spans = counter.spans("canal boats at dawn")
    assert all(kind in ("place", "time") for _, _, kind, _ in spans)
    assert counter.count("canal boats at dawn") > EntityCounter().count("canal boats at dawn") == 1


# ---------------------------------------------------------------------------------- the node's core call


def test_core_call_reports_progress_and_falls_back_with_warnings(models):
    seen = RecordingProgress()
    best, prompts, report = pipeline.extend_prompt(
        "a wheat field", language_model_name="no-such-lm", entity_recognizer="no-such-ner", candidates=2,
        folders=Folders(models), progress=seen)
    assert seen.updates == [(1, 3), (2, 3), (3, 3)]
    assert report.startswith("WARNING: language model 'no-such-lm' not found in models/prompt_expansion; "
                             "retrieval only\nWARNING: NER model 'no-such-ner' not found;")
    assert len(prompts) == 2 and best == prompts[0] and best.startswith("a wheat field, ")
    assert pipeline.model_dirs(Folders(models), "lm").keys() == {"tiny-gpt2", "tiny-t5", "broken-lm"}
    assert pipeline.model_dirs(Folders(models), "ner") == {}


def test_core_call_loads_a_language_model_once(models):
    folders = Folders(models)
    first = pipeline.language_model("tiny-gpt2", folders, "cpu", [])
    assert first is not None and pipeline.language_model("tiny-gpt2", folders, "cpu", []) is first


def test_core_call_switched_off_and_missing_knowledge_base(models):
    assert pipeline.extend_prompt(" a  boat ", enabled=False, artist=" by Monet ", folders=Folders(models))[:2] \
        == ("a boat, by Monet", ["a boat, by Monet"])
    with pytest.raises(ValueError, match="Atelier Prompt Extender: knowledge base 'mine.sqlite' was not found"):
        pipeline.extend_prompt("a boat", knowledge_base_name="mine.sqlite", folders=Folders(models))
