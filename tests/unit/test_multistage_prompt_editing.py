"""A1111 prompt editing parser (samplers/prompt_editing.py).

The expected schedules in the first table are the documented behaviour of AUTOMATIC1111's
``get_learned_conditioning_prompt_schedules`` at 10 steps (its doctests); the rest pin down step
counting, escapes and nesting.
"""
import pytest

from atelier.samplers import prompt_editing as pe

A1111_DOCUMENTED = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_DOCUMENTED, ids=[c[0] for c in A1111_DOCUMENTED])
def test_matches_a1111_schedules(prompt, expected):
    assert pe.a1111_schedule(prompt, 10) == expected


@pytest.mark.parametrize("prompt, steps, counting, expected", [
    # the multistage paper's example: A1111 counts from step index 0 with `i <= when`, so 8 gives 9 steps
    ("[A Chinese dragon:A fish:8]", 20, "a1111", [("A Chinese dragon", 9), ("A fish", 11)]),
    ("[A Chinese dragon:A fish:8]", 20, "exact", [("A Chinese dragon", 8), ("A fish", 12)]),
    ("[A Chinese dragon:A fish:0.4]", 20, "exact", [("A Chinese dragon", 8), ("A fish", 12)]),
    # fractions truncate int(when * steps), float rounding included: 0.29 * 100 = 28.999...
    ("[a:b:0.29]", 100, "exact", [("a", 28), ("b", 72)]),
    ("[a:b:0.5]", 7, "exact", [("a", 3), ("b", 4)]),
    # when beyond the steps is capped; 0 (or a negative) never uses `from`
    ("[a:b:50]", 20, "exact", [("a", 20)]),
    ("[a:b:0]", 20, "a1111", [("b", 20)]),
    ("[a:b:0]", 20, "exact", [("b", 20)]),
    # a number with a decimal point is a fraction even when >= 1 (A1111 >= 1.6): 1.0 means all steps
    ("[a:b:1.0]", 10, "exact", [("a", 10)]),
    ("[a:b:1]", 10, "exact", [("a", 1), ("b", 9)]),
    # [to:when] and [from::when]
    ("cat [with hat:3]", 6, "exact", [("cat ", 3), ("cat with hat", 3)]),
    ("cat[ with hat::3]", 6, "exact", [("cat with hat", 3), ("cat", 3)]),
    # nesting: inner edit inside `to`
    ("[dog:[cat:fox:6]:2]", 10, "exact", [("dog", 2), ("cat", 4), ("fox", 4)]),
    # two independent edits give three stages
    ("[a:b:2] [c:d:4]", 6, "exact", [("a c", 2), ("b c", 2), ("b d", 2)]),
    # alternation every step (A1111 uses the first option on steps 0 and 1)
    ("[x|y]", 4, "a1111", [("x", 2), ("y", 1), ("x", 1)]),
    ("[x|y]", 4, "exact", [("x", 1), ("y", 1), ("x", 1), ("y", 1)]),
])
def test_stages(prompt, steps, counting, expected):
    stages = pe.prompt_stages(prompt, steps, counting)
    assert stages == expected
    assert sum(n for _, n in stages) == steps


@pytest.mark.parametrize("prompt, expected", [
    (r"a \[b\] c", [("a [b] c", 4)]),
    (r"ratio 16\:9 [x:y:2]", [("ratio 16:9 x", 2), ("ratio 16:9 y", 2)]),
    (r"[a\:b:c:2]", [("a:b", 2), ("c", 2)]),
    (r"[\[x\]:y:2]", [("[x]", 2), ("y", 2)]),
    (r"\(not a weight\) [x:y:1]", [(r"\(not a weight\) x", 1), (r"\(not a weight\) y", 3)]),
    (r"a \| b", [("a | b", 4)]),
    ("(a cat:1.2) [x:y:2]", [("(a cat:1.2) x", 2), ("(a cat:1.2) y", 2)]),
])
def test_escapes(prompt, expected):
    assert pe.prompt_stages(prompt, 4, "exact") == expected


def test_unparsable_prompt_is_used_unchanged():
    assert pe.prompt_stages("a | b [c:2]", 4) == [("a | b [c:2]", 4)]
    assert pe.prompt_stages("[a:b:c]", 4) == [("[a:b:c]", 4)]


def test_bad_input():
    with pytest.raises(pe.PromptEditingError, match="empty"):
        pe.prompt_stages("   ", 10)
    with pytest.raises(pe.PromptEditingError, match="counting"):
        pe.prompt_stages("a", 10, "ceil")
    with pytest.raises(pe.PromptEditingError, match="at least 1"):
        pe.prompt_stages("a", 0)


def test_resolve_when():
    assert pe.resolve_when("8", 20) == 8
    assert pe.resolve_when(".5", 20) == 10
    assert pe.resolve_when("0.29", 100) == 28
    assert pe.resolve_when("1e1", 20) == 10
    assert pe.resolve_when("100", 20) == 20
