"""`herd eval`: accuracy on local JSONL tasks (SPEC §6), with a 95% Wilson confidence interval.

Two kinds of item, told apart per line:
- multiple choice (MMLU / ARC style): {"prompt" | "question", "choices": [...], "answer": index,
  letter ("B") or the choice's text}; the model picks the choice whose reply it gives the highest
  log-likelihood (summed over the reply's content tokens, through the chat format when the model
  has one; the prompt is computed once for all choices).
- generation (GSM8K style): {"prompt" | "question", "answer", optional "match"}; greedy decoding,
  then answer extraction: a numeric answer is compared with the last number in the reply (GSM8K's
  "#### N" when present), any other answer with the reply stripped of surrounding space, quotes and
  a final period; "match": "contains" accepts a reply that contains the answer.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from herd.errors import HerdError
from herd.inference.generate import check_max_new_tokens

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM8K = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# What counts as a number in an answer's text: what _NUMBER finds in a reply (a sign, digits with
# thousands commas, a decimal part). float() alone also took "inf", "NaN", "Infinity" and "1_000",
# so a task whose answer is the word "infinity" compared it as a number and no reply could match.
_NUMERIC_TEXT = re.compile(r"\s*[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)\s*")


def _as_number(text: str) -> float | None:
    if not _NUMERIC_TEXT.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _answer_number(answer: Any) -> float | None:
    """A JSON number as is (1e21 too); a string only when it reads as a number (_NUMERIC_TEXT)."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    return _as_number(str(answer))


def extract_answer(reply: str, answer: Any) -> str | float | None:
    """The part of `reply` to compare with `answer`: a number for numeric answers, else the text."""
    if _answer_number(answer) is not None:
        m = _GSM8K.search(reply)
        if m:
            return _as_number(m.group(1))
        nums = _NUMBER.findall(reply)
        return _as_number(nums[-1]) if nums else None
    return _clean(reply)


def _clean(reply: str) -> str:
    """The reply without surrounding space, quotes and a final period."""
    text = reply.strip()
    for _ in range(2):  # quotes around a final period, or a period after quotes
        text = text.strip().strip("\"'`").strip().removesuffix(".")
    return text.strip()


MATCHES = ("auto", "exact", "contains")


def is_correct(reply: str, answer: Any, match: str = "auto") -> bool:
    """`match`: "auto" (numbers by the last number, text exactly; see extract_answer), "exact" (the
    stripped reply equals the answer) or "contains" (the answer appears in the reply, case-sensitive)."""
    if match == "contains":
        return str(answer) in reply
    if match == "exact":
        return _clean(reply) == str(answer).strip()
    if match != "auto":
        raise HerdError(f"unknown answer match {match!r}; choose {', '.join(MATCHES)}")
    got = extract_answer(reply, answer)
    if isinstance(got, float):
        return math.isclose(got, _answer_number(answer), rel_tol=0, abs_tol=1e-9)
    return got is not None and got == str(answer).strip()


def check_generation_answer(answer: Any, where: str) -> None:
    """A generated reply is compared with the answer's text or number: null was compared with the
    text "None", true with "True", and an empty answer matched every empty (or, with "contains",
    every) reply — refuse those, naming the line."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise HerdError(f"{where}: 'answer' must be a string or a number, got {json.dumps(answer)}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise HerdError(f"{where}: 'answer' must be a finite number, got {answer}")
    if isinstance(answer, str) and not answer.strip():
        raise HerdError(f"{where}: 'answer' is empty")


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

    @property
    def kind(self) -> str:
        return "choice" if self.choices is not None else "generate"


def load_task(path: str | os.PathLike) -> list[TaskItem]:
    from herd.train.posttrain import as_messages, read_jsonl

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
        messages = as_messages(prompt, where)  # checks the messages, naming the line
        items.append(TaskItem(where, messages, answer, choices, match))
    return items


@dataclass
class EvalResult:
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    replies: list[str] = field(default_factory=list)  # per item: the reply, or the chosen choice
    correct_items: list[bool] = field(default_factory=list)

    def line(self, name: str = "accuracy") -> str:
        return (f"{name}: {self.accuracy:.3f} ({self.correct}/{self.n}), "
                f"95% CI [{self.ci_low:.3f}, {self.ci_high:.3f}]")


@torch.no_grad()
def choice_logps(model, tokenizer, prompt: list[dict], choices: Sequence[str], where: str = "item"
                 ) -> list[float]:
    """Summed log-prob of each choice as the assistant's reply (content tokens)."""
    from herd.train.posttrain import Preference, collate_ranked, encode_preferences, response_logps

    # No limit in the encoder: its message speaks of train.seq_len, which eval has none of.
    enc = encode_preferences(tokenizer, [Preference(where, prompt, list(choices))], sys.maxsize)[0]
    if len(enc) > model.args.max_seq_len:
        raise HerdError(f"{where}: the prompt and its choices take {len(enc)} tokens, more than the model's "
                        f"context of {model.args.max_seq_len}; shorten the item")
    batch = collate_ranked([enc]).to(model.tok_embeddings.weight.device)
    return response_logps(model, batch).tolist()


def evaluate_items(model, tokenizer, items: Sequence[TaskItem], *, max_new_tokens: int = 64,
                   batch_size: int = 8) -> EvalResult:
    from herd.api import encode_prompt, generate

    check_eval_args(max_new_tokens=max_new_tokens, batch_size=batch_size)
    gen = [i for i, it in enumerate(items) if it.kind == "generate"]
    for i in gen:  # named by file:line before any generation (the generator's message names no line)
        n = len(encode_prompt(tokenizer, items[i].prompt))
        if n >= model.args.max_seq_len:
            raise HerdError(f"{items[i].where}: prompt of {n} tokens does not fit the model's context of "
                            f"{model.args.max_seq_len} (at least one position is needed to generate)")
    was = model.training
    model.eval()
    replies: list[str] = [""] * len(items)
    ok: list[bool] = [False] * len(items)
    for start in range(0, len(gen), batch_size):
        idx = gen[start:start + batch_size]
        outs = generate(model, tokenizer, [items[i].prompt for i in idx], max_new_tokens=max_new_tokens)
        for i, o in zip(idx, outs, strict=True):
            replies[i], ok[i] = o, is_correct(o, items[i].answer, items[i].match)
    for i, it in enumerate(items):
        if it.kind == "choice":
            lps = choice_logps(model, tokenizer, it.prompt, it.choices, it.where)
            pick = max(range(len(lps)), key=lambda j: lps[j])
            replies[i], ok[i] = it.choices[pick], pick == it.answer
    model.train(was)
    correct = sum(ok)
    lo, hi = wilson_interval(correct, len(items))
    return EvalResult(len(items), correct, correct / max(len(items), 1), lo, hi, replies, ok)


def check_eval_args(*, max_new_tokens: Any = 1, batch_size: Any = 1) -> None:
    """`herd eval` checks these before loading the model: batch size -1 made range() empty, so no
    generation ran and every generation item counted wrong; 0 was a range() traceback."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HerdError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    check_max_new_tokens(max_new_tokens)


def evaluate_task(model, tokenizer, path: str | os.PathLike, **kw) -> EvalResult:
    return evaluate_items(model, tokenizer, load_task(path), **kw)
