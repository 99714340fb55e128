"""`herd eval`: accuracy on local JSONL tasks (SPEC §6), with a 95% Wilson confidence interval.

Two kinds of item, told apart per line:
- multiple choice (MMLU / ARC style): {"prompt" | "question", "choices": [...], "answer": index,
  letter ("B") or the choice's text, optional "target_delimiter" (default " ")}; scored as
  lm-evaluation-harness scores `output_type: multiple_choice` (lm_eval 0.4.x), so the numbers
  compare: each choice is a continuation of the context, encoded with the context and split after
  the context's tokens (`_encode_pair`: the context's trailing whitespace moves to the
  continuation), and its log-prob summed. acc picks the highest sum, acc_norm the highest sum per
  character of the choice, acc_bytes per UTF-8 byte (lm-eval's names).
- generation (GSM8K style): {"prompt" | "question", "answer", optional "match"}; greedy decoding to
  the end of turn or max_new_tokens, then answer extraction: a numeric answer is compared by value
  with the last number in the reply (GSM8K's "#### N" when present; "−3", "1e3", "3/4", "1 3/4",
  "$1,000", "12." read as numbers, see _TOKEN), any other answer with the reply stripped of
  surrounding space, quotes and a final period; "match": "contains" accepts a reply that contains
  the answer; "match": "math" reads reply and answer with math-verify and compares their values
  (MATH-style LaTeX: "\\frac{2}{3}" = "\\boxed{4/6}"). Optional lm-eval exact_match options per line (MATCH_OPTIONS): "ignore_case",
  "ignore_punctuation", "ignore_numbers" (true/false, default false as in lm-eval) and
  "regexes_to_ignore" (a list).

Chat template or raw prompt (`chat_template`, `herd eval --apply-chat-template` /
`--no-apply-chat-template`): lm-eval's default is the raw prompt (the text as is, BOS where the
tokenizer adds one, continuation = target_delimiter + choice); with `--apply_chat_template` the
context is the chat template's text through the assistant header and the delimiter is "" (so the
header's trailing "\n" is scored as part of every choice, as lm-eval does). herd's default (None)
is the chat template when the tokenizer has one, else raw; pass the flag to compare with a given
lm-eval run. A file holds one kind of item (one metric per file, as an lm-eval task).
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError
from herd.inference.generate import check_max_new_tokens


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# Numbers. A numeric answer is compared with one number read from the reply: GSM8K's "#### N" when
# the reply has one (lm-eval's strict-match, "#### (\-?[0-9\.\,]+)", takes the first), else the
# reply's last number (its flexible-extract, group_select -1). lm-eval then compares the two as
# strings once "," and "$" are removed; herd compares values (as math graders such as math-verify
# do), so "12.0", "1,000" and "$1,000" read as 12 and 1000. Beyond lm-eval's "-?[0-9.,]" runs, these
# are read as numbers, each kept from taking a neighbour's digits for its own:
# - a sign: "-", "+" and U+2212 "−" (typeset text and some detokenisers write it; "−3" read as 3),
#   only where it is a sign: "5-3" ends in 3 and "COVID-19" is 19 (a letter, digit or ")" before
#   the dash makes it a subtraction or a hyphen);
# - a currency symbol before the digits ($ € £ ¥ ₹), the sign before or after it ("-$5", "$-5");
# - thousands commas only in groups of three: "1,000" is 1000, "1,2,3" is a list ending in 3 (it
#   was read as 123);
# - scientific notation, the exponent right after the digits: "1e3", "2.5E-2", "6.02e23" ("1e3" was
#   read as its last digit, 3; it is 1000, not 13 nor 1);
# - a fraction "3/4" (whole numbers, no spaces, no leading zero, denominator not 0), and a mixed
#   number "1 3/4" = 1.75 (read alone, its "3/4" would have matched an answer 0.75).
# Not numbers, where the old pattern read their last digits: a version or address with two points
# ("1.2.3" was .3), a slashed chain ("05/06/2024") and a slash that is no fraction ("2024/05",
# "1/0"); an answer written so stays text and is compared as text. Values are exact (Fraction): a
# float made 123456789012345678901 equal ...900. A trailing period is the sentence's ("12." is 12).
_SIGN = "[-+\u2212]"
_CURRENCY = "[$€£¥₹]"
# A run of digits with points and commas (split by _run_values), then its exponent. A leading point
# (".5") only where no letter or digit is before it: "no.5" is 5, not .5.
_RUN = r"(?:(?<![\w.])\.)?\d(?:[\d.,]*\d)?(?:[eE][-+\u2212]?\d+)?"
_TOKEN = re.compile(
    rf"(?:(?<![\w)\]])(?P<s1>{_SIGN}))?(?P<cur>{_CURRENCY})?(?:(?<={_CURRENCY})(?P<s2>{_SIGN}))?"
    rf"(?:(?P<whole>\d+) (?=\d+/\d))?"  # a mixed number's whole part: only before a fraction
    rf"(?P<body>{_RUN}(?:/{_RUN})*)")
_DECIMAL = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+")
_INTEGER = re.compile(r"0|[1-9]\d*")
_MAX_EXPONENT = 1000  # "1e99999999" would build a 100-million-digit integer; such a token is no number
_GSM8K = re.compile(r"####\s*")


def _run_values(run: str) -> list[Fraction]:
    """The numbers in one run of digits, points and commas (and an exponent): one number when the
    commas group thousands, else the comma-separated numbers; none for a run with two points."""
    m = re.fullmatch(r"([\d.,]+)(?:[eE]([-+\u2212]?\d+))?", run)
    mantissa, exp = m.group(1), m.group(2)
    pieces = [mantissa] if _DECIMAL.fullmatch(mantissa) else mantissa.split(",")
    if any(p.count(".") > 1 for p in pieces):
        return []  # "1.2.3", "10.0.0.1": a version or an address
    values = []
    for j, p in enumerate(pieces):
        if not _DECIMAL.fullmatch(p):
            continue
        text = p.replace(",", "")
        if exp is not None and j == len(pieces) - 1:
            e = int(exp.replace("\u2212", "-"))
            if abs(e) > _MAX_EXPONENT:
                continue
            text += f"e{e}"
        try:
            values.append(Fraction(text))
        except ValueError:  # more digits than int() reads (4300): no one's answer
            continue
    return values


def _token_values(m: re.Match) -> list[Fraction]:
    parts = m.group("body").split("/")
    if len(parts) == 1:
        values = _run_values(parts[0])
    elif len(parts) == 2 and all(_INTEGER.fullmatch(p) for p in parts) and int(parts[1]) != 0:
        values = [Fraction(int(parts[0]), int(parts[1]))]
    else:
        values = []  # a date ("2024/05", "05/06/2024"), a path or n/0: not a number
    whole = m.group("whole")
    if whole is not None:
        if len(parts) == 2 and values and values[0] < 1:
            values = [int(whole) + values[0]]  # "1 3/4"
        else:
            values = [Fraction(int(whole)), *values]  # "2 5/4" is two numbers
    negative = (m.group("s1") or "+") in "-\u2212"
    negative ^= (m.group("s2") or "+") in "-\u2212"
    if negative and values:
        values[0] = -values[0]  # the sign is the first number's ("-1,2" is -1 then 2)
    return values


def _reply_number(reply: str) -> Fraction | None:
    """The number a numeric answer is compared with: the first "#### N" that reads as a number, else
    the reply's last number."""
    for marker in _GSM8K.finditer(reply):
        m = _TOKEN.match(reply, marker.end())
        if m and (values := _token_values(m)):
            return values[0]
    for m in reversed(list(_TOKEN.finditer(reply))):  # read from the end: most tokens are never needed
        if values := _token_values(m):
            return values[-1]
    return None


def _as_number(text: str) -> Fraction | None:
    """An answer's text as one number (see the rules above), a final period and "%" allowed
    ("42.", "25%": the reply's number carries no unit either); None when it is not one number.
    float() alone also took "inf", "NaN", "Infinity" and "1_000", so a task whose answer is the
    word "infinity" compared it as a number and no reply could match."""
    text = text.strip().removesuffix(".").rstrip().removesuffix("%").rstrip()
    m = _TOKEN.fullmatch(text)
    values = _token_values(m) if m else []
    return values[0] if len(values) == 1 else None


def _answer_number(answer: Any) -> Fraction | None:
    """A JSON number as is (1e21 too: its shortest repr, so 0.1 is 1/10); a string only when it reads
    as one number (_as_number)."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if isinstance(answer, int):
            return Fraction(answer)
        return Fraction(repr(answer)) if math.isfinite(answer) else None
    return _as_number(str(answer))


def _same_number(a: Fraction, b: Fraction) -> bool:
    """Equal up to 1e-9, absolute and relative both (exact arithmetic): "0.30000000000000004" is
    0.3 (a float printed by code the model ran), but 1e-12 is not 2e-12 (within 1e-9 of it, as the
    absolute tolerance alone said) and 10**12 + 1 is not 10**12 (as a relative one alone would)."""
    d = abs(a - b)
    tol = Fraction(1, 10**9)
    return d <= tol and d <= tol * max(abs(a), abs(b))


def extract_answer(reply: str, answer: Any) -> str | float | None:
    """The part of `reply` to compare with `answer`: a number for numeric answers, else the text."""
    if _answer_number(answer) is not None:
        got = _reply_number(reply)
        if got is None:
            return None
        try:
            return float(got)
        except OverflowError:  # "1e400"
            return math.inf if got > 0 else -math.inf
    return _clean(reply)


def _clean(reply: str) -> str:
    """The reply without surrounding space, quotes and a final period."""
    text = reply.strip()
    for _ in range(2):  # quotes around a final period, or a period after quotes
        text = text.strip().strip("\"'`").strip().removesuffix(".")
    return text.strip()


MATCHES = ("auto", "exact", "contains", "math")

# "math" (MATH / Minerva style answers: "\frac{2}{3}", "\sqrt{2}", "(1, 2]", "x^2+1"): the reply and the
# answer are read by math-verify, the library lm-eval's minerva_math `math_verify` metric and
# HF's open-r1 use, and compared as it compares them (sympy: 0.5 = \frac{1}{2}, 1+x^2 = x^2+1,
# intervals, sets and matrices; numbers to 6 decimals). The reply is read as math-verify reads it
# (its \boxed{...} first, else LaTeX or a plain expression); a bare answer ("\frac{2}{3}", no "$") is
# read as one LaTeX expression.


def _math_verify():
    try:
        import math_verify
    except ImportError:  # a dependency of herd (pyproject); missing only in a partial install
        raise HerdError("'match': 'math' needs the math-verify package (pip install math-verify)") from None
    return math_verify


def _math_timeouts() -> dict:
    # math-verify bounds sympy's time with SIGALRM, which only the main thread may set
    import threading

    if threading.current_thread() is threading.main_thread():
        return {}
    return {"parsing_timeout": None}


def math_answer(answer: Any) -> list:
    """The answer as math-verify reads it (a list: its sympy value and the text it came from), or []
    when it reads nothing. A JSON number is that number; text with no "$", "\\[" or "\\boxed" is
    read as one LaTeX expression."""
    mv = _math_verify()
    text = repr(answer) if isinstance(answer, float) else str(answer)
    if not any(mark in text for mark in ("$", "\\[", "\\(", "\\boxed")):
        text = f"${text}$"
    return mv.parse(text, **_math_timeouts())


def math_is_correct(reply: str, answer: Any) -> bool:
    mv = _math_verify()
    gold = math_answer(answer)
    got = mv.parse(reply, **_math_timeouts())
    kw = {} if not _math_timeouts() else {"timeout_seconds": None}
    return bool(gold and got and mv.verify(gold, got, **kw))

# lm-eval's exact_match options (lm_eval/api/metrics.py exact_match_hf_evaluate, copied from HF
# evaluate's exact_match), as keys of a task line beside "match": remove each regex from reply and
# answer (re.sub, in order), then lower-case, then drop ASCII punctuation (string.punctuation), in
# that order, then drop the digits 0-9 (ignore_numbers), on both sides. Off by default there too,
# so a line without them scores as before.
MATCH_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DIGITS = str.maketrans("", "", string.digits)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_match_options(options: dict[str, Any], where: str = "answer matching") -> dict[str, Any]:
    """The options present in `options` (a task line, or is_correct's keywords), checked: a string
    "true" would be truthy and a bare string of regexes_to_ignore would be taken character by
    character (as lm-eval does), so each must be what it says, and every regex must compile."""
    out: dict[str, Any] = {}
    for key in ("ignore_case", "ignore_punctuation", "ignore_numbers"):
        if key in options:
            if not isinstance(options[key], bool):
                raise HerdError(f"{where}: '{key}' must be true or false, got {_show(options[key])}")
            out[key] = options[key]
    if "regexes_to_ignore" in options:
        regexes = options["regexes_to_ignore"]
        if regexes is None:
            regexes = []
        if not isinstance(regexes, (list, tuple)) or not all(isinstance(r, str) for r in regexes):
            raise HerdError(f"{where}: 'regexes_to_ignore' must be a list of regular expressions (strings), "
                            f"got {_show(regexes)}")
        for r in regexes:
            try:
                re.compile(r)
            except re.error as e:
                raise HerdError(f"{where}: 'regexes_to_ignore' has {r!r}, not a regular expression: {e}") from None
        out["regexes_to_ignore"] = tuple(regexes)
    return out


def _drop(text: str, regexes: Sequence[str]) -> str:
    for r in regexes:
        text = re.sub(r, "", text)
    return text


def _normalise(text: str, ignore_case: bool, ignore_punctuation: bool, ignore_numbers: bool = False) -> str:
    if ignore_case:
        text = text.lower()  # lm-eval's np.char.lower: str.lower, not casefold ("ß" stays)
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    if ignore_numbers:
        text = text.translate(_DIGITS)
    return text


def is_correct(reply: str, answer: Any, match: str = "auto", *, ignore_case: bool = False,
               ignore_punctuation: bool = False, ignore_numbers: bool = False,
               regexes_to_ignore: Sequence[str] = ()) -> bool:
    """`match`: "auto" (numbers by value, the last number or "#### N"; text exactly; see the rules
    above), "exact" (the stripped reply equals the answer), "contains" (the answer appears in the
    reply; case-sensitive unless ignore_case) or "math" (math-verify's reading and comparison; case
    and punctuation options do not apply). The options are lm-eval's exact_match's (MATCH_OPTIONS): the regexes
    apply to every match, and to the answer when it is text (a JSON number stays that number); case
    and punctuation to text comparisons only (a numeric "auto" answer is compared by value: dropping
    "-" or "." from numbers would make 1.5 equal 15); ignore_numbers makes every comparison one of
    text, as in lm-eval, where the digits are dropped from both sides."""
    check_match_options({"ignore_case": ignore_case, "ignore_punctuation": ignore_punctuation,
                         "ignore_numbers": ignore_numbers, "regexes_to_ignore": regexes_to_ignore})
    if match not in MATCHES:
        raise HerdError(f"unknown answer match {match!r}; choose {', '.join(MATCHES)}")
    reply = _drop(reply, regexes_to_ignore)
    if isinstance(answer, str):
        answer = _drop(answer, regexes_to_ignore)
    if match == "math":
        return math_is_correct(reply, answer)
    if match == "auto" and not ignore_numbers and (want := _answer_number(answer)) is not None:
        got = _reply_number(reply)
        return got is not None and _same_number(got, want)
    reply = _normalise(reply, ignore_case, ignore_punctuation, ignore_numbers)
    text = _normalise(str(answer), ignore_case, ignore_punctuation, ignore_numbers)
    if match == "contains":
        return text in reply
    # The answer is cleaned as the reply is (lm-eval's exact_match applies its normalisation to both
    # sides): a reply "Washington D.C." was cleaned to "Washington D.C" and never equalled its answer.
    return _clean(reply) == _clean(text)


def check_generation_answer(answer: Any, where: str) -> None:
    """A generated reply is compared with the answer's text or number: null was compared with the
    text "None", true with "True", and an empty answer matched every empty (or, with "contains",
    every) reply — refuse those, naming the line."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise HerdError(f"{where}: 'answer' must be a string or a number, got {json.dumps(answer)}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise HerdError(f"{where}: 'answer' must be a finite number, got {answer}")
    if isinstance(answer, str) and not _clean(answer):  # '"."' is empty once cleaned as replies are
        raise HerdError(f"{where}: 'answer' is empty")


def check_answer_matching(answer: Any, match: str, options: dict[str, Any], where: str) -> None:
    """A generation line's answer under its match and options (check_match_options'): refused when
    no reply could match it right — empty once the options remove what they match (it would match
    every empty, or with "contains" every, reply), or, for "math", not an expression."""
    if match == "math" and (text_only := [k for k in ("ignore_case", "ignore_punctuation", "ignore_numbers")
                                          if k in options]):
        raise HerdError(f"{where}: '{text_only[0]}' does not apply to 'match': 'math' "
                        "(math-verify compares values, not text)")
    if options and (isinstance(answer, str) or options.get("ignore_numbers")):
        text = _drop(answer, options.get("regexes_to_ignore", ())) if isinstance(answer, str) else str(answer)
        if not _clean(_normalise(text, False, options.get("ignore_punctuation", False),
                                 options.get("ignore_numbers", False))):
            raise HerdError(f"{where}: 'answer' is empty once the line's 'regexes_to_ignore' / "
                            "'ignore_punctuation' / 'ignore_numbers' remove what they match")
    if match == "math":
        if isinstance(answer, str):
            answer = _drop(answer, options.get("regexes_to_ignore", ()))
        if not math_answer(answer):
            raise HerdError(f"{where}: math-verify reads no expression in 'answer' {_show(answer)[:60]}")


def _choice_answer(answer: Any, choices: list[str], where: str) -> int:
    """The index of the right choice: an index, a letter (A = 0) or the choice's text."""
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if len(answer) == 1 and answer.isalpha():
            index = ord(answer.upper()) - ord("A")
            if not 0 <= index < len(choices):
                raise HerdError(f"{where}: answer {answer!r} is past the last of the {len(choices)} choices "
                                f"({chr(ord('A') + len(choices) - 1)})")
            return index
        raise HerdError(f"{where}: answer {answer!r} is not one of the choices")
    # bool is an int in Python: `true` used to be taken as index 1.
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise HerdError(f"{where}: answer must be a choice index, letter or text, got {json.dumps(answer)}")
    if not 0 <= answer < len(choices):
        raise HerdError(f"{where}: answer index {answer} is out of range for {len(choices)} choices "
                        f"(0 to {len(choices) - 1})")
    return answer


def _check_choices(choices: Any, where: str) -> list[str]:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise HerdError(f"{where}: 'choices' must be a list of at least two strings")
    for j, c in enumerate(choices):
        if not c.strip():  # an empty reply has log-prob 0 (no tokens), so it would always win
            raise HerdError(f"{where}: choice {j} is empty")
    seen: dict[str, int] = {}
    for j, c in enumerate(choices):
        if c in seen:  # equal choices tie and the first wins: the other could never be picked
            raise HerdError(f"{where}: choices {seen[c]} and {j} are the same ({c!r})")
        seen[c] = j
    return choices


@dataclass
class TaskItem:
    where: str
    prompt: list[dict]
    answer: Any
    choices: list[str] | None = None
    match: str = "auto"  # how a generated reply is checked (is_correct)
    text: str | None = None  # the prompt as raw text (None for a dialog that is not one user turn)
    target_delimiter: str = " "  # lm-eval's: put between a raw prompt and each choice
    options: dict[str, Any] = field(default_factory=dict)  # is_correct's MATCH_OPTIONS from the line

    @property
    def kind(self) -> str:
        return "choice" if self.choices is not None else "generate"

    def raw_text(self) -> str:
        """The prompt for the raw (no chat template) mode: a dialog has no raw text."""
        if self.text is None:
            raise HerdError(f"{self.where}: a prompt of several messages needs the chat template "
                            "(--apply-chat-template); without it the prompt must be text")
        return self.text


def _raw_text(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict)
            and prompt[0].get("role") == "user" and isinstance(prompt[0].get("content"), str)):
        return prompt[0]["content"]
    return None


_KIND = {"choice": "multiple-choice", "generate": "generation"}


def load_task(path: str | os.PathLike, *, chat_template: bool | None = None) -> list[TaskItem]:
    """`chat_template=False` also checks here that every prompt has a raw text (see TaskItem)."""
    from herd.train.posttrain import as_messages, read_jsonl

    p = Path(path)
    if not str(path).strip() or p.is_dir():  # "" is "."; a directory was "cannot read ([Errno 21] ...)"
        raise HerdError(f"task {str(path)!r}: not a file; give a task JSONL file (prompt, choices?, answer per line)")
    if not p.exists():
        # `--task mmlu` reads like a benchmark name: say that tasks are local files
        raise HerdError(f"task {path}: no such file; herd eval reads local JSONL task files (prompt, choices?, "
                        "answer per line), not named benchmarks")
    items = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        prompt = obj.get("prompt", obj.get("question", obj.get("messages")))
        if prompt is None:
            raise HerdError(f"{where}: expected a 'prompt' (or 'question')")
        if "answer" not in obj:
            raise HerdError(f"{where}: expected an 'answer'")
        choices = obj.get("choices")
        answer = obj["answer"]
        if choices is not None:
            choices = _check_choices(choices, where)
            answer = _choice_answer(answer, choices, where)
        else:
            check_generation_answer(answer, where)
        match = obj.get("match", "auto")
        if match not in MATCHES:
            raise HerdError(f"{where}: unknown 'match' {match!r}; choose {', '.join(MATCHES)}")
        delim = obj.get("target_delimiter", " ")
        if not isinstance(delim, str):
            raise HerdError(f"{where}: 'target_delimiter' must be a string, got {json.dumps(delim)}")
        options = check_match_options(obj, where)
        if choices is not None and options:
            # A multiple-choice item is scored by log-likelihood: no reply is matched, so the option
            # would do nothing, silently.
            raise HerdError(f"{where}: '{next(iter(options))}' applies to generation items (their reply is "
                            "matched as text); a multiple-choice item is scored by log-likelihood")
        if choices is None:
            check_answer_matching(answer, match, options, where)
        messages = as_messages(prompt, where)  # checks the messages, naming the line
        item = TaskItem(where, messages, answer, choices, match, _raw_text(prompt), delim, options)
        if chat_template is False:
            item.raw_text()
        if items and item.kind != items[0].kind:
            # One accuracy over both kinds mixes two metrics (and acc_norm has no meaning for
            # generation): lm-eval keeps them apart as tasks; so does herd, as files.
            raise HerdError(f"{where}: a {_KIND[item.kind]} item in a task whose first item ({items[0].where}) "
                            f"is {_KIND[items[0].kind]}; put each kind in its own task file")
        items.append(item)
    return items


def stderr(correct: int, n: int) -> float | None:
    """lm-eval's `acc_stderr` (mean_stderr: the sample standard deviation, n - 1, over sqrt(n)),
    reported beside the Wilson interval so the two tools' tables can be read side by side."""
    if n < 2:  # lm-eval prints N/A; None is JSON's null (NaN is not JSON)
        return None
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))


@dataclass
class EvalResult:
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    replies: list[str] = field(default_factory=list)  # per item: the reply, or the chosen choice
    correct_items: list[bool] = field(default_factory=list)
    chat_template: bool = True
    # Multiple choice only: lm-eval's acc_norm / acc_bytes correct counts and per-item choice scores.
    correct_norm: int | None = None
    correct_bytes: int | None = None
    scores: list[list[float]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """lm-eval's metric names → value, with `_stderr` and herd's Wilson `_ci95`."""
        out: dict[str, Any] = {}
        counts = {"acc": self.correct}
        if self.correct_norm is not None:
            counts |= {"acc_norm": self.correct_norm, "acc_bytes": self.correct_bytes}
        for name, k in counts.items():
            out[name] = k / max(self.n, 1)
            out[f"{name}_stderr"] = stderr(k, self.n)
            out[f"{name}_ci95"] = list(wilson_interval(k, self.n))
        return out

    def line(self, name: str = "accuracy") -> str:
        def one(label, k):
            lo, hi = wilson_interval(k, self.n)
            return f"{label} {k / max(self.n, 1):.3f} ({k}/{self.n}), 95% CI [{lo:.3f}, {hi:.3f}]"

        parts = [one("acc", self.correct)]
        if self.correct_norm is not None:
            parts.append(one("acc_norm", self.correct_norm))
        mode = "chat template" if self.chat_template else "raw prompt"
        return f"{name}: {'; '.join(parts)} ({mode})"


def _bos(tokenizer, text: str) -> bool:
    """lm-eval's HF `tok_encode`: the tokenizer's own BOS setting (add_special_tokens), except when
    the text already starts with the BOS token's text (a chat template's output)."""
    if tokenizer.bos_id is None or not getattr(tokenizer, "add_bos", True):
        return False
    return not text.startswith(tokenizer.decode([tokenizer.bos_id]))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` (causal models): the context's trailing whitespace moves to the
    continuation (" Paris" is one token, "Answer: " + "Paris" would not be); context + continuation
    are encoded together, so BPE merges across the seam as the model saw such text in training, and
    the continuation's tokens are those after the context's own encoding. The model then reads
    context ids + continuation ids. Special-token text is parsed as control tokens, as HF
    tokenizers (and so lm-eval) do. An empty context is lm-eval's prefix token (BOS, else EOS)."""
    if context == "":
        cont = tokenizer.encode(continuation, allow_special=True)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    bos = _bos(tokenizer, context)
    whole = tokenizer.encode(context + continuation, bos=bos, allow_special=True)
    ctx = tokenizer.encode(context, bos=bos, allow_special=True)
    return ctx, whole[len(ctx):]


def _has_chat(tokenizer) -> bool:
    return getattr(tokenizer, "chat", None) is not None


def choice_context(tokenizer, item: TaskItem, chat_template: bool) -> tuple[str, list[str]]:
    """(context, continuations) as lm-eval builds them: raw, the prompt and target_delimiter +
    choice; with the chat template, the template's text through the assistant header and the choice
    as is (lm-eval drops the delimiter there: the header ends the context)."""
    if not chat_template:
        return item.raw_text(), [item.target_delimiter + c for c in item.choices]
    if not _has_chat(tokenizer):
        raise HerdError("this tokenizer has no chat format; evaluate without --apply-chat-template")
    ids = tokenizer.chat.encode_dialog(item.prompt, add_generation_prompt=True)
    return tokenizer.decode(ids), list(item.choices)


@torch.no_grad()
def choice_logps(model, tokenizer, context: str, continuations: Sequence[str], where: str = "item"
                 ) -> list[float]:
    """Summed log-prob of each continuation after `context` (encode_pair), the context's positions
    computed once for all continuations (prompt-sharing attention, herd/train/posttrain.py)."""
    from herd.train.posttrain import EncodedRanked, collate_ranked, response_logps

    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    ctx = pairs[0][0]  # the same for every continuation
    conts = [c for _, c in pairs]
    for j, c in enumerate(conts):
        if not c:
            raise HerdError(f"{where}: choice {j} encodes to no tokens after the prompt")
    # lm-eval scores each choice as its own sequence (context + choice), so only the longest choice
    # must fit the context; the choices share one row only as far as the row fits (several rows
    # else). The packed total used to be checked: 10 choices after a long prompt were refused
    # although each fitted.
    limit = model.args.max_seq_len
    longest = len(ctx) + max(len(c) for c in conts)
    if longest > limit:
        raise HerdError(f"{where}: the prompt and its longest choice take {longest} tokens, more than the "
                        f"model's context of {limit}; shorten the item")
    rows: list[list[int]] = [[]]
    for j, c in enumerate(conts):
        if rows[-1] and len(ctx) + sum(len(conts[k]) for k in rows[-1]) + len(c) > limit:
            rows.append([])
        rows[-1].append(j)
    encs = [EncodedRanked(r, ctx, [conts[k] for k in row], [[True] * len(conts[k]) for k in row])
            for r, row in enumerate(rows)]
    batch = collate_ranked(encs).to(model.tok_embeddings.weight.device)
    return response_logps(model, batch).tolist()  # segments in row order, then choice order


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # the first of equal scores, as np.argmax


def evaluate_items(model, tokenizer, items: Sequence[TaskItem], *, max_new_tokens: int = 64,
                   batch_size: int = 8, chat_template: bool | None = None) -> EvalResult:
    """`chat_template`: True wraps prompts in the chat format (lm-eval --apply_chat_template), False
    uses them as raw text (lm-eval's default), None the chat format when the tokenizer has one."""
    from herd.api import encode_prompt, generate

    check_eval_args(max_new_tokens=max_new_tokens, batch_size=batch_size)
    chat = _has_chat(tokenizer) if chat_template is None else bool(chat_template)
    if chat and not _has_chat(tokenizer):
        raise HerdError("this tokenizer has no chat format; evaluate without --apply-chat-template")
    prompts = [it.prompt if chat else it.raw_text() for it in items]  # raw_text names a dialog's line
    gen = [i for i, it in enumerate(items) if it.kind == "generate"]
    for i in gen:  # named by file:line before any generation (the generator's message names no line)
        n = len(encode_prompt(tokenizer, prompts[i]))
        if n >= model.args.max_seq_len:
            raise HerdError(f"{items[i].where}: prompt of {n} tokens does not fit the model's context of "
                            f"{model.args.max_seq_len} (at least one position is needed to generate)")
    was = model.training
    model.eval()
    replies: list[str] = [""] * len(items)
    ok: list[bool] = [False] * len(items)
    for start in range(0, len(gen), batch_size):
        idx = gen[start:start + batch_size]
        outs = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens)
        for i, o in zip(idx, outs, strict=True):
            replies[i], ok[i] = o, is_correct(o, items[i].answer, items[i].match, **items[i].options)
    scores: list[list[float]] = []
    norm = byte = 0
    for i, it in enumerate(items):
        if it.kind == "choice":
            context, conts = choice_context(tokenizer, it, chat)
            lps = choice_logps(model, tokenizer, context, conts, it.where)
            scores.append(lps)
            pick = _argmax(lps)
            replies[i], ok[i] = it.choices[pick], pick == it.answer
            # lm-eval's lengths are the choices' own (no delimiter): characters, and UTF-8 bytes.
            norm += _argmax([lp / len(c) for lp, c in zip(lps, it.choices, strict=True)]) == it.answer
            byte += _argmax([lp / len(c.encode()) for lp, c in zip(lps, it.choices, strict=True)]) == it.answer
    model.train(was)
    correct = sum(ok)
    lo, hi = wilson_interval(correct, len(items))
    mc = bool(scores)
    return EvalResult(len(items), correct, correct / max(len(items), 1), lo, hi, replies, ok, chat,
                      norm if mc else None, byte if mc else None, scores)


def check_eval_args(*, max_new_tokens: Any = 1, batch_size: Any = 1) -> None:
    """`herd eval` checks these before loading the model: batch size -1 made range() empty, so no
    generation ran and every generation item counted wrong; 0 was a range() traceback."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HerdError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    check_max_new_tokens(max_new_tokens)


def evaluate_task(model, tokenizer, path: str | os.PathLike, **kw) -> EvalResult:
    return evaluate_items(model, tokenizer, load_task(path, chat_template=kw.get("chat_template")), **kw)
