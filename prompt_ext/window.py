"""CLIP's token window: count prompt tokens exactly as the CLIP text encoder will, and cut to fit.

SD 1.x encodes 77 tokens: start, 75 text tokens, end. We count with open_clip's ``SimpleTokenizer``, which
reads the CLIP BPE vocabulary shipped inside the open_clip wheel (works offline), the same BPE ComfyUI's
SD1 CLIP tokenizer uses.
"""
import functools
import importlib.util
import os
import sys

WINDOW = 75


def _tokenizer_module():
    """open_clip's tokenizer module. Importing the ``open_clip`` package pulls in torchvision and every model
    definition (tens of seconds on a small CPU); the tokenizer module alone needs only its vocabulary file, so
    when open_clip is not loaded yet we load that one file by path."""
    loaded = sys.modules.get("open_clip.tokenizer")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed: pip install open_clip_torch (the CLIP token counter needs "
                          "its BPE vocabulary)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
    mod_spec = importlib.util.spec_from_file_location("_atelier_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return _tokenizer_module().SimpleTokenizer()


class ClipTokenCounter:
    name = "open_clip SimpleTokenizer (CLIP BPE)"

    def count(self, text):
        """Number of CLIP BPE tokens of ``text`` (without the start/end tokens)."""
        return len(_tokenizer().encode(text)) if text.strip() else 0

    def fit(self, text, budget):
        """The longest word-prefix of ``text`` whose token count is <= ``budget`` ("" when none fits).

        Cuts between words, never inside one, and strips a dangling comma or conjunction at the cut.
        """
        if budget <= 0:
            return ""
        if self.count(text) <= budget:
            return text.strip()
        parts = text.split()
        lo, hi = 0, len(parts)  # the largest n with count(parts[:n]) <= budget, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(" ".join(parts[:mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        cut = parts[:lo]
        while cut and cut[-1].lower().strip(",;:") in {"and", "or", "of", "the", "a", "an", "with", "in", "on",
                                                        "at", "to", "by", "for", "from", ""}:
            cut.pop()
        return " ".join(cut).rstrip(",;:-")
