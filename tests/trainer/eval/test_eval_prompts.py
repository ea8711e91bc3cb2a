import pytest

from branchmerge.trainer.eval.prompts import (TemplateError, lettered, mcq_view, placeholders, reference_index,
                                              render, shuffled_order)


def test_render_replaces_fields_and_keeps_single_braces():
    template = "{{prompt}}\nPlease reason step by step, and put your final answer within \\boxed{}. ({{ source }})"
    out = render(template, {"prompt": "What is 2+2?", "source": "synthetic"})
    assert out == "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}. (synthetic)"
    assert placeholders(template) == ["prompt", "source"]
    assert render("{{n}} items: {{xs}}", {"n": 3, "xs": ["a", "b"]}) == "3 items: a\nb"


def test_render_names_the_missing_field():
    with pytest.raises(TemplateError, match=r"\{\{question\}\}"):
        render("{{question}}", {"prompt": "x"})


def test_lettered_choices():
    assert lettered(["4", " 5 ", "6"]) == "A. 4\nB. 5\nC. 6"


@pytest.mark.parametrize("answer,expected", [("B", 1), ("(c)", 2), ("D.", 3), (0, 0), ("six", 2), ("5", 1)])
def test_reference_index_accepts_letter_index_or_text(answer, expected):
    assert reference_index(answer, ["four", "5", "six", "seven"]) == expected


@pytest.mark.parametrize("answer", ["E", 7, "eight", True])
def test_reference_index_rejects_unknown_answers(answer):
    with pytest.raises(ValueError):
        reference_index(answer, ["four", "5", "six", "seven"])


def test_shuffle_is_seeded_and_remaps_the_reference():
    choices = ["w", "x", "y", "z"]
    a = shuffled_order(4, 0, "gpqa", "q1", 0)
    assert a == shuffled_order(4, 0, "gpqa", "q1", 0)  # stable
    orders = {tuple(shuffled_order(4, 0, "gpqa", "q1", s)) for s in range(20)}
    assert len(orders) > 5  # samples see different orders
    for order in orders:
        text, letter, used = mcq_view(choices, 2, order)
        shown = dict(line.split(". ", 1) for line in text.splitlines())
        assert shown[letter] == "y"  # the reference letter points at the correct option wherever it moved
        assert sorted(used) == [0, 1, 2, 3]
    assert mcq_view(choices, 2) == ("A. w\nB. x\nC. y\nD. z", "C", [0, 1, 2, 3])
