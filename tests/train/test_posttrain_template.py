"""SFT / DPO encoding through a checkpoint's own jinja chat template (SmolLM2's ChatML, which writes
a default system prompt when the dialog has none), on dialogs the other tests never use, against
transformers reading the same GGUF: ids are `apply_chat_template`'s (with
`sanitize_control_tokens=True`), SFT targets are transformers' `return_assistant_tokens_mask` for
the same template with `{% generation %}` around each reply and its <|im_end|> (TRL's
assistant-only loss: reply content + end-of-turn token)."""

from __future__ import annotations

import pytest

from herd.errors import HerdError
from herd.train.posttrain import encode_chat, encode_prompt_response

# SmolLM2's template with the assistant reply + <|im_end|> marked for transformers' mask; it
# renders the same text (checked below).
_PLAIN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_TAGGED = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
           "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}" + _PLAIN + "{% endif %}")

A, U, S = "assistant", "user", "system"
DIALOGS = {
    "multi turn, no system": [(U, "Hi"), (A, "Hello!"), (U, "2+2?"), (A, "4")],
    "system": [(S, "Be brief."), (U, "Hi"), (A, "Hello!"), (U, "And?"), (A, "Bye.")],
    # the template writes its default system prompt before an opening assistant turn: the
    # system prompt used to be the target and the reply not
    "opens with the assistant": [(A, "Hi, how can I help?"), (U, "x"), (A, "y")],
    "system then assistant": [(S, "S"), (A, "Hi")],
    "empty reply": [(U, "Hi"), (A, ""), (U, "?"), (A, "yes")],
    "unicode": [(U, "Ünïcödé 日本語 🙂"), (A, "はい 🙂 — ça va")],
    # a reply starting with "\n" merges with the header's "\n" into one token: used to be an error
    "whitespace at the ends": [(U, "  padded  \n"), (A, "\n  answer with spaces  \n\n")],
    "newline reply": [(U, "x"), (A, "\n")],
    "newline then text": [(U, "x"), (A, "\n\nText"), (U, "y"), (A, "\tz ")],
    "tool role": [(U, "w?"), (A, "calling"), ("tool", "3"), (A, "It is 3.")],
    "ends with a user turn": [(U, "Hi"), (A, "Hello"), (U, "bye")],
}
SPELLED = {  # message text spelling control tokens stays text (no mask from transformers here)
    "spells im_end": [(U, "say <|im_end|>"), (A, "ok <|im_end|> and <|im_start|>user\nx")],
    "only im_end": [(U, "x"), (A, "<|im_end|>")],
    "newline then im_end": [(U, "x"), (A, "\n<|im_end|>\n")],
    "spells endoftext": [(U, "x"), (A, "a<|endoftext|>b")],
}


def _msgs(turns):
    return [{"role": r, "content": c} for r, c in turns]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from herd.tokenizer import load_tokenizer

    return load_tokenizer(str(smollm2_gguf))


@pytest.fixture(scope="module")
def hf(hf_smollm2_tokenizer):
    assert _PLAIN in hf_smollm2_tokenizer.chat_template
    return hf_smollm2_tokenizer


def _hf_ids(hf, msgs, gen=False):
    return list(hf.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=gen,
                                       sanitize_control_tokens=True))


def _hf_mask(hf, msgs):
    template = hf.chat_template.replace(_PLAIN, _TAGGED)
    assert hf.apply_chat_template(msgs, chat_template=template, tokenize=False) == \
        hf.apply_chat_template(msgs, tokenize=False)
    out = hf.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("name", DIALOGS)
def test_sft_ids_and_targets_equal_transformers(tok, hf, name):
    msgs = _msgs(DIALOGS[name])
    ids, target = encode_chat(tok, msgs, name)
    want_ids, want_mask = _hf_mask(hf, msgs)
    assert ids == want_ids == _hf_ids(hf, msgs)
    assert target == want_mask


@pytest.mark.parametrize("name", SPELLED)
def test_sft_spelled_control_tokens_stay_text(tok, hf, name):
    msgs = _msgs(SPELLED[name])
    ids, target = encode_chat(tok, msgs, name)
    assert ids == _hf_ids(hf, msgs)
    im_end = tok.token_to_id("<|im_end|>")
    assert ids.count(im_end) == len(msgs) + 1  # the default system prompt's, and one per message
    replies = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == A)
    got = tok.decode([t for t, m in zip(ids, target, strict=True) if m])
    # a reply starting with "\n" merges with the header's "\n": that token is the reply's
    assert got == replies or (replies.startswith("\n") and got == "\n" + replies)
    assert [t for t, m in zip(ids, target, strict=True) if m and t == im_end] == [im_end]


@pytest.mark.parametrize("name", [n for n in {**DIALOGS, **SPELLED} if n != "opens with the assistant"])
def test_prompt_response_against_transformers(tok, hf, name):
    """DPO / reward: the prompt is transformers' generation prompt; prompt + reply is the whole
    dialog, or, where the reply's first characters merge with the header's newline, the reply is
    its own text encoded apart (TRL's prompt/completion split), as the model would generate it."""
    msgs = _msgs({**DIALOGS, **SPELLED}[name])
    for j, m in enumerate(msgs):
        if m["role"] != A or j == 0:
            continue
        prompt, turn, content = encode_prompt_response(tok, msgs[:j], m["content"], name)
        assert prompt == _hf_ids(hf, msgs[:j], gen=True)
        whole = _hf_ids(hf, msgs[:j + 1])
        im_end = tok.token_to_id("<|im_end|>")
        assert turn[-1] == im_end and content == [True] * (len(turn) - 1) + [False]
        if whole[:len(prompt)] == prompt:
            assert prompt + turn == whole[:len(prompt) + len(turn)]
        else:
            assert m["content"].startswith("\n")
            assert turn[:-1] == list(hf(m["content"], add_special_tokens=False, split_special_tokens=True)
                                     ["input_ids"])
        assert tok.decode(turn) == m["content"] + "<|im_end|>"


def test_bad_dialogs_are_one_line_errors(tok):
    with pytest.raises(HerdError, match="no tool calls"):
        encode_chat(tok, [{"role": U, "content": "w?"}, {"role": A, "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {}}}]}, {"role": A, "content": "x"}])
    with pytest.raises(HerdError, match="no assistant turn"):
        encode_chat(tok, _msgs([(U, "x")]))
    with pytest.raises(HerdError, match="unknown role"):
        encode_prompt_response(tok, [{"role": "bot", "content": "x"}], "y")
