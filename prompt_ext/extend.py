"""Prompt extension ("Creative Painting with Latent Diffusion Models", section 3; "Novel Paintings from the
Latent Diffusion Model through Transfer Learning", section 3.3): retrieve, continue, score, pick.

For a prompt u:
1. knowledge: articles whose title occurs in u, then the BM25 best passages for u;
2. language model (optional): N seeded continuations of u; knowledge is retrieved for each continuation too;
3. candidates v = u + ", " + an extension (a sentence of a passage, or an LM continuation), cut between
   words so that v (plus the artist prompt, when given) fits CLIP's 75-token window;
4. each candidate is scored by equation 26 of "Creative Painting with Latent Diffusion Models" extended by its
   entity term:
       w(v) = TFIDF(v) + lambda1 * cos(E(u), E(v)) + lambda2 * n(v)
   and the candidates are returned best first (ties keep generation order, so results are deterministic).
The user's words are never rewritten: every candidate starts with u verbatim.
"""
import os
import re
import threading
from dataclasses import dataclass, field

from ..common.files import cache_dir, file_sha256
from ..common.progress import NO_PROGRESS
from . import kb as kbmod
from .entities import EntityCounter
from .tfidf import TfidfEncoder, TfidfModel
from .window import WINDOW, ClipTokenCounter

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_KB_JSONL = os.path.join(DATA_DIR, "knowledge_default.jsonl")
SEPARATOR = ", "
# Defaults of equation 26's weights: cosine in [-1, 1] and TFIDF in [0, 1) weigh alike with lambda1 = 1; each
# place/time entity adds lambda2 = 0.05, enough to break near-ties without letting a list of dates win.
LAMBDA1 = 1.0
LAMBDA2 = 0.05


class PromptError(ValueError):
    """The prompt cannot be extended as given (empty, or longer than CLIP's window)."""


@dataclass
class Candidate:
    text: str  # the candidate prompt v (user's prompt + extension), without the artist prompt
    source: str  # where the extension came from
    tfidf: float = 0.0
    cosine: float = 0.0
    entities: int = 0
    score: float = 0.0
    entity_spans: list = field(default_factory=list)


@dataclass
class Extension:
    prompt: str
    best: str  # best candidate, with the artist prompt appended when one was given
    prompts: list  # the top candidates (best first), artist prompt appended
    candidates: list  # every scored Candidate, best first
    report: str
    warnings: list


# ----------------------------------------------------------------------------------------------------
# Knowledge bases: the bundled one and JSONL files are built once into a cache directory

_KB_CACHE = {}
_KB_LOCK = threading.Lock()


def open_knowledge_base(path, progress=NO_PROGRESS):
    """Open a knowledge base file; a ``.jsonl`` source is built into the cache first (once per content),
    reporting to ``progress`` (a ``common.progress.Progress``; an interrupt leaves no half-built file)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise kbmod.KnowledgeBaseError(f"knowledge base {path!r} does not exist")
    key = (path, os.path.getmtime(path), os.path.getsize(path))
    with _KB_LOCK:
        if key in _KB_CACHE:
            return _KB_CACHE[key]
        if path.endswith(".jsonl"):
            from .wiki import count_jsonl, iter_jsonl

            name = os.path.splitext(os.path.basename(path))[0]
            built = os.path.join(cache_dir("knowledge"),
                                 f"{name}-{file_sha256(path)[:16]}-v{kbmod.FORMAT_VERSION}.sqlite")
            if not os.path.isfile(built):
                kbmod.build_kb(iter_jsonl(path), built, source=os.path.basename(path), progress=progress,
                               total=count_jsonl(path))
            base = kbmod.KnowledgeBase(built)
        else:
            base = kbmod.KnowledgeBase(path)
        _KB_CACHE[key] = base
        return base


def default_knowledge_base(progress=NO_PROGRESS):
    """The knowledge base bundled with the pack (built from its JSONL on first use)."""
    return open_knowledge_base(DEFAULT_KB_JSONL, progress)


_TFIDF_CACHE = {}


def default_tfidf():
    """TF-IDF fitted on the sentences of the bundled knowledge base (the project's own texts)."""
    key = (DEFAULT_KB_JSONL, os.path.getmtime(DEFAULT_KB_JSONL))
    if key not in _TFIDF_CACHE:
        from .wiki import iter_jsonl

        sentences = []
        for title, text in iter_jsonl(DEFAULT_KB_JSONL):
            sentences.append(title)
            sentences += kbmod.split_sentences(" ".join(text.split()))
        _TFIDF_CACHE[key] = TfidfModel.fit(sentences)
    return _TFIDF_CACHE[key]


def tfidf_for(kb_path):
    """A TF-IDF model saved next to a knowledge base (``<name>.tfidf.json``), else the default one."""
    if kb_path:
        side = os.path.splitext(kb_path)[0] + ".tfidf.json"
        if os.path.isfile(side):
            return TfidfModel.load(side)
    return default_tfidf()


# ----------------------------------------------------------------------------------------------------
# Equation 26


def score(tfidf, cosine, entities, lambda1, lambda2):
    """w(v) = TFIDF(v) + lambda1 * cos(E(u), E(v)) + lambda2 * n(v)."""
    return tfidf + lambda1 * cosine + lambda2 * entities


# ----------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


# Sentence openers that read as part of a phrase once lower-cased ("..., the wall is ..."); proper nouns
# ("China is ...") keep their capital.
_OPENERS = frozenset("a an the in its it this these those there his her their with on at from during after "
                     "before today later originally many most some each".split())


_SUBJECT = frozenset(["He", "She", "It", "They"])
_POSSESSIVE = frozenset(["His", "Her", "Its", "Their"])


def resolve_pronoun(sentence, title):
    """Out of its article, "He died at Auvers" loses its subject: put the article title back in its place."""
    first, _, rest = sentence.partition(" ")
    if first in _SUBJECT and rest:
        return f"{title} {rest}"
    if first in _POSSESSIVE and rest:
        return f"{title}'s {rest}"
    return sentence


def _clean(text):
    """An extension phrase: one line, no trailing full stop, a lower-case opener after the comma."""
    text = _WS.sub(" ", text).strip()
    text = text.strip(" ,;:-").rstrip(".!?").strip()
    first, _, rest = text.partition(" ")
    if first.lower() in _OPENERS and first[:1].isupper():
        text = first.lower() + (" " + rest if rest else "")
    return text


def _norm(text):
    return " ".join(kbmod.words(text))


class PromptExtender:
    """Holds the parts (knowledge base, LM, TF-IDF, encoder, entity counter, token counter) and extends prompts."""

    def __init__(self, kb, lm=None, tfidf=None, encoder=None, entities=None, tokens=None, window=WINDOW):
        self.kb = kb
        self.lm = lm
        self.tfidf = tfidf or default_tfidf()
        if encoder is None:
            if lm is not None and lm.seq2seq:
                from .lm import LMEncoder

                encoder = LMEncoder(lm)  # T5's encoder, as in "Creative Painting with Latent Diffusion Models"
            else:
                encoder = TfidfEncoder(self.tfidf)
        self.encoder = encoder
        self.entities = entities or EntityCounter()
        self.tokens = tokens or ClipTokenCounter()
        self.window = int(window)

    # -- candidate generation

    def _extensions(self, prompt, n_candidates, seed, k_passages, max_new_tokens, warnings):
        """(extension text, source) pairs in a fixed order: knowledge for u, LM outputs, knowledge for them."""
        out = []
        for p in self.kb.retrieve(prompt, k=k_passages):
            label = "title match" if p.score == float("inf") else f"bm25 {p.score:.2f}"
            for sentence in kbmod.split_sentences(p.text)[:3]:
                out.append((resolve_pronoun(sentence, p.title), f"knowledge: {p.title} ({label})"))
        if self.lm is not None:
            try:
                texts = self.lm.generate(prompt, n=n_candidates, seed=seed, max_new_tokens=max_new_tokens)
            except Exception as e:  # a broken LM must not take retrieval down with it
                warnings.append(f"language model {self.lm.name} failed while generating ({e}); retrieval only")
                texts = []
            for i, text in enumerate(texts):
                out.append((text, f"{self.lm.name} #{i + 1}"))
            for i, text in enumerate(texts):
                for p in self.kb.search(text, k=1):
                    sentence = resolve_pronoun(kbmod.split_sentences(p.text)[0], p.title)
                    out.append((sentence, f"knowledge for {self.lm.name} #{i + 1}: {p.title}"))
        return out

    def extend(self, prompt, n_candidates=4, lambda1=LAMBDA1, lambda2=LAMBDA2, seed=0, artist="", k_passages=6,
               max_new_tokens=40):
        """Extend ``prompt``; returns an :class:`Extension` (best prompt, top prompts, all scores, report)."""
        warnings = []
        prompt = _WS.sub(" ", prompt or "").strip()
        if not prompt:
            raise PromptError("the prompt is empty: type a few words describing the picture to extend")
        artist = _WS.sub(" ", artist or "").strip().strip(",").strip()
        n_candidates = max(1, int(n_candidates))
        budget = self._budget(prompt, artist)
        candidates = self._candidates(prompt, budget, n_candidates, seed, k_passages, max_new_tokens, warnings)
        ranked = self._ranked(prompt, candidates, lambda1, lambda2)

        def with_artist(text):
            return text + SEPARATOR + artist if artist else text

        prompts = [with_artist(c.text) for c in ranked[:n_candidates]]
        report = self.report(prompt, ranked, n_candidates, lambda1, lambda2, seed, artist, warnings)
        return Extension(prompt, prompts[0], prompts, ranked, report, warnings)

    def _budget(self, prompt, artist):
        """CLIP tokens left for an extension once u, the separator and the artist prompt are counted."""
        used = self.tokens.count(prompt)
        tail = self.tokens.count(SEPARATOR + artist) if artist else 0
        if used + tail > self.window:
            raise PromptError(
                f"the prompt{' plus the artist prompt' if artist else ''} is {used + tail} CLIP tokens, more than the "
                f"{self.window}-token window: shorten it (or switch the extender off to use it as it is)"
            )
        return self.window - used - tail - self.tokens.count(SEPARATOR.strip())

    def _candidates(self, prompt, budget, n_candidates, seed, k_passages, max_new_tokens, warnings):
        """Candidates v = u + ", " + extension, cut to the budget, without repeats (u itself when none is left)."""
        seen = {_norm(prompt)}
        candidates = []
        for ext, source in self._extensions(prompt, n_candidates, seed, k_passages, max_new_tokens, warnings):
            ext = self.tokens.fit(_clean(ext), budget)
            key = _norm(ext)
            if len(key.split()) < 2 or key in seen or key in _norm(prompt):
                continue
            seen.add(key)
            candidates.append(Candidate(prompt + SEPARATOR + ext, source))
        if not candidates:
            warnings.append("nothing relevant found in the knowledge base" +
                            (" nor from the language model" if self.lm is not None else "") + ": prompt kept as is")
            candidates.append(Candidate(prompt, "prompt (unchanged)"))
        return candidates

    def _ranked(self, prompt, candidates, lambda1, lambda2):
        """The candidates scored by equation 26, best first (ties keep generation order)."""
        cosines = self.encoder.cosines(prompt, [c.text for c in candidates])
        for c, cos in zip(candidates, cosines):
            c.tfidf = self.tfidf.score(c.text)
            c.cosine = float(cos)
            c.entity_spans = self.entities.spans(c.text)
            c.entities = len(c.entity_spans)
            c.score = score(c.tfidf, c.cosine, c.entities, lambda1, lambda2)
        order = sorted(range(len(candidates)), key=lambda i: (-round(candidates[i].score, 12), i))
        return [candidates[i] for i in order]

    def report(self, prompt, ranked, n_candidates, lambda1, lambda2, seed, artist, warnings, rows=12):
        lines = [
            f"prompt: {prompt}",
            f"knowledge base: {os.path.basename(self.kb.path)} ({len(self.kb)} passages)",
            f"language model: {self.lm.name + ' (' + self.lm.kind + ')' if self.lm is not None else 'none (retrieval only)'}",
            f"w(v) = TFIDF(v) + {lambda1:g} * cos(E(u),E(v)) + {lambda2:g} * n(v)   E = {self.encoder.name}; "
            f"n = {self.entities.name}; seed {seed}",
        ]
        if artist:
            lines.append(f"artist prompt appended: {artist}")
        lines += [f"WARNING: {w}" for w in warnings]
        lines.append(f"{len(ranked)} candidates, top {min(n_candidates, len(ranked))} returned:")
        lines.append(" rank   w(v)  tfidf    cos  n  tokens  candidate  [source]")
        for i, c in enumerate(ranked[:rows], 1):
            ents = "; ".join(s[3] for s in c.entity_spans)
            lines.append(f"{i:5d} {c.score:6.3f} {c.tfidf:6.3f} {c.cosine:6.3f} {c.entities:2d} {self.tokens.count(c.text):7d}  "
                         f"{c.text}  [{c.source}]" + (f"  entities: {ents}" if ents else ""))
        if len(ranked) > rows:
            lines.append(f"  ... {len(ranked) - rows} more")
        return "\n".join(lines)
