"""Fixes from probing `herd eval` with task files the other tests never used: many long choices
after a long prompt (each fits the model, their sum does not), answers that end in a period or sit
in quotes, and JSONL with U+2028 inside a string or a UTF-8 byte-order mark."""

from __future__ import annotations

import json

import pytest
import torch

from herd.errors import HerdError
from herd.eval.tasks import choice_logps, encode_pair, evaluate_items, is_correct, load_task
from tests.train.posttrain_fixtures import make_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import herd

    return herd.load(make_tiny_model(tmp_path_factory.mktemp("m"), seed=3), for_inference=False)


def _one_by_one(model, tok, context, conts):
    """lm-eval's rule: each choice its own sequence, context_enc + continuation_enc."""
    out = []
    for c in conts:
        ctx, cont = encode_pair(tok, context, c)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).float()[0], -1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def test_ten_choices_that_each_fit_are_scored_not_refused(tiny, tmp_path):
    model, tok = tiny
    model.eval()
    context = "word " * 60
    choices = [f"choice number {i} " + "x y z " * 6 for i in range(10)]
    conts = [" " + c for c in choices]
    n_ctx = len(encode_pair(tok, context, conts[0])[0])
    longest = max(len(encode_pair(tok, context, c)[1]) for c in conts)
    total = n_ctx + sum(len(encode_pair(tok, context, c)[1]) for c in conts)
    assert n_ctx + longest <= model.args.max_seq_len < total  # the case: was refused on the total
    got = choice_logps(model, tok, context, conts)
    assert got == pytest.approx(_one_by_one(model, tok, context, conts), abs=1e-3)
    task = write_jsonl(tmp_path / "mc10.jsonl", [{"prompt": context, "choices": choices, "answer": "J"}])
    r = evaluate_items(model, tok, load_task(task), chat_template=False)
    assert r.n == 1 and len(r.scores[0]) == 10
    # a prompt whose longest choice does not fit is still refused, naming its line
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 240, "choices": ["a", "b " * 20],
                                                      "answer": 0}])
    with pytest.raises(HerdError, match=rf"^{too_long}:1: the prompt and its longest choice take \d+ tokens"):
        evaluate_items(model, tok, load_task(too_long), chat_template=False)


@pytest.mark.parametrize("reply,answer,match", [
    ("Washington D.C.", "Washington D.C.", "auto"),
    ("Washington D.C.", "Washington D.C.", "exact"),
    ("etc.", "etc.", "auto"),
    ('"Hi"', '"Hi"', "auto"),
    ("Paris", "Paris.", "exact"),
])
def test_an_answer_is_cleaned_as_the_reply_is(reply, answer, match):
    assert is_correct(reply, answer, match)


def test_an_answer_empty_once_cleaned_is_refused(tmp_path):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": '"."'}])
    with pytest.raises(HerdError, match=rf"^{task}:1: 'answer' is empty"):
        load_task(task)


def test_jsonl_with_u2028_inside_a_string_and_a_bom(tmp_path):
    rows = [{"prompt": "line\u2028separator\u0085next\x1cfs", "choices": ["é", "e"], "answer": 0},
            {"prompt": "second", "choices": ["a", "b"], "answer": 1}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    plain, bom = tmp_path / "u.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(text, encoding="utf-8")
    bom.write_text("\ufeff" + text.replace("\n", "\r\n"), encoding="utf-8")
    for path in (plain, bom):
        items = load_task(path)
        assert [it.text for it in items] == [rows[0]["prompt"], "second"]
        assert [it.where for it in items] == [f"{path}:1", f"{path}:2"]
