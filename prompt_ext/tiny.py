"""Tiny random language models for tests and benchmarks (never downloads anything).

A word-level tokenizer is trained with ``tokenizers`` on a small text, saved as a fast tokenizer next to a
randomly initialised GPT-2 or T5 of a given size: a directory that ``lm.load_lm`` reads exactly like a real
Hugging Face snapshot.
"""
import json
import os

_DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "knowledge_default.jsonl")


def _corpus(path=_DEFAULT_TEXT):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                yield rec["title"] + " " + rec["text"]


def save_word_tokenizer(model_dir, kind="gpt2", vocab_size=2000, texts=None, pad_to=None):
    """Train a word-level tokenizer and save it (tokenizer.json + configs). Returns its vocabulary size.

    ``pad_to`` fills the vocabulary with filler words up to that size (e.g. 50257 for a GPT-2-small-shaped
    model, whose output layer dominates the cost of a generated token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] + (["<extra_id_0>", "<extra_id_1>"] if kind == "t5" else [])
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no prefixes are ever produced
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(list(texts) if texts is not None else list(_corpus()), trainer=trainer)
    if pad_to and tok.get_vocab_size() < pad_to:
        vocab = tok.get_vocab()
        i = 0
        while len(vocab) < pad_to:
            vocab.setdefault(f"filler{i}", len(vocab))
            i += 1
        padded = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        padded.normalizer, padded.pre_tokenizer, padded.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
        tok = padded
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   additional_special_tokens=specials[3:] or None)
    fast.model_max_length = 512
    os.makedirs(model_dir, exist_ok=True)
    fast.save_pretrained(model_dir)
    return tok.get_vocab_size()


def make_tiny_gpt2(model_dir, n_layer=2, n_embd=32, n_head=2, seed=0, vocab_size=None, n_positions=256):
    """A random GPT-2; ``make_tiny_gpt2(d, 12, 768, 12, vocab_size=50257, n_positions=1024)`` is GPT-2-small-shaped."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n = save_word_tokenizer(model_dir, "gpt2", pad_to=vocab_size)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=n, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    return model_dir


def make_tiny_t5(model_dir, d_model=32, num_layers=2, num_heads=2, seed=0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    n = save_word_tokenizer(model_dir, "t5")
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=n, d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model, num_layers=num_layers,
                   num_heads=num_heads, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(model_dir)
    return model_dir
