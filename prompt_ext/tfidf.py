"""A small TF-IDF model: the "content fertility" term of equation 26 and a fallback sentence encoder.

"Creative Painting with Latent Diffusion Models" trains a TF-IDF model on prompt/caption text (LAION +
WikiArt) and "uses it to score the prompts", without saying how a TF-IDF vector becomes one number. We take the length-normalised sum of the TF-IDF
weights of the candidate's words, scaled into [0, 1):

    TFIDF(v) = (1 / |v|) * sum over word positions t of v of  idf(t) / idf_max

with |v| the number of word tokens of v, idf(t) = ln((1 + N) / (1 + df(t))) + 1 (smoothed, as is usual), a word
never seen in the corpus contributing 0 (an LM's invented words earn nothing) and idf_max = ln(1 + N) + 1 the
idf a word of df 0 would have. Informative, specific words raise the score; filler lowers it; the score does
not grow with length, so long candidates are not favoured by this term alone.

Written by hand (a dozen lines) rather than pulling scikit-learn in for it.
"""
import json
import math
from collections import Counter

from ..common.files import atomic_write
from .kb import words as _words


def terms(text):
    """Words with a light plural folding ("fields" -> "field", "cities" -> "city"): without it the scores
    of "wheat fields" and "a wheat field" would share nothing."""
    out = []
    for w in _words(text):
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.append(w)
    return out

FORMAT_NAME = "atelier-tfidf"
FORMAT_VERSION = 1


class TfidfModel:
    def __init__(self, df, n_docs):
        if n_docs <= 0:
            raise ValueError("a TF-IDF model needs at least one document")
        self.df = dict(df)
        self.n_docs = int(n_docs)
        self.idf_max = math.log(1 + self.n_docs) + 1.0
        self._idf = {t: math.log((1 + self.n_docs) / (1 + d)) + 1.0 for t, d in self.df.items()}

    @classmethod
    def fit(cls, documents):
        df, n = Counter(), 0
        for doc in documents:
            df.update(set(terms(doc)))
            n += 1
        return cls(df, n)

    def idf(self, term):
        """idf of a known word; 0 for a word the corpus never had."""
        return self._idf.get(term, 0.0)

    def score(self, text):
        """TFIDF(v) of equation 26 (see the module docstring); 0 for a text without words."""
        tokens = terms(text)
        if not tokens:
            return 0.0
        return sum(self.idf(t) for t in tokens) / (len(tokens) * self.idf_max)

    def vector(self, text):
        """Sparse L2-normalised TF-IDF vector {word: weight} (raw counts as tf)."""
        counts = Counter(t for t in terms(text) if t in self._idf)
        vec = {t: c * self._idf[t] for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm > 0 else {}

    def save(self, path):
        data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "n_docs": self.n_docs, "df": self.df}
        atomic_write(path, json.dumps(data, ensure_ascii=False, sort_keys=True))

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError as e:
            raise ValueError(f"TF-IDF model {path!r} does not exist") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"TF-IDF model {path!r} is not valid JSON ({e}); refit it with "
                             "'python -m prompt_ext tfidf'") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path!r} is not an Atelier TF-IDF model")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path!r} is a TF-IDF model of format version {data.get('version')}, this Atelier "
                             f"reads version {FORMAT_VERSION}: refit it with 'python -m prompt_ext tfidf'")
        return cls(data["df"], data["n_docs"])


class TfidfEncoder:
    """E(.) of equation 26 when no neural encoder is available: cosine of TF-IDF vectors."""

    name = "tf-idf vectors"

    def __init__(self, model):
        self.model = model

    def cosines(self, u, candidates):
        qu = self.model.vector(u)
        out = []
        for v in candidates:
            qv = self.model.vector(v)
            out.append(sum(w * qv.get(t, 0.0) for t, w in qu.items()))
        return out
