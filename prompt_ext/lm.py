"""Language-model continuation from local Hugging Face model directories (offline, seeded).

- causal LMs (GPT-2, a prompt-tuned GPT-2 as in "Novel Paintings from the Latent Diffusion Model through
  Transfer Learning", DialoGPT): continue the prompt; DialoGPT-style dialogue models (directory name
  contains "dialo") get the prompt as a query turn ending in EOS and answer it;
- seq2seq LMs (T5): the prompt followed by T5's first sentinel ``<extra_id_0>``, so T5 writes the span
  that follows (its pre-training task), or the plain prompt for a tokenizer without sentinels (FLAN-style).

Everything loads with ``local_files_only=True``: nothing is ever downloaded.
"""
import abc
import json
import os

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.model")


class ModelDirError(RuntimeError):
    """A model directory is missing or lacks files."""


def check_model_dir(model_dir):
    """Raise a clear error naming what a Hugging Face model directory lacks."""
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"model directory {model_dir!r} does not exist")
    present = set(os.listdir(model_dir))
    missing = []
    if "config.json" not in present:
        missing.append("config.json")
    if not present & set(WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not present & set(TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, or vocab.json + merges.txt, or spiece.model)")
    if missing:
        raise ModelDirError(
            f"model directory {model_dir!r} lacks {', '.join(missing)}; copy the complete Hugging Face model "
            "folder (e.g. what save_pretrained() writes, or a snapshot of gpt2 / microsoft/DialoGPT-small / "
            "t5-small from the Hugging Face hub) into models/prompt_expansion/<name>/"
        )


def read_config(model_dir):
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def is_language_model(model_dir):
    """True for a directory holding a causal or seq2seq LM (not an encoder-only or NER model)."""
    try:
        cfg = read_config(model_dir)
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") or []
    if any(a.endswith(("ForTokenClassification", "ForSequenceClassification", "Model")) for a in archs) and not \
            any(a.endswith(("LMHeadModel", "ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return False
    return True


class LanguageModel:
    def __init__(self, model_dir, model, tokenizer, seq2seq, dialogue, device):
        self.model_dir = model_dir
        self.name = os.path.basename(os.path.normpath(model_dir))
        self.model = model
        self.tokenizer = tokenizer
        self.seq2seq = seq2seq
        self.dialogue = dialogue
        self.device = device

    @property
    def kind(self):
        return "seq2seq" if self.seq2seq else ("dialogue" if self.dialogue else "causal")

    def _input_text(self, prompt):
        if self.seq2seq:
            if "<extra_id_0>" in self.tokenizer.get_vocab():
                return f"{prompt} <extra_id_0>"
            return prompt
        if self.dialogue and self.tokenizer.eos_token:
            return prompt + self.tokenizer.eos_token
        return prompt

    def generate(self, prompt, n=4, seed=0, max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.95):
        """``n`` sampled continuations of ``prompt`` (texts without the prompt), reproducible for a seed."""
        import torch

        tok = self.tokenizer
        enc = tok(self._input_text(prompt), return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        devices = [self.device] if str(self.device).startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(int(seed))
            out = self.model.generate(
                **enc, do_sample=True, num_return_sequences=int(n), max_new_tokens=int(max_new_tokens),
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), pad_token_id=pad,
                no_repeat_ngram_size=3,
            )
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]
        texts = tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [" ".join(t.split()) for t in texts]

    def embed(self, texts):
        """Mean-pooled hidden states, L2-normalised: E(.) of equation 26 (T5's encoder, as in "Creative Painting
        with Latent Diffusion Models")."""
        import torch

        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            if self.seq2seq:
                hidden = self.model.get_encoder()(**enc).last_hidden_state
            else:
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def load_lm(model_dir, device="cpu"):
    """Load a causal or seq2seq LM and its tokenizer from a local directory (never downloads)."""
    check_model_dir(model_dir)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = cls.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"could not load the language model in {model_dir!r}: {e}") from e
    model.to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    dialogue = "dialo" in os.path.basename(os.path.normpath(model_dir)).lower()
    return LanguageModel(model_dir, model, tokenizer, seq2seq, dialogue, device)


class _EmbeddingEncoder(abc.ABC):
    """E(.) from a function that returns L2-normalised rows: cos(E(u), E(v)) is a dot product."""

    @abc.abstractmethod
    def embed(self, texts):
        """L2-normalised embeddings, one row per text."""

    def cosines(self, u, candidates):
        if not candidates:
            return []
        e = self.embed([u] + list(candidates)).float().cpu()
        return (e[1:] @ e[0]).tolist()


class LMEncoder(_EmbeddingEncoder):
    """E(.) from a loaded LM (T5's encoder for seq2seq models)."""

    def __init__(self, lm):
        self.lm = lm
        self.name = f"{lm.name} {'encoder' if lm.seq2seq else 'hidden states'} (mean-pooled)"

    def embed(self, texts):
        return self.lm.embed(texts)


class ClipEncoder(_EmbeddingEncoder):
    """E(.) from an ``ATELIER_CLIP`` (open_clip text tower; ``encode_text`` returns L2-normalised rows)."""

    def __init__(self, clip):
        self.clip = clip
        self.name = f"open_clip {getattr(clip, 'name', 'text tower')}"

    def embed(self, texts):
        return self.clip.encode_text(list(texts))
