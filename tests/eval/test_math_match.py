"""herd eval's "match": "math" against lm-eval's minerva_math `math_verify` metric: lm-eval scores a
reply as `verify(gold=parse(doc["solution"]), target=parse(reply))` on the problem's whole worked
solution (lm_eval/tasks/minerva_math/utils.py, process_results; importing that module needs an
antlr4 pin this environment does not have, so its two calls are made here as it makes them). herd's
task line holds only the final answer, bare LaTeX without "$"; the verdicts must agree. Plus the
one-line errors for a line no reply could match."""

from __future__ import annotations

import pytest

from herd.errors import HerdError
from herd.eval.tasks import evaluate_items, is_correct, load_task
from tests.train.posttrain_fixtures import write_jsonl

mv = pytest.importorskip("math_verify")

# (final answer as MATH writes it, replies): MATH-style answers — fractions, roots, π, intervals,
# sets, tuples, negatives, expressions, percentages, degrees, big integers, text.
CASES = [
    ("\\frac{2}{3}", ["The answer is $\\boxed{\\dfrac{4}{6}}$.", "so $x = \\boxed{0.666667}$", "$\\boxed{2/3}$",
                     "$\\boxed{\\frac{3}{2}}$", "the answer is 0.67", "I think it is 2/3"]),
    ("-\\frac{2}{3}", ["$\\boxed{-\\frac{2}{3}}$", "$\\boxed{\\frac{2}{3}}$", "$\\boxed{\\frac{-2}{3}}$"]),
    ("\\sqrt{2}", ["$\\boxed{\\sqrt 2}$", "$\\boxed{2^{1/2}}$", "$\\boxed{1.414}$", "$\\boxed{\\sqrt{3}}$"]),
    ("2\\pi", ["$\\boxed{2\\pi}$", "$\\boxed{\\pi \\cdot 2}$", "$\\boxed{6.283185}$", "$\\boxed{\\pi}$"]),
    ("(-\\infty, 3]", ["$\\boxed{(-\\infty,3]}$", "$\\boxed{(-\\infty, 3)}$", "$\\boxed{x \\le 3}$"]),
    ("\\{1, 2, 3\\}", ["$\\boxed{\\{3,2,1\\}}$", "$\\boxed{\\{1, 2\\}}$", "$\\boxed{1, 2, 3}$"]),
    ("(3, -1)", ["$\\boxed{(3,-1)}$", "$\\boxed{(-1, 3)}$"]),
    ("x^2 + 2x + 1", ["$\\boxed{(x+1)^2}$", "$\\boxed{x^2+2x+1}$", "$\\boxed{x^2+1}$"]),
    ("24", ["$\\boxed{24}$", "Final Answer: The final answer is $24$.", "24.0", "$\\boxed{25}$", "no idea"]),
    ("1{,}000", ["$\\boxed{1000}$", "$\\boxed{1,000}$", "$\\boxed{100}$"]),
    ("12345678901234567890", ["$\\boxed{12345678901234567890}$", "$\\boxed{12345678901234567891}$"]),
    ("30^\\circ", ["$\\boxed{30^\\circ}$", "$\\boxed{30}$", "$\\boxed{60^\\circ}$"]),
    ("\\text{(C)}", ["$\\boxed{\\text{(C)}}$", "$\\boxed{\\text{(B)}}$"]),
]


def _lm_eval_math_verify(answer: str, reply: str) -> bool:
    solution = f"Working omitted, so the answer is $\\boxed{{{answer}}}$."
    return bool(mv.verify(gold=mv.parse(solution), target=mv.parse(reply)))


@pytest.mark.parametrize("answer,replies", CASES, ids=[a for a, _ in CASES])
def test_math_match_is_lm_evals_math_verify(answer, replies):
    verdicts = [(reply, is_correct(reply, answer, "math")) for reply in replies]
    assert verdicts == [(reply, _lm_eval_math_verify(answer, reply)) for reply in replies]
    assert verdicts[0][1], "the first reply of each case is a right one"


def test_json_numbers_and_delimited_answers():
    # a JSON number is that number; an answer that already has "$" or \boxed is read as written
    assert is_correct("$\\boxed{\\frac{1}{2}}$", 0.5, "math") and is_correct("$\\boxed{7}$", 7, "math")
    assert not is_correct("$\\boxed{0.3}$", 0.5, "math")
    assert is_correct("$\\boxed{\\frac12}$", "$0.5$", "math") and is_correct("so 3", "\\boxed{3}", "math")


def test_math_lines_in_a_task_file(tmp_path, monkeypatch):
    import herd.api
    from tests.train.posttrain_fixtures import make_tiny_model

    model, tok = herd.load(make_tiny_model(tmp_path / "m", seed=3), for_inference=False)
    task = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "p1", "answer": "\\frac{3}{4}", "match": "math"},
        {"prompt": "p2", "answer": "\\frac{3}{4}", "match": "math"},
        {"prompt": "p3", "answer": 0.75, "match": "math"},
        {"prompt": "p4", "answer": "The answer: 9", "match": "math", "regexes_to_ignore": ["The answer: "]},
    ])
    replies = iter(["Hence $\\boxed{0.75}$.", "Hence $\\boxed{3/5}$.", "$\\boxed{\\tfrac34}$", "$\\boxed{3^2}$"])
    monkeypatch.setattr(herd.api, "generate", lambda m, t, prompts, **kw: [next(replies) for _ in prompts])
    r = evaluate_items(model, tok, load_task(task), chat_template=False, batch_size=4)
    assert r.correct_items == [True, False, True, True]


@pytest.mark.parametrize("row,message", [
    ({"answer": "\\text{}", "match": "math"}, "math-verify reads no expression in 'answer' \"\\\\text{}\""),
    ({"answer": "x", "match": "math", "ignore_case": True}, "'ignore_case' does not apply to 'match': 'math'"),
    ({"answer": "Answer: ", "match": "math", "regexes_to_ignore": ["Answer: "]}, "'answer' is empty once"),
])
def test_lines_no_reply_could_match_are_refused(tmp_path, row, message):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "fine", "answer": "1", "match": "math"},
                                              {"prompt": "p", **row}])
    with pytest.raises(HerdError) as e:
        load_task(task)
    assert str(e.value).startswith(f"{task}:2: ") and message in str(e.value), str(e.value)


def test_the_answer_verifier_checks_math_lines_too():
    from herd.train.rejection import check_verifier_records, verifier_scorer

    score = verifier_scorer("answer")
    assert score(None, {"answer": "\\frac{1}{2}", "match": "math"}, ["$\\boxed{0.5}$", "$\\boxed{2}$"]) == [1.0, 0.0]
    with pytest.raises(HerdError, match="^p.jsonl:3: math-verify reads no expression"):
        check_verifier_records("answer", [("p.jsonl:3", [], {"answer": "\\text{}", "match": "math"})])
