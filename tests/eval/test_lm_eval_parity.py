"""herd eval's numbers against lm-evaluation-harness's conventions (lm_eval 0.4.x), computed here
from transformers' SmolLM2 logits and an HF tokenizer: multiple choice (`_encode_pair`, target
delimiter, acc / acc_norm / acc_bytes) raw and through the chat template, lm-eval's stderr, and
generation answer extraction edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from herd.errors import HerdError
from herd.eval.tasks import evaluate_items, is_correct, load_task, stderr
from tests.train.posttrain_fixtures import write_jsonl

# (prompt, choices, answer): a prompt ending in a space (moved to the continuation), a choice that
# starts with one (lm-eval then has two), digits, and non-ASCII choices (acc_norm counts characters,
# acc_bytes bytes).
ITEMS = [
    ("The capital of France is", ["Paris", "London", "Rome"], 0),
    ("Question: 2+2=?\nAnswer: ", ["4", "5", "22"], 0),
    ("Q: What colour is the sky?\nA:", [" blue", "green"], 0),
    ("Un café, s'il vous", ["plaît", "plait", "please"], 0),
    ("The opposite of hot is", ["cold", "warm and sunny", "ice"], 0),
    ("Water freezes at", ["0 degrees", "100 degrees"], 0),
]


@pytest.fixture(scope="module")
def hf_tok(hf_smollm2_hub_tokenizer):
    return hf_smollm2_hub_tokenizer  # the tokenizer lm-eval loads from the hub (tests/conftest.py)


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    import herd

    return herd.load(smollm2_gguf, for_inference=False)


def _lm_eval_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """lm_eval/api/model.py `_encode_pair` with HFLM.tok_encode (add_bos_token None: the tokenizer's
    default, off when the text starts with the BOS text), then the continuation's summed log-prob
    from one forward pass of context_enc + continuation_enc."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    kw = {"add_special_tokens": False} if tok.bos_token and context.startswith(tok.bos_token) else {}
    whole, ctx = tok.encode(context + continuation, **kw), tok.encode(context, **kw)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def _argmax(xs):
    return max(range(len(xs)), key=lambda j: xs[j])


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "apply_chat_template"])
def test_multiple_choice_matches_lm_eval(smol, hf_smollm2, hf_tok, tmp_path, chat):
    model, tok = smol
    task = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": p, "choices": c, "answer": a} for p, c, a in ITEMS])
    r = evaluate_items(model, tok, load_task(task), chat_template=chat)
    acc = norm = byte = 0
    for (prompt, choices, answer), got in zip(ITEMS, r.scores, strict=True):
        if chat:  # lm-eval --apply_chat_template: the template's text; target_delimiter becomes ""
            context = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            conts = choices
        else:  # lm-eval's default: the raw text and target_delimiter " "
            context, conts = prompt, [" " + c for c in choices]
        want = [_lm_eval_loglikelihood(hf_smollm2, hf_tok, context, c) for c in conts]
        assert got == pytest.approx(want, abs=1e-4), prompt
        acc += _argmax(want) == answer
        norm += _argmax([w / len(c) for w, c in zip(want, choices, strict=True)]) == answer
        byte += _argmax([w / len(c.encode()) for w, c in zip(want, choices, strict=True)]) == answer
    assert (r.correct, r.correct_norm, r.correct_bytes) == (acc, norm, byte)
    assert r.chat_template is chat and ("chat template" if chat else "raw prompt") in r.line()
    assert f"acc_norm {norm / len(ITEMS):.3f}" in r.line()


def test_stderr_is_lm_eval_mean_stderr():
    np = pytest.importorskip("numpy")
    for k, n in [(0, 5), (3, 10), (7, 7), (1, 2)]:
        x = np.array([1.0] * k + [0.0] * (n - k))
        assert stderr(k, n) == pytest.approx(float(np.std(x, ddof=1) / math.sqrt(n)), abs=1e-12)
    assert stderr(1, 1) is None  # lm-eval: N/A for one sample


@pytest.mark.parametrize("reply,answer,ok", [
    ("The answer is 0.", 0, True),            # answer 0 is a number, not "no answer"
    ("so 5 - 5 = 0", "0", True),
    ("It dropped to -12 degrees.", -12, True),
    ("It dropped by 12 degrees.", -12, False),
    ("The total is 1,000.", 1000, True),      # thousands comma and a final period
    ("The total is 1000", "1,000", True),
    ("#### 1,234.5", 1234.5, True),
    ("That is .5 of it", 0.5, True),           # was read as 5
    ("That is 0.5 of it", ".5", True),
    ("The rate is 25%.", "25%", True),         # a unit on the answer was compared as text
    ("It costs $1,000.", "$1,000", True),
    ("It costs $1,000.", "$1,001", False),
    ("12.", "12", True),
])
def test_answer_extraction_edge_cases(reply, answer, ok):
    assert is_correct(reply, answer) is ok


def test_mixed_kinds_and_raw_dialogs_are_refused_with_their_line(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "choices": ["a", "b"], "answer": 0},
                                                   {"prompt": "q", "answer": 3}])
    with pytest.raises(HerdError, match=rf"^{mixed}:2: a generation item in a task whose first item "
                                        rf"\({mixed}:1\) is multiple-choice"):
        load_task(mixed)
    dialog = write_jsonl(tmp_path / "dialog.jsonl", [
        {"prompt": [{"role": "user", "content": "only a user turn is raw text"}], "answer": 1},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "answer": 1}])
    assert [it.text for it in load_task(dialog)] == ["only a user turn is raw text", None]
    with pytest.raises(HerdError, match=rf"^{dialog}:2: a prompt of several messages needs the chat template"):
        load_task(dialog, chat_template=False)
