"""herd eval: Wilson interval against scipy's, answer extraction, multiple choice by log-likelihood
against a direct forward pass, and bad task files."""

from __future__ import annotations

import json

import pytest
import torch

from herd.errors import HerdError
from herd.eval.tasks import (
    choice_logps,
    evaluate_items,
    extract_answer,
    is_correct,
    load_task,
    wilson_interval,
)
from tests.train.posttrain_fixtures import make_tiny_model, write_jsonl


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (17, 40), (40, 40), (1, 1), (0, 1), (1, 2), (0, 3)])
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


def test_answer_extraction():
    assert extract_answer("Mia has 9 + 2 = 11 pens.", 11) == 11.0
    assert is_correct("so the total is 1,234 apples", 1234)
    assert is_correct("work... #### 42\nthen 7", "42")  # GSM8K's final-answer marker wins
    assert not is_correct("no number here", 3)
    assert is_correct(" 'GARDEN'. ", "GARDEN") and not is_correct("garden", "GARDEN")
    assert not is_correct("GARDEN and more", "GARDEN")
    assert is_correct("Sure: GARDEN and more", "GARDEN", "contains") and not is_correct("Garden", "GARDEN", "contains")
    assert is_correct("12.", "12", "exact") and not is_correct("it is 12", "12", "exact")



def test_words_float_reads_as_numbers_are_text_answers():
    # float() takes "inf", "NaN", "Infinity": such an answer was compared as a number, so no reply
    # (not even the word itself) could ever be scored correct.
    for word in ("Infinity", "infinity", "NaN", "inf"):
        assert is_correct(f" {word}.", word) and not is_correct("42", word)
    assert is_correct("it is 1,000,000,000,000,000,000,000", 1e21)  # a JSON number stays numeric
    assert is_correct("half: 0.5", ".5") and is_correct("x = +3", "3")

def test_multiple_choice_by_loglikelihood(tmp_path):
    import herd

    model, tok = herd.load(make_tiny_model(tmp_path / "m", seed=3), for_inference=False)
    prompt = [{"role": "user", "content": "Pick one."}]
    choices = ["red", "green apples", "blue"]
    # With the chat template (lm-eval --apply_chat_template): the template's text as context, the
    # choice with no delimiter; its trailing "\n" is moved to each choice and scored with it.
    context = tok.decode(tok.chat.encode_dialog(prompt, add_generation_prompt=True))
    got = choice_logps(model, tok, context, choices)
    with torch.no_grad():
        for c, lp in zip(choices, got, strict=True):
            p = tok.encode(context.rstrip(), allow_special=True)
            body = tok.encode(context + c, allow_special=True)[len(p):]
            logits = torch.log_softmax(model(torch.tensor([p + body]))[0], -1)
            direct = sum(float(logits[len(p) - 1 + j, t]) for j, t in enumerate(body))
            assert lp == pytest.approx(direct, abs=1e-4)
    best = max(range(3), key=lambda i: got[i])
    task = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Pick one.", "choices": choices, "answer": best},
                                                {"question": "Pick one.", "choices": choices,
                                                 "answer": "ABC"[(best + 1) % 3]}])
    r = evaluate_items(model, tok, load_task(task), chat_template=True)
    assert (r.correct, r.n) == (1, 2) and r.correct_items == [True, False]
    assert (r.ci_low, r.ci_high) == pytest.approx(wilson_interval(1, 2))


def test_bad_task_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"prompt": "q", "answer": 1}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(HerdError, match=r"t.jsonl:2: expected an 'answer'"):
        load_task(p)
    p.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": "purple"}) + "\n")
    with pytest.raises(HerdError, match=r"t.jsonl:1: answer 'purple' is not one of the choices"):
        load_task(p)
