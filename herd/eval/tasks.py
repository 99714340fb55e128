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

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from herd.errors import HerdError

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


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(reply: str, answer: Any) -> str | float | None:
    """The part of `reply` to compare with `answer`: a number for numeric answers, else the text."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) or _as_number(str(answer)) is not None:
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
        return math.isclose(got, float(_as_number(str(answer))), rel_tol=0, abs_tol=1e-9)
    return got is not None and got == str(answer).strip()


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
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise HerdError(f"{where}: 'choices' must be a list of at least two strings")
            if isinstance(answer, str) and len(answer) == 1 and answer.isalpha() and answer not in choices:
                answer = ord(answer.upper()) - ord("A")
            elif isinstance(answer, str):
                if answer not in choices:
                    raise HerdError(f"{where}: answer {answer!r} is not one of the choices")
                answer = choices.index(answer)
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise HerdError(f"{where}: answer must index one of the {len(choices)} choices")
        match = obj.get("match", "auto")
        if match not in MATCHES:
            raise HerdError(f"{where}: unknown 'match' {match!r}; choose {', '.join(MATCHES)}")
        items.append(TaskItem(where, as_messages(prompt, where), answer, choices, match))
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
def choice_logps(model, tokenizer, prompt: list[dict], choices: Sequence[str]) -> list[float]:
    """Summed log-prob of each choice as the assistant's reply (content tokens)."""
    from herd.train.posttrain import Preference, collate_ranked, encode_preferences, response_logps

    enc = encode_preferences(tokenizer, [Preference("choice", prompt, list(choices))], model.args.max_seq_len)[0]
    batch = collate_ranked([enc]).to(model.tok_embeddings.weight.device)
    return response_logps(model, batch).tolist()


def evaluate_items(model, tokenizer, items: Sequence[TaskItem], *, max_new_tokens: int = 64,
                   batch_size: int = 8) -> EvalResult:
    from herd.api import generate

    was = model.training
    model.eval()
    replies: list[str] = [""] * len(items)
    ok: list[bool] = [False] * len(items)
    gen = [i for i, it in enumerate(items) if it.kind == "generate"]
    for start in range(0, len(gen), batch_size):
        idx = gen[start:start + batch_size]
        outs = generate(model, tokenizer, [items[i].prompt for i in idx], max_new_tokens=max_new_tokens)
        for i, o in zip(idx, outs, strict=True):
            replies[i], ok[i] = o, is_correct(o, items[i].answer, items[i].match)
    for i, it in enumerate(items):
        if it.kind == "choice":
            lps = choice_logps(model, tokenizer, it.prompt, it.choices)
            pick = max(range(len(lps)), key=lambda j: lps[j])
            replies[i], ok[i] = it.choices[pick], pick == it.answer
    model.train(was)
    correct = sum(ok)
    lo, hi = wilson_interval(correct, len(items))
    return EvalResult(len(items), correct, correct / max(len(items), 1), lo, hi, replies, ok)


def evaluate_task(model, tokenizer, path: str | os.PathLike, **kw) -> EvalResult:
    return evaluate_items(model, tokenizer, load_task(path), **kw)
