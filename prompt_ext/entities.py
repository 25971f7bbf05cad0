"""n(v) of equation 26: how many place and time entities a candidate prompt mentions.

"Creative Painting with Latent Diffusion Models" uses a named-entity recogniser plus regular expressions for
places, addresses, times and dates. Here: a local Hugging Face token-classification model when the user has one (its LOC/GPE/DATE/TIME/FAC
entities), and always regular expressions for years, decades, centuries, eras, dates, months, seasons,
times of day and clock times, and a shipped gazetteer of countries, regions and major cities
(``data/gazetteer.txt``). Overlapping matches count once (the longest wins), so "19th century" is one
entity, not two.
"""
import os
import re

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

_ORD = (r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
        r"fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|twenty-first|"
        r"\d{1,2}(?:st|nd|rd|th))")
_MONTH = (r"(?:january|february|march|april|may|june|july|august|september|october|november|december|"
          r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)\.?")
_ERA_WORDS = r"(?:[Dd]ynasty|[Pp]eriod|[Ee]ra|[Aa]ge|[Ee]poch|[Ss]hogunate|[Ee]mpire)"

TIME_PATTERNS = [
    # full dates: 12 March 1889, March 12, 1889, 1889-03-12
    rf"\b\d{{1,2}}\s+{_MONTH}\s+\d{{3,4}}\b",
    rf"\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{3,4}}\b",
    r"\b\d{4}-\d{2}-\d{2}\b",
    rf"\b{_MONTH}\s+\d{{4}}\b",  # May 1874
    # centuries and millennia: 19th century, nineteenth-century, the 1800s, 1920s, '20s
    rf"\b(?:early\s+|mid-?\s*|late\s+)?{_ORD}[\s-]+(?:century|centuries|millennium)(?:\s+(?:bc|bce|ad|ce))?\b",
    r"\b(?:early\s+|mid-?|late\s+)?\d{3}0s\b",
    r"(?<!\w)'\d0s\b",
    # years with an era mark, then plain years 1000-2099
    r"\b\d{1,4}\s*(?:bc|bce|ad|ce)\b",
    r"\b(?:ad|anno domini)\s+\d{1,4}\b",
    r"\b(?:1\d{3}|20\d{2})\b",
    # named eras: Edo period, Tang dynasty, Bronze Age, Middle Ages, Belle Epoque, Renaissance...
    rf"\b[A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)?\s+{_ERA_WORDS}\b",
    r"\b(?:middle ages|belle [ée]poque|renaissance|enlightenment|industrial revolution|cold war|"
    r"world war (?:i{1,2}|one|two|1|2)|antiquity|prehistory|bronze age|iron age|stone age)\b",
    # months (alone), seasons, times of day, clock times
    rf"\b{_MONTH}(?=\s|$|[,.;])",
    r"\b(?:spring|summer|autumn|winter|springtime|summertime|wintertime|midsummer|midwinter|harvest time)\b",
    r"\b(?:dawn|daybreak|sunrise|morning|forenoon|noon|midday|afternoon|dusk|sunset|twilight|evening|"
    r"nightfall|night|nighttime|midnight|blue hour|golden hour)\b",
    r"\b(?:[01]?\d|2[0-3]):[0-5]\d\b",
    r"\b(?:1[0-2]|0?[1-9])\s*(?:a\.?m\.?|p\.?m\.?|o'clock)(?!\w)",
    # weekday names
    r"\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b",
]
# Month abbreviations that are ordinary words ("may", "mar", "jun" as a name) are only matched when
# capitalised; see _AMBIGUOUS_MONTHS.
_AMBIGUOUS_MONTHS = {"may", "mar", "jan", "jun", "sep", "oct", "dec", "aug", "nov", "feb", "apr", "jul", "sept"}

_NER_LABELS = {"LOC", "GPE", "FAC", "DATE", "TIME", "LOCATION", "PLACE", "EVENT_DATE"}


def load_gazetteer(path=None):
    path = path or os.path.join(_DATA, "gazetteer.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


class EntityCounter:
    """Regexes + gazetteer (and optionally an NER model) -> list of entity spans, and their count."""

    name = "regex + gazetteer"

    def __init__(self, gazetteer=None, ner=None):
        names = load_gazetteer() if gazetteer is None else list(gazetteer)
        names = sorted(set(names), key=lambda s: (-len(s), s))
        alternation = "|".join(re.escape(n).replace(r"\ ", r"[\s-]+") for n in names)
        self._places = re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE) if names else None
        self._times = [re.compile(p, 0 if "[A-Z]" in p else re.IGNORECASE) for p in TIME_PATTERNS]
        self._ner = ner
        if ner is not None:
            self.name = f"NER ({ner.name}) + regex + gazetteer"

    def spans(self, text):
        """Non-overlapping ``(start, end, kind, surface)`` entity spans, longest match first."""
        found = []
        if self._places is not None:
            found += [(m.start(), m.end(), "place") for m in self._places.finditer(text)]
        for pattern in self._times:
            for m in pattern.finditer(text):
                surface = m.group(0)
                if surface.lower().rstrip(".") in _AMBIGUOUS_MONTHS and not surface[0].isupper():
                    continue
                found.append((m.start(), m.end(), "time"))
        if self._ner is not None:
            found += self._ner.spans(text)
        found.sort(key=lambda s: (-(s[1] - s[0]), s[0]))
        taken, out = [], []
        for start, end, kind in found:
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            out.append((start, end, kind, text[start:end]))
        out.sort()
        return out

    def count(self, text):
        """n(v): the number of place/time entities in ``text``."""
        return len(self.spans(text))


class NerModel:
    """A local Hugging Face token-classification model (e.g. a BERT-NER directory), offline."""

    def __init__(self, model_dir, device="cpu"):
        from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

        from .lm import check_model_dir

        check_model_dir(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForTokenClassification.from_pretrained(model_dir, local_files_only=True)
        self._pipe = pipeline("token-classification", model=model, tokenizer=tok, aggregation_strategy="simple",
                              device=device)
        self.name = os.path.basename(os.path.normpath(model_dir))

    def spans(self, text):
        out = []
        for ent in self._pipe(text):
            label = str(ent.get("entity_group", "")).upper().split("-")[-1]
            if label in _NER_LABELS:
                out.append((int(ent["start"]), int(ent["end"]), "place" if label in {"LOC", "GPE", "FAC",
                                                                                   "LOCATION", "PLACE"} else "time"))
        return out


def is_token_classifier(model_dir):
    """True when a model directory holds a token-classification (NER) model."""
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForTokenClassification") for a in cfg.get("architectures") or [])
