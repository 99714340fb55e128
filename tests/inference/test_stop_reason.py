"""vLLM's per-choice `stop_reason` from the OpenAI-compatible server: the stop string that ended a
choice (the earliest in its text), or the id from the request's stop_token_ids; null for EOS / the
tokenizer's end-of-turn tokens, length and the rest (vllm/entrypoints/openai/protocol.py,
vllm/v1/core/sched/utils.py check_stop). A scripted model makes every reply known in advance."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from torch import nn

from herd.inference.engine import Engine
from herd.inference.server import ServerThread, create_app
from herd.models.args import PRESETS

MESSAGES = [{"role": "user", "content": "hi"}]


class Scripted(nn.Module):
    """After a prompt of `prompt_len` tokens emits `script` token by token (logit 50, the rest 0, so
    sampling at temperature 1 follows it too); at a step in `branch`, that token ties with the script's."""

    def __init__(self, args, script, prompt_len):
        super().__init__()
        self.args, self.script, self.prompt_len, self.branch = args, script, prompt_len, {}
        self.tok_embeddings = nn.Embedding(1, 1)  # the engine reads the device and dtype here

    def forward(self, tokens, *, cache=None, positions=None, mask=None, last_only=False):
        logits = torch.zeros(tokens.shape[0], 1, self.args.vocab_size)
        for row, pos in enumerate(positions[:, -1].tolist()):
            step = min(max(pos + 1 - self.prompt_len, 0), len(self.script) - 1)
            logits[row, 0, self.script[step]] = 50.0
            if step in self.branch:
                logits[row, 0, self.branch[step]] = 50.0
        return logits


@pytest.fixture(scope="module")
def scripted():
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    prompt = tok.chat.encode_dialog(MESSAGES)  # the completions prompt too: one prompt_len for both
    eot = tok.token_to_id("<|eot_id|>")
    assert eot in tok.stop_ids
    words = tok.encode(" alpha beta gamma delta omega")
    assert tok.decode(words) == " alpha beta gamma delta omega" and len(words) == 5
    model = Scripted(PRESETS["debug"].replace(vocab_size=tok.vocab_size), words + [eot], len(prompt))
    engine = Engine(model, tok, num_blocks=64, max_batch=16)
    with ServerThread(create_app(engine, "scripted")) as server:
        yield server, model, tok, engine, prompt, words, eot


def _post(server, kind, body):
    if kind == "chat":
        url, body = "/v1/chat/completions", {"messages": MESSAGES, **body}
    else:
        url = "/v1/completions"
    r = httpx.post(server.url + url, json={"model": "scripted", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def _reply(server, kind, prompt, **body):
    """Non-streamed: [(text, finish_reason, stop_reason)] per choice; the key must be there."""
    choices = _post(server, kind, body if kind == "chat" else {"prompt": prompt, **body}).json()["choices"]
    assert all("stop_reason" in c for c in choices), choices
    return [((c["message"]["content"] if kind == "chat" else c["text"]), c["finish_reason"], c["stop_reason"])
            for c in sorted(choices, key=lambda c: c["index"])]


def _streamed(server, kind, prompt, **body):
    """Streamed: per choice, its text and its chunks' (finish_reason, stop_reason) in order."""
    r = _post(server, kind, {**(body if kind == "chat" else {"prompt": prompt, **body}), "stream": True})
    texts, marks = {}, {}
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for c in json.loads(line[6:])["choices"]:
            assert "stop_reason" in c, c  # on every chunk's choice, null until its last
            piece = (c["delta"].get("content") or "") if kind == "chat" else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + piece
            marks.setdefault(c["index"], []).append((c["finish_reason"], c["stop_reason"]))
    return [(texts[i], marks[i]) for i in sorted(texts)]


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_stop_reason_names_what_ended_each_choice(scripted, kind):
    server, model, tok, engine, prompt, words, eot = scripted
    alpha, beta, gamma, delta, omega = words
    model.branch = {}
    # The stop string found earliest in the text, not the first listed: "beta" comes before "delta".
    assert _reply(server, kind, prompt, stop=["delta", "beta"], max_tokens=10) == [(" alpha ", "stop", "beta")]
    assert _reply(server, kind, prompt, stop=["omega", "gamma"], max_tokens=10) == [
        (" alpha beta ", "stop", "gamma")]
    # Two in one token (" alpha"): the text is cut at the earlier, and that one is reported.
    assert _reply(server, kind, prompt, stop=["ha", "al"], max_tokens=10) == [(" ", "stop", "al")]
    # One that spans tokens is reported whole, as the request gave it.
    assert _reply(server, kind, prompt, stop=["zzz", "ta gam"], max_tokens=10) == [(" alpha be", "stop", "ta gam")]
    # A stop_token_ids id is reported as that integer (not a string), and it is not in the text.
    ((text, finish, stop),) = _reply(server, kind, prompt, stop_token_ids=[gamma], max_tokens=10)
    assert (text, finish, stop) == (" alpha beta", "stop", gamma) and type(stop) is int
    # Whichever comes first ends it: the id before the string, the string before the id.
    assert _reply(server, kind, prompt, stop=["omega"], stop_token_ids=[gamma], max_tokens=10) == [
        (" alpha beta", "stop", gamma)]
    assert _reply(server, kind, prompt, stop=["beta"], stop_token_ids=[gamma], max_tokens=10) == [
        (" alpha ", "stop", "beta")]
    # The tokenizer's end-of-turn token: "stop" with a null stop_reason, even when also listed in
    # stop_token_ids (vLLM checks EOS first) ...
    done = (" alpha beta gamma delta omega", "stop", None)
    assert _reply(server, kind, prompt, max_tokens=10) == [done]
    assert _reply(server, kind, prompt, stop_token_ids=[eot], max_tokens=10) == [done]
    # ... but with ignore_eos only the request's list can end it there, and reports it.
    assert _reply(server, kind, prompt, stop_token_ids=[eot], ignore_eos=True, max_tokens=10) == [
        (" alpha beta gamma delta omega", "stop", eot)]
    # max_tokens: "length", null, even with stop strings and ids that never came.
    assert _reply(server, kind, prompt, stop=["omega"], stop_token_ids=[delta], max_tokens=2) == [
        (" alpha beta", "length", None)]


def test_echo_with_max_tokens_zero_has_no_stop_reason(scripted):
    server, model, tok, engine, prompt, words, eot = scripted
    model.branch = {}
    # The one token generated is dropped (finish "length"): what stopped it is not this reply's.
    (c,) = _post(server, "completions", {"prompt": prompt, "echo": True, "max_tokens": 0,
                                         "stop_token_ids": [words[0]]}).json()["choices"]
    assert (c["finish_reason"], c["stop_reason"]) == ("length", None)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_each_of_n_choices_carries_its_own(scripted, kind):
    server, model, tok, engine, prompt, words, eot = scripted
    alpha, beta, gamma, delta, omega = words
    model.branch = {2: delta}  # the third token: gamma (a stop id) or delta, evenly; then the script
    want = {(" alpha beta", "stop", gamma), (" alpha beta delta delta ", "stop", "omega")}
    body = dict(n=8, temperature=1.0, seed=3, stop=["omega"], stop_token_ids=[gamma], max_tokens=10)
    got = _reply(server, kind, prompt, **body)
    assert set(got) == want, got  # both endings among the 8 (each 1/2; seeded)
    streamed = _streamed(server, kind, prompt, **body)
    # the same seed gives the same samples streamed, each ending with its own stop_reason
    assert [(text, *marks[-1]) for text, marks in streamed] == got
    for _, marks in streamed:
        assert all(m == (None, None) for m in marks[:-1]), marks
    model.branch = {}


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_stop_reason_comes_with_the_final_chunk(scripted, kind):
    server, model, tok, engine, prompt, words, eot = scripted
    model.branch = {}
    for body, end in [(dict(stop=["delta", "beta"]), (" alpha ", "stop", "beta")),
                      (dict(stop_token_ids=[words[2]]), (" alpha beta", "stop", words[2])),
                      ({}, (" alpha beta gamma delta omega", "stop", None)),
                      (dict(max_tokens=3), (" alpha beta gamma", "length", None))]:
        ((text, marks),) = _streamed(server, kind, prompt, **{"max_tokens": 10, **body})
        assert len(marks) > 1 and all(m == (None, None) for m in marks[:-1]), marks
        assert (text, *marks[-1]) == end


def test_engine_output_carries_stop_reason(scripted):
    server, model, tok, engine, prompt, words, eot = scripted
    model.branch = {}
    (out,) = engine.generate([prompt], max_tokens=10, stop_strings=["gamma", "alpha"])[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (" ", "stop", "alpha")
    (out,) = engine.generate([prompt], max_tokens=10, stop_token_ids=[words[1]])[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (words[:1], "stop", words[1])
    (out,) = engine.generate([prompt], max_tokens=10)[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (words, "stop", None)
