"""Prompt Extender node: thin adapter over ``prompt_ext`` (knowledge retrieval, LM continuation, eq. 26 scoring)."""
import logging
import os
import threading

from ..prompt_ext import extend as ext
from ..prompt_ext.entities import EntityCounter, NerModel, is_token_classifier
from ..prompt_ext.lm import ClipEncoder, is_language_model, load_lm

log = logging.getLogger(__name__)

DEFAULT_KB = "default (bundled)"
NO_LM = "none"
REGEX_NER = "regex + gazetteer"

_LM_CACHE = {}
_NER_CACHE = {}
_LOCK = threading.Lock()


def _folder_paths():
    try:
        import folder_paths
    except ImportError:  # schema checks without ComfyUI
        return None
    return folder_paths


def _model_dirs(kind):
    """Sub-directories of the ``prompt_expansion`` folders holding an LM (kind "lm") or an NER model ("ner")."""
    fp = _folder_paths()
    if fp is None:
        return {}
    found = {}
    try:
        roots = fp.get_folder_paths("prompt_expansion")
    except Exception:  # folder not registered
        return {}
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if not os.path.isfile(os.path.join(path, "config.json")) or name in found:
                continue
            ner = is_token_classifier(path)
            if (kind == "ner" and ner) or (kind == "lm" and not ner and is_language_model(path)):
                found[name] = path
    return found


def _knowledge_files():
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return sorted(fp.get_filename_list("atelier_knowledge"))
    except Exception:
        return []


def _device():
    try:
        import comfy.model_management as mm

        return mm.text_encoder_device()
    except Exception:
        return "cpu"


class _NoProgress:
    def update(self, n):
        pass


def _progress(total):
    try:
        from comfy.utils import ProgressBar
    except ImportError:  # called outside ComfyUI (tests, scripts)
        return _NoProgress()
    return ProgressBar(total)


def _interrupted():
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class AtelierPromptExtender:
    DESCRIPTION = (
        "Extends a short prompt with knowledge (BM25 over a knowledge base, titles first) and optional language-model "
        "continuations (GPT-2, DialoGPT, T5 from models/prompt_expansion), then ranks the candidates by "
        "w(v) = TFIDF(v) + λ1·cos(E(u),E(v)) + λ2·(place/time entities) as in Atelier's seed paper. Your words are "
        "kept verbatim at the start of every candidate and every candidate fits CLIP's 75-token window."
    )
    CATEGORY = "atelier/prompt"
    FUNCTION = "extend"
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("best_prompt", "prompts", "report")
    OUTPUT_IS_LIST = (False, True, False)
    OUTPUT_TOOLTIPS = (
        "The highest-scoring candidate (with the artist prompt appended when one is connected).",
        "The top candidates, best first, as a list: nodes connected here run once per prompt.",
        "The score table: w(v), TFIDF, cosine, entity count, CLIP tokens and source of each candidate, plus warnings.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "a painting of urbanization of china",
                                      "tooltip": "Your prompt u. It is kept word for word at the start of every "
                                                 "candidate; it must fit in CLIP's 75 tokens."}),
                "enabled": ("BOOLEAN", {"default": True, "label_on": "extend", "label_off": "pass through",
                                        "tooltip": "Off: the prompt (plus the artist prompt) passes through unchanged."}),
                "knowledge_base": ([DEFAULT_KB] + _knowledge_files(), {
                    "default": DEFAULT_KB,
                    "tooltip": "Where knowledge comes from: the small bundled base (painters, styles, genres, places, "
                               "periods) or a base in models/atelier_knowledge (.sqlite built with "
                               "'python -m prompt_ext build', or a .jsonl that is built on first use)."}),
                "language_model": ([NO_LM] + sorted(_model_dirs("lm")), {
                    "default": NO_LM,
                    "tooltip": "A Hugging Face model folder in models/prompt_expansion (GPT-2, DialoGPT, a "
                               "prompt-tuned GPT-2, T5) that continues the prompt; 'none' = retrieval only."}),
                "candidates": ("INT", {"default": 4, "min": 1, "max": 16,
                                       "tooltip": "How many prompts to return (and LM continuations to sample)."}),
                "lambda1": ("FLOAT", {"default": ext.LAMBDA1, "min": 0.0, "max": 10.0, "step": 0.05,
                                      "tooltip": "λ1: weight of the similarity cos(E(u),E(v)) to your prompt. Higher "
                                                 "keeps candidates closer to what you wrote."}),
                "lambda2": ("FLOAT", {"default": ext.LAMBDA2, "min": 0.0, "max": 5.0, "step": 0.01,
                                      "tooltip": "λ2: bonus per place/time entity (cities, countries, years, "
                                                 "centuries, seasons, times of day) in a candidate."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the language model's sampling: same seed, same prompts."}),
                "entity_recognizer": ([REGEX_NER] + sorted(_model_dirs("ner")), {
                    "default": REGEX_NER,
                    "tooltip": "Counts place/time entities n(v): built-in regexes and gazetteer, or a local "
                               "token-classification (NER) model folder in models/prompt_expansion."}),
            },
            "optional": {
                "artist_prompt": ("STRING", {"forceInput": True,
                                             "tooltip": "Appended to every candidate after scoring (e.g. 'by Vincent "
                                                        "van Gogh' from the Artist Loader), as in the seed's figures."}),
                "clip": ("ATELIER_CLIP", {"tooltip": "Optional open_clip model used as the sentence encoder E; "
                                                     "otherwise T5's encoder (T5 LMs) or TF-IDF vectors."}),
            },
        }

    def extend(self, prompt, enabled, knowledge_base, language_model, candidates, lambda1, lambda2, seed,
               entity_recognizer=REGEX_NER, artist_prompt=None, clip=None):
        artist = (artist_prompt or "").strip()
        if not enabled:
            text = " ".join((prompt or "").split())
            if artist:
                text = f"{text}, {artist}" if text else artist
            report = "prompt extender switched off: prompt passed through unchanged"
            return {"ui": {"text": [report]}, "result": (text, [text], report)}

        pbar = _progress(3)
        warnings = []
        base, kb_path = self._knowledge_base(knowledge_base)
        lm = self._language_model(language_model, warnings)
        pbar.update(1)
        _interrupted()
        entities = self._entities(entity_recognizer, warnings)
        encoder = ClipEncoder(clip) if clip is not None else None
        extender = ext.PromptExtender(base, lm=lm, tfidf=ext.tfidf_for(kb_path), encoder=encoder, entities=entities)
        try:
            result = extender.extend(prompt, n_candidates=candidates, lambda1=lambda1, lambda2=lambda2, seed=seed,
                                     artist=artist)
        except ext.PromptError as e:
            raise ValueError(f"Atelier Prompt Extender: {e}") from e
        pbar.update(1)
        report = result.report
        if warnings:
            report = "\n".join(f"WARNING: {w}" for w in warnings) + "\n" + report
        for w in warnings + result.warnings:
            log.warning("Atelier Prompt Extender: %s", w)
        pbar.update(1)
        return {"ui": {"text": [report]}, "result": (result.best, list(result.prompts), report)}

    @staticmethod
    def _knowledge_base(name):
        if name == DEFAULT_KB:
            return ext.default_knowledge_base(), None
        fp = _folder_paths()
        path = fp.get_full_path("atelier_knowledge", name) if fp is not None else None
        if path is None:
            raise ValueError(f"Atelier Prompt Extender: knowledge base {name!r} was not found in models/atelier_knowledge; "
                             "build one with 'python -m prompt_ext build' (docs/prompt_extender.md)")
        try:
            return ext.open_knowledge_base(path), path
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"Atelier Prompt Extender: {e}") from e

    @staticmethod
    def _language_model(name, warnings):
        if name == NO_LM:
            return None
        path = _model_dirs("lm").get(name)
        if path is None:
            warnings.append(f"language model {name!r} not found in models/prompt_expansion; retrieval only")
            return None
        device = _device()
        key = (path, str(device))
        with _LOCK:
            if key not in _LM_CACHE:
                try:
                    _LM_CACHE[key] = load_lm(path, device=device)
                except Exception as e:  # any load failure: fall back to retrieval, say so
                    warnings.append(f"could not load language model {name!r} ({e}); retrieval only")
                    return None
            return _LM_CACHE[key]

    @staticmethod
    def _entities(name, warnings):
        if name == REGEX_NER:
            return EntityCounter()
        path = _model_dirs("ner").get(name)
        if path is None:
            warnings.append(f"NER model {name!r} not found; counting entities with regexes and the gazetteer")
            return EntityCounter()
        with _LOCK:
            if path not in _NER_CACHE:
                try:
                    _NER_CACHE[path] = EntityCounter(ner=NerModel(path, device="cpu"))
                except Exception as e:
                    warnings.append(f"could not load NER model {name!r} ({e}); using regexes and the gazetteer")
                    return EntityCounter()
            return _NER_CACHE[path]


NODE_CLASS_MAPPINGS = {"AtelierPromptExtender": AtelierPromptExtender}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierPromptExtender": "Prompt Extender (Atelier)"}
