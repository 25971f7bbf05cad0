"""AUTOMATIC1111 prompt editing, turned into multistage stages (list of (prompt text, steps)).

Syntax (as in A1111's ``modules/prompt_parser.py`` grammar, re-implemented here, no lark needed):

* ``[from:to:when]`` uses ``from`` then ``to``; ``[to:when]`` adds ``to`` after ``when``;
  ``[from::when]`` removes ``from`` after ``when``. Nesting is allowed inside ``from``/``to``.
* ``when`` without a decimal point is a step number; with one (``.5``, ``0.25``) it is a fraction
  of the steps, turned into a step with ``int(when * steps)`` (truncation, float rounding included:
  ``0.29 * 100`` is ``28.999…`` so it gives 28). Either is capped at ``steps``.
* ``[a|b|c]`` alternates every step. ``(x)``, ``(x:1.2)`` and ``[x]`` are kept as text (weights are
  ComfyUI's tokenizer's business). Text that does not parse as a whole is used unchanged for every
  step, as A1111 does.
* Escapes: ``\\[ \\] \\: \\|`` give the literal character (the backslash is dropped in the final
  text); ``\\( \\)`` and any other escape are passed through unchanged for ComfyUI's tokenizer.

Step counting. A1111 evaluates the prompt for step index i (0-based) with ``i <= when`` choosing
``from``, except that step 0 is treated as step 1, so ``[a:b:8]`` at 20 steps gives ``a`` on 9 steps
(the off-by-one users report in AUTOMATIC1111/stable-diffusion-webui#7279). ``counting="a1111"``
reproduces that exactly; ``counting="exact"`` makes ``when`` the number of steps of ``from``
(``[a:b:8]`` = 8 steps of ``a`` + 12 of ``b``, the multistage-guidance paper's reading).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Union

COUNTING_MODES = ("a1111", "exact")

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_WS = re.compile(r"\s+")
_PLAIN_STOP = set("\\[]():|")
_UNESCAPE = re.compile(r"\\([\[\]:|])")


class PromptEditingError(ValueError):
    """The prompt cannot be scheduled (e.g. empty); the message says what to change."""


@dataclass
class _Sched:
    before: Optional[list]
    after: list
    when: str
    step: int = 0


@dataclass
class _Alt:
    options: list = field(default_factory=list)


Node = Union[str, _Sched, _Alt, list]


class _Parser:
    """Backtracking recursive descent over A1111's grammar; a failed bracket is not consumed."""

    def __init__(self, text: str):
        self.s = text

    def plain(self, i):
        s, j = self.s, i
        while j < len(s):
            c = s[j]
            if c == "\\":
                j += 2 if j + 1 < len(s) else 1
                continue
            if c in _PLAIN_STOP:
                break
            j += 1
        return (s[i:j], j) if j > i else (None, i)

    def prompt(self, i):
        """prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*"""
        items = []
        while i < len(self.s):
            c = self.s[i]
            if c == "[":
                got = self.bracket(i)
            elif c == "(":
                got = self.paren(i)
            else:
                text, j = self.plain(i)
                got = (text, j) if text is not None else None
            if got is None:
                break
            node, i = got
            items.append(node)
        return items, i

    def number(self, i):
        s = self.s
        m = _WS.match(s, i)
        if m:
            i = m.end()
        m = _NUMBER.match(s, i)
        if not m:
            return None
        value, i = m.group(0), m.end()
        m = _WS.match(s, i)
        if m:
            i = m.end()
        if i < len(s) and s[i] == "]":
            return value, i + 1
        return None

    def bracket(self, i):
        s = self.s
        first, j = self.prompt(i + 1)
        if j >= len(s):
            return None
        c = s[j]
        if c == "]":
            return ["[", first, "]"], j + 1
        if c == "|":
            options = [first]
            while j < len(s) and s[j] == "|":
                opt, j = self.prompt(j + 1)
                options.append(opt)
            if j < len(s) and s[j] == "]":
                return _Alt(options), j + 1
            return None
        if c == ":":
            num = self.number(j + 1)
            if num is not None:
                return _Sched(None, first, num[0]), num[1]
            second, k = self.prompt(j + 1)
            if k < len(s) and s[k] == ":":
                num = self.number(k + 1)
                if num is not None:
                    return _Sched(first, second, num[0]), num[1]
        return None

    def paren(self, i):
        s = self.s
        first, j = self.prompt(i + 1)
        if j < len(s) and s[j] == ")":
            return ["(", first, ")"], j + 1
        if j < len(s) and s[j] == ":":
            second, k = self.prompt(j + 1)
            if k < len(s) and s[k] == ")":
                return ["(", first, ":", second, ")"], k + 1
        return None

    def start(self):
        """start: (prompt | /[][():]/+)*  -- stray brackets and colons at top level are literal text."""
        items, i = [], 0
        while i < len(self.s):
            got, j = self.prompt(i)
            items.extend(got)
            if j >= len(self.s):
                break
            if self.s[j] in "[]():":
                items.append(self.s[j])
                i = j + 1
            elif j == i:
                return None  # e.g. a '|' outside brackets: A1111's parser fails, the prompt is used as is
            else:
                i = j
        return items


def parse(text: str):
    """Parse tree of a prompt, or None when A1111 would not parse it (then it is used unchanged)."""
    return _Parser(text).start()


def _walk(tree, fn):
    for node in tree:
        if isinstance(node, list):
            _walk(node, fn)
        elif isinstance(node, _Sched):
            fn(node)
            if node.before:
                _walk(node.before, fn)
            _walk(node.after, fn)
        elif isinstance(node, _Alt):
            fn(node)
            for opt in node.options:
                _walk(opt, fn)


def resolve_when(when: str, steps: int) -> int:
    """A1111's rule: a number with '.' is a fraction (int(v * steps)), otherwise a step; capped at steps."""
    v = float(when)
    v = v * steps if "." in when else v
    return min(steps, int(v))


def text_at(tree, step: int) -> str:
    """The prompt A1111's ``at_step(step)`` gives (``from`` while step <= when)."""
    out = []

    def emit(nodes):
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, list):
                emit(node)
            elif isinstance(node, _Sched):
                if step <= node.step:
                    emit(node.before or [])
                else:
                    emit(node.after)
            elif isinstance(node, _Alt):
                emit(node.options[(step - 1) % len(node.options)])

    emit(tree)
    return "".join(out)


def unescape(text: str) -> str:
    """Drop the backslash of ``\\[ \\] \\: \\|`` (editing syntax only); keep ``\\(`` ``\\)`` for ComfyUI."""
    return _UNESCAPE.sub(r"\1", text)


def prompt_per_step(text: str, steps: int, counting: str = "a1111") -> list:
    """The prompt text used at each of ``steps`` steps (0-based list)."""
    if counting not in COUNTING_MODES:
        raise PromptEditingError(f"counting must be one of {COUNTING_MODES}, got {counting!r}")
    if steps < 1:
        raise PromptEditingError(f"steps must be at least 1, got {steps}")
    if not text.strip():
        raise PromptEditingError("the prompt is empty; write a prompt such as `a [dragon:fish:8] in the sea`")
    tree = parse(text)
    if tree is None:
        return [unescape(text)] * steps

    def set_step(node):
        if isinstance(node, _Sched):
            node.step = resolve_when(node.when, steps)

    _walk(tree, set_step)
    if counting == "a1111":
        at = [max(i, 1) for i in range(steps)]
    else:
        at = [i + 1 for i in range(steps)]
    return [unescape(text_at(tree, t)) for t in at]


def prompt_stages(text: str, steps: int, counting: str = "a1111") -> List[tuple]:
    """Consecutive equal prompts merged: [(prompt text, number of steps), ...], summing to ``steps``."""
    stages = []
    for p in prompt_per_step(text, steps, counting):
        if stages and stages[-1][0] == p:
            stages[-1][1] += 1
        else:
            stages.append([p, 1])
    return [(p, n) for p, n in stages]


def a1111_schedule(text: str, steps: int) -> List[list]:
    """A1111's own ``[[end_at_step, text], ...]`` representation (for comparing with its doctests)."""
    tree = parse(text)
    if tree is None:
        return [[steps, text]]
    points = {steps}

    def collect(node):
        if isinstance(node, _Sched):
            node.step = resolve_when(node.when, steps)
            if node.step >= 1:
                points.add(node.step)
        else:
            points.update(range(1, steps + 1))

    _walk(tree, collect)
    return [[t, text_at(tree, t)] for t in sorted(points)]
