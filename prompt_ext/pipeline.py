"""The Prompt Extender node's job as one call (pure: no ComfyUI import).

:func:`extend_prompt` picks the knowledge base, finds and loads the language model and the NER model in the
``prompt_expansion`` folders (each loaded once per process and kept), runs the extension and assembles the
report with its warnings. A model that is missing or fails to load never stops the node: it falls back
(retrieval only; regexes and the gazetteer) and says so in the report. Model folders come from a ``folders``
object with ``subfolders(folder, has_file=...)``, ``files(folder)`` and ``full_path(folder, name)`` (the
pack's ``host.folders``); progress and the user's Cancel go through a ``common.progress.Progress``.
"""
import logging
import threading

from ..common.folders import KNOWLEDGE, PROMPT_EXPANSION
from ..common.progress import NO_PROGRESS
from . import extend as ext
from .entities import EntityCounter, NerModel, is_token_classifier
from .lm import ClipEncoder, is_language_model, load_lm

log = logging.getLogger(__name__)

DEFAULT_KB = "default (bundled)"
NO_LM = "none"
REGEX_NER = "regex + gazetteer"

_LM_CACHE = {}
_NER_CACHE = {}
_LOCK = threading.Lock()


def model_dirs(folders, kind):
    """{name: path} of the Hugging Face model folders in ``prompt_expansion`` holding a language model
    (``kind`` "lm") or a token-classification (NER) model ("ner")."""
    found = {}
    for name, path in folders.subfolders(PROMPT_EXPANSION, has_file="config.json").items():
        ner = is_token_classifier(path)
        if (kind == "ner" and ner) or (kind == "lm" and not ner and is_language_model(path)):
            found[name] = path
    return found


def knowledge_choices(folders):
    return [DEFAULT_KB] + sorted(folders.files(KNOWLEDGE))


def lm_choices(folders):
    return [NO_LM] + sorted(model_dirs(folders, "lm"))


def ner_choices(folders):
    return [REGEX_NER] + sorted(model_dirs(folders, "ner"))


def knowledge_base(name, folders, progress=NO_PROGRESS):
    """(KnowledgeBase, its path or None for the bundled one); ValueError saying how to build a missing one."""
    if name == DEFAULT_KB:
        return ext.default_knowledge_base(progress), None
    path = folders.full_path(KNOWLEDGE, name)
    if path is None:
        raise ValueError(f"Atelier Prompt Extender: knowledge base {name!r} was not found in models/atelier_knowledge; "
                         "build one with 'python -m prompt_ext build' (docs/prompt_extender.md)")
    try:
        return ext.open_knowledge_base(path, progress), path
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"Atelier Prompt Extender: {e}") from e


def language_model(name, folders, device, warnings):
    """The LM of a ``prompt_expansion`` folder, loaded once per (folder, device); None for "none" or on failure."""
    if name == NO_LM:
        return None
    path = model_dirs(folders, "lm").get(name)
    if path is None:
        warnings.append(f"language model {name!r} not found in models/prompt_expansion; retrieval only")
        return None
    key = (path, str(device))
    with _LOCK:
        if key not in _LM_CACHE:
            try:
                _LM_CACHE[key] = load_lm(path, device=device)
            except Exception as e:  # any load failure: fall back to retrieval, say so
                warnings.append(f"could not load language model {name!r} ({e}); retrieval only")
                return None
        return _LM_CACHE[key]


def entity_counter(name, folders, warnings):
    """n(v)'s counter: regexes and the gazetteer, plus a local NER model when one is picked (loaded once)."""
    if name == REGEX_NER:
        return EntityCounter()
    path = model_dirs(folders, "ner").get(name)
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


def passthrough(prompt, artist):
    """The switched-off node: the prompt with its spaces tidied and the artist prompt appended."""
    text = " ".join((prompt or "").split())
    if artist:
        text = f"{text}, {artist}" if text else artist
    return text, [text], "prompt extender switched off: prompt passed through unchanged"


def extend_prompt(prompt, *, enabled=True, knowledge_base_name=DEFAULT_KB, language_model_name=NO_LM,
                  entity_recognizer=REGEX_NER, candidates=4, lambda1=ext.LAMBDA1, lambda2=ext.LAMBDA2, seed=0,
                  artist="", clip=None, folders, device="cpu", progress=NO_PROGRESS):
    """(best prompt, top prompts, report) for the Prompt Extender node.

    ``clip``: an optional ATELIER_CLIP used as the sentence encoder E; ``device``: where the LM runs.
    Raises ValueError for a prompt that cannot be extended (empty, too long) or a missing knowledge base.
    """
    artist = (artist or "").strip()
    if not enabled:
        return passthrough(prompt, artist)
    warnings = []
    base, kb_path = knowledge_base(knowledge_base_name, folders, progress)
    lm = language_model(language_model_name, folders, device, warnings)
    progress.update(1, 3)
    progress.check_interrupt()
    extender = ext.PromptExtender(base, lm=lm, tfidf=ext.tfidf_for(kb_path),
                                  encoder=ClipEncoder(clip) if clip is not None else None,
                                  entities=entity_counter(entity_recognizer, folders, warnings))
    try:
        result = extender.extend(prompt, n_candidates=candidates, lambda1=lambda1, lambda2=lambda2, seed=seed,
                                 artist=artist)
    except ext.PromptError as e:
        raise ValueError(f"Atelier Prompt Extender: {e}") from e
    progress.update(2, 3)
    report = "".join(f"WARNING: {w}\n" for w in warnings) + result.report
    for w in warnings + result.warnings:
        log.warning("Atelier Prompt Extender: %s", w)
    progress.update(3, 3)
    return result.best, list(result.prompts), report
