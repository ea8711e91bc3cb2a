"""Graders on a table of tricky answers (math via Math-Verify, mcq letters, exact strings, code)."""
from __future__ import annotations

import pytest

from branchmerge.trainer.grading import grade
from branchmerge.trainer.grading.code import extract_program, parse_tests, stdout_matches
from branchmerge.trainer.grading.text import boxed_contents

B = "\\boxed"

# (kind, response, reference, expected correct, expected extracted or None to skip)
TABLE = [
    # math: fractions vs decimals, LaTeX spacing, nested braces, several boxes
    ("math", rf"so {B}{{\frac{{1}}{{2}}}}", "0.5", True, r"\frac{1}{2}"),
    ("math", rf"{B}{{0.5}}", r"\frac12", True, "0.5"),
    ("math", rf"{B}{{\dfrac{{3}}{{4}}}}", r"\frac{3}{4}", True, None),
    ("math", rf"{B}{{ \frac {{ 3 }} {{ 4 }} }}", r"\frac{3}{4}", True, None),
    ("math", rf"{B}{{x^2+2x+1}}", "(x+1)^2", True, None),
    ("math", rf"{B}{{2\sqrt{{2}}}}", r"\sqrt{8}", True, None),
    ("math", rf"first {B}{{1}} then {B}{{2}}", "2", True, "2"),
    ("math", rf"first {B}{{1}} then {B}{{2}}", "1", False, "2"),
    ("math", rf"{B}{{90^\circ}}", "90", True, None),
    ("math", rf"{B}{{\{{1,2\}}}}", r"\{2,1\}", True, None),
    ("math", rf"{B}{{(0,1)}}", "[0,1]", False, None),
    ("math", rf"{B}{{\pi/2}}", r"\frac{\pi}{2}", True, None),
    ("math", rf"{B}{{3.14}}", r"\pi", False, None),
    ("math", rf"{B}{{-\frac{{1}}{{3}}}}", "-1/3", True, None),
    ("math", rf"{B}{{\frac{{-1}}{{3}}}}", r"-\frac13", True, None),
    ("math", rf"{B}{{x=3}}", "3", True, None),
    ("math", rf"{B}{{1,000}}", "1000", True, None),
    ("math", rf"{B}{{\left( 1, 2 \right)}}", "(1,2)", True, None),
    ("math", rf"{B}{{\frac{{\sqrt{{3}}}}{{2}}}}", r"\frac{\sqrt3}{2}", True, r"\frac{\sqrt{3}}{2}"),
    ("math", rf"<think>maybe {B}{{5}}</think> The answer is {B}{{6}}", "6", True, "6"),
    ("math", "The answer is 42.", "42", False, None),  # no box: not accepted
    ("math", rf"{B} 7.", "7", True, "7"),
    ("math", rf"{B}{{7}}", rf"{B}{{7}}", True, None),  # reference stored boxed
    ("math", rf"{B}{{\text{{(B)}}}}", "B", True, None),
    ("math", rf"{B}{{8}}", "9", False, "8"),
    # mcq: letter extraction
    ("mcq", "Answer: (C)", "C", True, "C"),
    ("mcq", rf"{B}{{C}}", "C", True, "C"),
    ("mcq", rf"$\boxed{{\text{{(B)}}}}$", "(B)", True, "B"),
    ("mcq", "the answer is C.", "C", True, "C"),
    ("mcq", "I think B is wrong. A is also wrong.\nSo the answer is D", "D", True, "D"),
    ("mcq", "The correct option is **b**", "B", True, "B"),
    ("mcq", "<think>maybe A... no, answer: B</think>\nFinal answer: C", "C", True, "C"),
    ("mcq", "Let me think.\n\n(D)", "D", True, "D"),
    ("mcq", "I choose option (A)", "A", True, "A"),
    ("mcq", "Options A and B are wrong; C is right.", "C", True, "C"),
    ("mcq", "**Answer:** D) 42", "D", True, "D"),
    ("mcq", "B. Because the others fail", "B", True, "B"),
    ("mcq", "I am sure it is a hard one", "A", False, None),
    ("mcq", "The answer is A because I said so.", "B", False, "A"),
    ("mcq", "answer: c", 2, True, "C"),  # reference as an index
    # exact
    ("exact", "The answer is Paris.", "paris", True, "Paris."),
    ("exact", rf"{B}{{\text{{Yes}}}}", "yes", True, None),
    ("exact", "final line\n  **no**  ", ["No", "nope"], True, None),
    ("exact", "Answer: London", "Paris", False, "London"),
]


@pytest.mark.parametrize("kind,response,reference,correct,extracted", TABLE,
                         ids=[f"{i}-{row[0]}" for i, row in enumerate(TABLE)])
def test_grader_table(kind, response, reference, correct, extracted):
    verdict = grade(kind, response, {"answer": reference})
    assert verdict.correct is correct, verdict
    assert verdict.reason == ("correct" if correct else verdict.reason) and verdict.reason
    if extracted is not None:
        assert verdict.extracted == extracted


def test_table_is_large_enough():
    assert len(TABLE) >= 40


def test_no_reference_and_none_kind():
    assert grade("math", rf"{B}{{1}}", {}).correct is None
    assert grade("none", "anything", {}).reason == "unverified"
    with pytest.raises(ValueError, match="unknown verification kind"):
        grade("poetry", "x", {})


def test_mcq_choices_limit_valid_letters():
    assert grade("mcq", "so it is E", {"answer": "E", "choices": ["1", "2", "3", "4"]}).correct is False
    assert grade("mcq", "so it is E", {"answer": "E"}).correct is True


def test_boxed_nested_and_escaped_braces():
    assert boxed_contents(r"\boxed{\frac{a}{b^{2}}} x \fbox{\{1\}} \boxed{open") == [r"\frac{a}{b^{2}}", r"\{1\}"]


ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
STDIN_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}]


@pytest.mark.parametrize("response,tests,reason", [
    (f"Reasoning...\n{ADD}", STDIN_TESTS, "correct"),
    ("```python\nprint(0)\n```\nfinal:\n" + ADD, STDIN_TESTS, "correct"),  # the last python block
    ("```python\nprint(3)\n```", STDIN_TESTS, "wrong_answer"),
    ("```python\nraise SystemExit(4)\n```", STDIN_TESTS, "runtime_error"),
    ("no code at all", STDIN_TESTS, "no_code"),
    (ADD, {"inputs": ["2 2"], "outputs": ["4"]}, "correct"),
    ("```py\ndef add(a, b):\n    print('noise')\n    return a + b\n```", {"fn_name": "add", "inputs": [[1, 2], [0.1, 0.2]],
                                                                       "outputs": [3, 0.3]}, "correct"),
    ("```python\nclass Solution:\n    def twoSum(self, nums, t):\n        return [0, 1]\n```",
     '[{"input": "[2,7]\\n9", "output": "[0, 1]", "testtype": "functional"}]', "correct"),
    ("```python\ndef f(x):\n    return x\n```", {"fn_name": "f", "inputs": [[1]], "outputs": [2]}, "wrong_answer"),
    ("```python\ndef f(x):\n    return 1 / 0\n```", {"fn_name": "f", "inputs": [[1]], "outputs": [2]}, "runtime_error"),
    ("```python\ndef g(x):\n    return x\n```", {"fn_name": "f", "inputs": [[1]], "outputs": [1]}, "runtime_error"),
    ("```python\nimport sys\nprint(sum(int(x) for x in sys.stdin.read().split()) + 0.0000001)\n```",
     [{"input": "1 2", "output": "3.0"}], "correct"),
])
def test_code_grader(response, tests, reason):
    record = {"tests": tests}
    if isinstance(tests, str):
        record["metadata"] = '{"func_name": "twoSum"}'
    verdict = grade("code", response, record, timeout_seconds=5)
    assert verdict.reason == reason, verdict
    assert verdict.correct is (reason == "correct")


def test_code_grader_timeout_per_functional_case():
    response = "```python\ndef f(x):\n    while x: pass\n    return x\n```"
    verdict = grade("code", response, {"tests": {"fn_name": "f", "inputs": [[0], [1]], "outputs": [0, 1]}},
                    timeout_seconds=0.5)
    assert verdict.reason == "timeout"


def test_bad_tests_are_ungradable():
    assert grade("code", ADD, {"tests": [{"input": "x", "output": "y", "testtype": "functional"}]}).correct is None
    assert grade("code", ADD, {}).reason == "no_tests"


def test_helpers():
    assert extract_program("```\nprint(1)\n```") == "print(1)\n"
    assert stdout_matches("1 2  \n3\n\n", "1 2\n3") and not stdout_matches("1 2", "1 3")
    assert parse_tests({"fn_name": "f", "inputs": ["1\n\"a\""], "outputs": ["[1]"]}).inputs == [[1, "a"]]
