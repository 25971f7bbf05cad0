"""Prompt Extender node: thin adapter over ``prompt_ext.pipeline`` (knowledge retrieval, LM continuation,
equation 26 scoring); model folders, the text-encoder device and the progress bar come through the host seam."""
from ..host import folders, models
from ..host.progress import ComfyProgress
from ..prompt_ext import extend as ext
from ..prompt_ext import pipeline
from ..prompt_ext.pipeline import DEFAULT_KB, NO_LM, REGEX_NER


class AtelierPromptExtender:
    DESCRIPTION = (
        "Extends a short prompt with knowledge (BM25 over a knowledge base, titles first) and optional language-model "
        "continuations (GPT-2, DialoGPT, T5 from models/prompt_expansion), then ranks the candidates by "
        "w(v) = TFIDF(v) + λ1·cos(E(u),E(v)) + λ2·(place/time entities), as in 'Creative Painting with Latent "
        "Diffusion Models' (GPT-2 expansion as in 'Novel Paintings from the Latent Diffusion Model through Transfer "
        "Learning'). Your words are kept verbatim at the start of every candidate and every candidate fits CLIP's "
        "75-token window."
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
                "knowledge_base": (pipeline.knowledge_choices(folders), {
                    "default": DEFAULT_KB,
                    "tooltip": "Where knowledge comes from: the small bundled base (painters, styles, genres, places, "
                               "periods) or a base in models/atelier_knowledge (.sqlite built with "
                               "'python -m prompt_ext build', or a .jsonl that is built on first use)."}),
                "language_model": (pipeline.lm_choices(folders), {
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
                "entity_recognizer": (pipeline.ner_choices(folders), {
                    "default": REGEX_NER,
                    "tooltip": "Counts place/time entities n(v): built-in regexes and gazetteer, or a local "
                               "token-classification (NER) model folder in models/prompt_expansion."}),
            },
            "optional": {
                "artist_prompt": ("STRING", {
                    "forceInput": True,
                    "tooltip": "Appended to every candidate after scoring (e.g. 'by Vincent van Gogh' from the Artist "
                               "Loader), as in the figures of 'Creative Painting with Latent Diffusion Models'."}),
                "clip": ("ATELIER_CLIP", {"tooltip": "Optional open_clip model used as the sentence encoder E; "
                                                     "otherwise T5's encoder (T5 LMs) or TF-IDF vectors."}),
            },
        }

    def extend(self, prompt, enabled, knowledge_base, language_model, candidates, lambda1, lambda2, seed,
               entity_recognizer=REGEX_NER, artist_prompt=None, clip=None):
        best, prompts, report = pipeline.extend_prompt(
            prompt, enabled=enabled, knowledge_base_name=knowledge_base, language_model_name=language_model,
            entity_recognizer=entity_recognizer, candidates=candidates, lambda1=lambda1, lambda2=lambda2, seed=seed,
            artist=artist_prompt, clip=clip, folders=folders, device=models.text_encoder_device(),
            progress=ComfyProgress(3))
        return {"ui": {"text": [report]}, "result": (best, prompts, report)}


NODE_CLASS_MAPPINGS = {"AtelierPromptExtender": AtelierPromptExtender}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierPromptExtender": "Prompt Extender (Atelier)"}
