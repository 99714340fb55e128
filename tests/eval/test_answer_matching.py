"""herd eval's answer matching against references nobody here wrote: lm-eval's exact_match
(`exact_match_hf_evaluate`, HF evaluate's exact_match copied into lm_eval/api/metrics.py) for the
ignore_case / ignore_punctuation / regexes_to_ignore options, lm-eval's own GSM8K task (its YAML's
regex filters and exact_match settings) and math-verify for numbers; plus properties that fail if a
number's reading takes a neighbour's digits ("3/4" is not 34, "1e3" is not 13), and the one-line
errors for bad option values."""

from __future__ import annotations

import inspect
import random
from fractions import Fraction
from pathlib import Path

import pytest

from herd.errors import HerdError
from herd.eval.tasks import is_correct, load_task
from tests.cli_errors import run_cli_error
from tests.train.posttrain_fixtures import write_jsonl

GSM8K_OPTS = {"ignore_case": True, "ignore_punctuation": False,
              "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}  # lm-eval's gsm8k.yaml


def _lm_eval_exact_match(pred: str, ref: str, **opts) -> bool:
    metrics = pytest.importorskip("lm_eval.api.metrics")
    return float(metrics.exact_match_hf_evaluate(predictions=[pred], references=[ref], **opts)["exact_match"]) == 1.0


# (reply, answer, options): none has surrounding space, quotes or a final period left once normalised,
# where herd's own cleaning (kept by default) would differ from lm-eval's plain ==.
EXACT_CASES = [
    ("Paris", "paris", {}),                                            # lm-eval's default is case-sensitive too
    ("Paris", "paris", {"ignore_case": True}),
    ("PARIS", "Paris", {"ignore_case": True}),
    ("Straße", "STRASSE", {"ignore_case": True}),                      # str.lower, not casefold: no match
    # (Not "İstanbul": lm-eval's np.char.lower keeps the array's width, so "İ".lower(), two
    # characters, cuts the word's last letter off; herd's str.lower does not.)
    ("Paris", "Paris!", {}),
    ("Paris", "Paris!", {"ignore_punctuation": True}),
    ("Washington, D.C", "Washington DC", {"ignore_punctuation": True}),
    ("it's", "its", {"ignore_punctuation": True}),
    ("1.5", "15", {"ignore_punctuation": True}),                       # lm-eval's rule on text, lossy on numbers
    ("«Paris»", "Paris", {"ignore_punctuation": True}),                # only ASCII punctuation goes
    ("Paris…", "Paris", {"ignore_punctuation": True}),
    ("PARIS!", "paris", {"ignore_case": True, "ignore_punctuation": True}),
    ("The answer is Paris", "Paris", {"regexes_to_ignore": ["^The answer is "]}),
    ("The answer is Paris", "Paris", {"regexes_to_ignore": ["^the answer is "], "ignore_case": True}),  # regexes first
    ("abc x", "x", {"regexes_to_ignore": ["ABC "], "ignore_case": True}),
    ("a-b-c", "abc", {"regexes_to_ignore": ["-"]}),
    ("Work: 48/2 = 24\n#### 72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", GSM8K_OPTS),
    ("#### $1,000.", "#### 1000", GSM8K_OPTS),
    ("#### 1000", "#### 1001", GSM8K_OPTS),
    ("x", "y", {"regexes_to_ignore": []}),
    ("Chapter 12", "Chapter 7", {"ignore_numbers": True}),            # digits dropped from both sides
    ("Chapter 12", "chapter 7", {"ignore_numbers": True, "ignore_case": True}),
    ("v1.2-beta", "v-beta", {"ignore_numbers": True, "ignore_punctuation": True}),  # punctuation, then digits
    ("Route 66", "Route 6", {"ignore_numbers": True}),
    ("Route 66", "Route 6a", {"ignore_numbers": True}),
    ("x²", "x", {"ignore_numbers": True}),                            # only 0-9 go
]


@pytest.mark.parametrize("reply,answer,opts", EXACT_CASES)
def test_exact_match_options_are_lm_evals(reply, answer, opts):
    want = _lm_eval_exact_match(reply, answer, **opts)
    assert is_correct(reply, answer, "exact", **opts) is want
    if not any(c.isdigit() for c in answer) or opts.get("ignore_numbers"):
        # a text answer, or any answer once digits are ignored: "auto" compares it as "exact" does
        assert is_correct(reply, answer, **opts) is want


def test_defaults_are_lm_evals():
    """A line without the options scores as before: lm-eval's defaults are all off too."""
    metrics = pytest.importorskip("lm_eval.api.metrics")
    params = inspect.signature(metrics.exact_match_hf_evaluate).parameters
    ours = inspect.signature(is_correct).parameters
    for key in ("ignore_case", "ignore_punctuation"):
        assert params[key].default is False and ours[key].default is False
    assert params["regexes_to_ignore"].default is None and not ours["regexes_to_ignore"].default
    assert not is_correct("garden", "GARDEN") and not is_correct("garden", "GARDEN", "exact")


def test_herd_still_strips_what_lm_eval_leaves_to_filters():
    # herd's cleaning (surrounding space, quotes, a final period) is kept under the options; lm-eval
    # leaves it to a task's filters, so its bare metric says no here.
    assert is_correct(' "PARIS". ', "paris", ignore_case=True)
    assert not _lm_eval_exact_match(' "PARIS". ', "paris", ignore_case=True)
    assert is_correct('"Paris" !', "Paris", ignore_punctuation=True)  # space left by the "!" goes too
    assert is_correct("\u0130stanbul", "i\u0307stanbul", ignore_case=True)  # see EXACT_CASES


@pytest.mark.parametrize("reply,answer", [
    ("Sure: PARIS is it", "paris"), ("the U.S.A. won", "USA"), ("X: 42", "x 42")])
def test_contains_takes_the_options(reply, answer):
    assert not is_correct(reply, answer, "contains")
    assert is_correct(reply, answer, "contains", ignore_case=True, ignore_punctuation=True)
    assert not is_correct(reply, answer + "z", "contains", ignore_case=True, ignore_punctuation=True)


# --- numbers against lm-eval's GSM8K task ---------------------------------------------------------

def _gsm8k():
    """lm-eval's gsm8k.yaml, read from the installed lm_eval: its filters and exact_match settings."""
    pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    import lm_eval

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    metric = next(m for m in cfg["metric_list"] if m["metric"] == "exact_match")
    opts = {k: metric[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
    return opts, filters


def _lm_eval_gsm8k(reply: str, answer, which: str) -> bool:
    opts, filters = _gsm8k()  # skips without lm_eval
    from lm_eval.filters.extraction import RegexFilter

    f = filters[which]
    got = RegexFilter(regex_pattern=f["regex_pattern"], group_select=f.get("group_select", 0)).apply([[reply]], [{}])
    return _lm_eval_exact_match(list(got)[0][0], str(answer), **opts)


def test_gsm8k_config_is_the_one_copied_here():
    opts, filters = _gsm8k()
    assert opts == GSM8K_OPTS
    assert filters["strict-match"]["regex_pattern"] == "#### (\\-?[0-9\\.\\,]+)"


# lm-eval's flexible-extract (the last number) says these are right; herd agrees.
AGREE = [
    ("So she has 72 clips.", 72), ("The total is $1,000.", 1000), ("It dropped to -12 degrees", -12),
    ("Answer: 0.5", "0.5"), ("#### 42", 42), ("she pays $18 a day", "18"), ("1,234,567 people", 1234567),
]
# herd reads what lm-eval's "-?[$0-9.,]" regex cannot: lm-eval scores these wrong.
HERD_READS = [
    ("It dropped to \u221212 degrees.", -12), ("That is 1e3 grams", 1000), ("She ate 3/4 of it", 0.75),
    ("The answer is 12.0", 12), ("#### \u22125", -5), ("so 2.5E-2 of it", "0.025"), ("It is 1 3/4 cups", "7/4"),
]
# Both say wrong: a neighbour's digits are not the number's.
BOTH_WRONG = [
    ("That is 34", "3/4"), ("That is 13", "1e3"), ("That is 1e3", 13), ("She ate 3/4 of it", 34),
    ("version 1.2.3", 3), ("It is 1 3/4 cups", 0.75),
]


@pytest.mark.parametrize("reply,answer", AGREE)
def test_numbers_lm_eval_reads_herd_reads(reply, answer):
    assert _lm_eval_gsm8k(reply, answer, "flexible-extract") and is_correct(reply, answer)


@pytest.mark.parametrize("reply,answer", HERD_READS)
def test_numbers_lm_evals_regex_misses(reply, answer):
    assert not _lm_eval_gsm8k(reply, answer, "flexible-extract")
    assert is_correct(reply, answer)


@pytest.mark.parametrize("reply,answer", BOTH_WRONG)
def test_numbers_neither_reads_as_the_answer(reply, answer):
    assert not _lm_eval_gsm8k(reply, answer, "flexible-extract") and not is_correct(reply, answer)


@pytest.mark.parametrize("reply,answer,lm_eval_says", [
    # A dash after a digit is a subtraction (or a hyphen, "COVID-19"); lm-eval reads "-3".
    ("so 5-3", -3, True),
    # A fraction is its value; lm-eval reads its denominator.
    ("She ate 3/4 of it", 4, True),
    ("so 5-3", 3, False),
    # Commas that do not group thousands are a list; lm-eval drops them: "123".
    ("the first are 1,2,3", 123, True),
    ("the first are 1,2,3", 3, False),
])
def test_where_herd_differs_from_lm_eval_on_purpose(reply, answer, lm_eval_says):
    assert _lm_eval_gsm8k(reply, answer, "flexible-extract") is lm_eval_says
    assert is_correct(reply, answer) is not lm_eval_says


def test_gsm8k_strict_match_marker():
    # strict-match takes the first "#### N"; herd too, before the reply's last number.
    reply = "48 / 2 = 24 and 48 + 24 = 72\n#### 72\nOr 73?"
    assert _lm_eval_gsm8k(reply, 72, "strict-match") and is_correct(reply, 72) and not is_correct(reply, 73)
    assert is_correct("#### \u221272", -72) and not _lm_eval_gsm8k("#### \u221272", -72, "strict-match")
    assert is_correct("#### 1.2.3\nso 7", 7)  # a marker followed by no number: the last number


# --- numbers against math-verify --------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [
    ("3/4", "0.75"), ("0.75", "3/4"), ("1,000", "1000"), ("$1,000", "1000"), ("-3/4", "-0.75"), ("34", "3/4"),
    ("12.0", "12"), (".5", "0.5"), ("1/2", "2"), ("2.5", "5/2"), ("7/4", "1.75"), ("1000000000001", "1000000000000"),
    ("0.333", "1/3"), ("3", "3/4"), ("43", "4/3"), ("1/4", "0.25"), ("-12", "-12.00"),
])
def test_number_equivalence_is_math_verifys(a, b):
    mv = pytest.importorskip("math_verify")
    want = mv.verify(mv.parse(b), mv.parse(f"The answer is {a}."))
    assert is_correct(f"The answer is {a}.", b) is want


# --- properties: every way of writing n reads as n, and as nothing next to it ----------------------

def _forms(n: int, rng: random.Random) -> dict[str, str]:
    minus = rng.choice(["-", "\u2212"]) if n < 0 else ""
    m = abs(n)
    k = len(str(m)) - len(str(m).rstrip("0"))  # m = mantissa * 10**k
    return {"plain": f"{minus}{m}", "commas": f"{minus}{m:,}", "dollars": f"{minus}${m:,}",
            "point_zero": f"{minus}{m}.0", "sci": f"{minus}{m // 10**k}e{k}", "sci_upper": f"{minus}{m // 10**k}E+{k}"}


def test_every_form_of_a_number_reads_as_it_and_nothing_near_it():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([1, -1]) * rng.choice([rng.randrange(0, 100), rng.randrange(100, 10**7),
                                              rng.randrange(1, 100) * 10 ** rng.randrange(1, 12)])
        for name, text in _forms(n, rng).items():
            reply = rng.choice(["The answer is {}.", "so {}", "#### {}", "x = {} apples, in all"]).format(text)
            assert is_correct(reply, n), (name, reply, n)
            assert is_correct(reply, str(n)) and is_correct(f"It is {n}.", text), (name, text)
            for wrong in (n + 1, n - 1, n * 10 + 1, -n if n else 1):
                assert not is_correct(reply, wrong), (name, reply, wrong)
            if name.startswith("sci"):  # "1e3" is not 13, nor 1 nor 3
                mant, _, exp = text.lstrip("-\u2212").replace("E+", "e").partition("e")
                for wrong in (int(mant + exp), int(mant), int(exp)):
                    if wrong != abs(n):
                        assert not is_correct(reply, wrong), (reply, wrong)


def test_fractions_read_as_their_value_and_not_their_digits():
    rng = random.Random(1)
    for _ in range(300):
        p, q = rng.randrange(1, 200), rng.randrange(1, 200)
        value = Fraction(p, q)
        reply = f"She ate {p}/{q} of the cake."
        assert is_correct(reply, f"{p}/{q}") and is_correct(reply, f"{2 * p}/{2 * q}")
        if value.denominator in (1, 2, 4, 5, 8, 10, 20, 25):  # a decimal it equals
            assert is_correct(reply, float(value)) and is_correct(f"So {float(value)}", f"{p}/{q}")
        for wrong in {int(f"{p}{q}"), p, q, float(Fraction(q, p)) if p != q else -1} - {value}:
            assert not is_correct(reply, wrong), (reply, wrong)
        assert not is_correct(f"It is {p}{q}", f"{p}/{q}") or Fraction(int(f"{p}{q}")) == value


@pytest.mark.parametrize("reply,answer,ok", [
    # dates, versions, ratios: not numbers, so not the digits in them
    ("on 2024/05", 5, False), ("on 2024/05", Fraction(2024, 5).__float__(), False), ("on 05/06/2024", 2024, False),
    ("python 3.11.2", 2, False), ("python 3.11.2", 0.2, False), ("IP 10.0.0.1", 1, False),
    ("a ratio of 3:4", 4, True),  # a ratio's last number, as before
    ("it is 1/0", 0, False), ("1,00,000", 100000, False),
    ("COVID-19", 19, True), ("COVID-19", -19, False), ("The temperature is (\u22123)", -3, True),
    ("costs -$5", -5, True), ("costs $-5", -5, True), ("item no.5", 5, True), ("item no.5", 0.5, False),
    ("it is 12.", 12, True), ("It is 1,234.", 1234, True),
    # an answer with a period, a currency or a percent
    ("it is 42", "42.", True), ("it is 5", "\u20ac5", True), ("it is 25", "25%.", True), ("it is \u22123", "-3", True),
    # 1e-9 absolute and relative, exactly
    ("0.30000000000000004", 0.3, True), ("1e-12", "2e-12", False), ("1000000000001", 1000000000000, False),
    ("123456789012345678901", "123456789012345678900", False),
    ("1e99999", 1, False), ("1" * 5000, 1, False),  # too big to read: no number, no hang
    ("it is 1e400", 10**400, True), ("it is 1e401", 10**400, False),  # a Python int answer past float's range
])
def test_number_pitfalls(reply, answer, ok):
    assert is_correct(reply, answer) is ok


def test_text_answers_that_look_like_numbers_stay_text():
    # not one number: compared as text, as before
    for answer in ("1.2.3", "2024/05", "3:4", "1,2,3", "1 000"):
        assert is_correct(f" {answer}.", answer) and not is_correct("123", answer)


# --- the options in a task file, and bad values -------------------------------------------------------

def test_options_in_a_task_line_reach_the_scoring(tmp_path, monkeypatch):
    import herd.api
    from herd.eval.tasks import evaluate_items
    from tests.train.posttrain_fixtures import make_tiny_model

    model, tok = herd.load(make_tiny_model(tmp_path / "m", seed=3), for_inference=False)
    task = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "capital?", "answer": "paris", "ignore_case": True},
        {"prompt": "capital?", "answer": "paris"},
        {"prompt": "gsm", "answer": "work... #### 1000", **GSM8K_OPTS, "match": "exact"},
        {"prompt": "gsm", "answer": "work... #### 1000", "regexes_to_ignore": ["(?s).*#### "]},  # numeric once removed
    ])
    replies = iter(["PARIS", "PARIS", "so #### $1,000.", "so #### 1,000"])
    monkeypatch.setattr(herd.api, "generate", lambda m, t, prompts, **kw: [next(replies) for _ in prompts])
    r = evaluate_items(model, tok, load_task(task), chat_template=False, batch_size=4)
    assert r.correct_items == [True, False, True, True]


_run = run_cli_error


@pytest.mark.parametrize("row,message", [
    ({"ignore_case": "yes"}, "'ignore_case' must be true or false, got \"yes\""),
    ({"ignore_case": 1}, "'ignore_case' must be true or false, got 1"),
    ({"ignore_case": None}, "'ignore_case' must be true or false, got null"),
    ({"ignore_punctuation": "false"}, "'ignore_punctuation' must be true or false, got \"false\""),
    ({"regexes_to_ignore": ","}, "'regexes_to_ignore' must be a list of regular expressions (strings), got \",\""),
    ({"regexes_to_ignore": [1]}, "'regexes_to_ignore' must be a list of regular expressions"),
    ({"regexes_to_ignore": {"a": 1}}, "'regexes_to_ignore' must be a list of regular expressions"),
    ({"regexes_to_ignore": ["ok", "(unclosed"]}, "'regexes_to_ignore' has '(unclosed', not a regular expression: "),
    ({"answer": "The answer: ", "regexes_to_ignore": ["The answer: "]}, "'answer' is empty once the line's"),
    ({"answer": "?!", "ignore_punctuation": True}, "'answer' is empty once the line's 'regexes_to_ignore' / "
                                                   "'ignore_punctuation' / 'ignore_numbers' remove what they match"),
    ({"answer": 42, "ignore_numbers": True}, "'answer' is empty once the line's"),
    ({"answer": "12.", "ignore_numbers": True, "ignore_punctuation": True}, "'answer' is empty once the line's"),
    ({"ignore_numbers": "yes"}, "'ignore_numbers' must be true or false, got \"yes\""),
    ({"answer": "1", "match": "math", "ignore_numbers": True}, "'ignore_numbers' does not apply to 'match': 'math'"),
    ({"choices": ["a", "b"], "answer": 0, "ignore_case": True},
     "'ignore_case' applies to generation items (their reply is matched as text); a multiple-choice item"),
])
def test_bad_option_values_are_one_line_naming_file_and_line(tmp_path, capsys, row, message):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "fine", "answer": "x"} if "choices" not in row else
                                              {"prompt": "fine", "choices": ["a", "b"], "answer": 0},
                                              {"prompt": "p", "answer": "x", **row}])
    with pytest.raises(HerdError) as e:
        load_task(task)
    assert str(e.value).startswith(f"{task}:2: ") and message in str(e.value), str(e.value)
    line = _run(["eval", "--model", "/nonexistent/model-dir", "--task", str(task)], capsys)  # before the model
    assert f"{task}:2: " in line and message in line


def test_is_correct_checks_its_options_too():
    with pytest.raises(HerdError, match="'ignore_case' must be true or false"):
        is_correct("a", "a", ignore_case="no")
    with pytest.raises(HerdError, match="'regexes_to_ignore' has '\\['"):
        is_correct("a", "a", regexes_to_ignore=["["])


def test_the_answer_verifier_reads_the_same_options():
    # herd sample --verifier answer scores prompt lines with this matching: the options count there too.
    from herd.train.rejection import check_verifier_records, verifier_scorer

    score = verifier_scorer("answer")
    assert score(None, {"answer": "paris", "ignore_case": True}, ["PARIS", "Rome"]) == [1.0, 0.0]
    assert score(None, {"answer": "paris"}, ["PARIS"]) == [0.0]
    with pytest.raises(HerdError, match="^p.jsonl:3: 'ignore_case' must be true or false"):
        check_verifier_records("answer", [("p.jsonl:3", [], {"answer": "x", "ignore_case": "yes"})])
