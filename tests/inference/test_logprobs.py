"""Logprobs from the engine and the OpenAI server (vLLM's shapes): the engine against a full
forward of the same model (continuous batching, chunked prefill, preemption, n samples); the
server on the real SmolLM2 GGUF against transformers' log_softmax of its logits on the same file
(chat, completions, streaming, the stop token); bad values as one-line 400s."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.inference.server import TokenTexts
from herd.models.args import ModelArgs

from .servers import debug_server, random_model, smollm2_server

GQA3 = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=160,
                 rope_theta=10000.0, max_seq_len=128, tie_embeddings=True)
TOL = 1e-4  # the real model against transformers
# The random model's weights (std 0.5) make large activations: a padded, chunked batch sums in
# another order than a plain forward, a few 1e-5 apart.
ENGINE_TOL = 5e-4


_model = random_model


@torch.no_grad()
def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): log_softmax of a plain full forward (no cache) at every position."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def _check_entries(model, prompt, token_ids, entries, k):
    """Each entry is the logprob of its token after prompt + the tokens before it, with the true top-k."""
    assert [e.token_id for e in entries] == token_ids
    full = _full_logprobs(model, prompt + token_ids)
    for j, e in enumerate(entries):
        row = full[len(prompt) - 1 + j]
        assert abs(e.logprob - row[e.token_id].item()) < ENGINE_TOL
        values, ids = row.topk(k)
        assert [t for t, _ in e.top] == ids.tolist()
        assert all(abs(v - w) < ENGINE_TOL for (_, v), w in zip(e.top, values.tolist(), strict=True))


# ---- the engine -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(num_blocks=64, max_batch=8),
    dict(num_blocks=24, max_batch=3, max_prefill_tokens=7, block_size=4),  # queueing, chunks, preemption
])
def test_engine_logprobs_are_the_full_forward_ones(cfg):
    model = _model(GQA3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 40, 17, 1, 61, 33, 16, 32)]
    engine = Engine(model, **cfg)
    outs = engine.generate(prompts, max_tokens=20, sampling=SamplingParams(logprobs=4))
    if cfg["num_blocks"] == 24:
        assert engine.stats["preemptions"] > 0  # recomputed steps must not add entries twice
    for p, (o,) in zip(prompts, outs, strict=True):
        assert len(o.token_ids) == 20 and len(o.logprobs) == 20
        _check_entries(model, p, o.token_ids, o.logprobs, 4)


def test_engine_logprobs_per_sample_of_n_with_penalties_and_preemption():
    """n sampled continuations: each sample's own tokens, each with its logprob under the raw
    model (not the penalised, tempered distribution it was drawn from)."""
    model = _model(GQA3)
    prompt = list(range(10, 31))
    sp = SamplingParams(temperature=1.3, top_k=50, seed=7, logprobs=2, frequency_penalty=0.5, logit_bias={3: 5.0})
    engine = Engine(model, num_blocks=20, max_batch=4, max_prefill_tokens=8, block_size=4)
    others = [list(range(40, 60)), list(range(70, 95))]
    outs = engine.generate([prompt, *others], max_tokens=10, n=3, sampling=sp)
    assert engine.stats["preemptions"] > 0
    seen = set()
    for p, samples in zip([prompt, *others], outs, strict=True):
        for o in samples:
            assert len(o.logprobs) == len(o.token_ids) == 10
            _check_entries(model, p, o.token_ids, o.logprobs, 2)
            seen.add(tuple(o.token_ids))
    assert len(seen) > 3  # the samples differ: each entry list is its own sample's


def test_engine_without_logprobs_computes_none(monkeypatch):
    """A request that does not ask pays nothing: no log_softmax, no full-sequence logits."""
    import herd.inference.engine as engine_module

    model = _model(GQA3)
    engine = Engine(model, num_blocks=32)
    events = []
    forward = model.forward

    def last_only_forward(*a, **kw):
        assert kw["last_only"]
        return forward(*a, **kw)

    def no_logprobs(*a, **kw):
        raise AssertionError("logprobs computed for a request that did not ask")

    with monkeypatch.context() as m:
        m.setattr(engine_module, "raw_logprobs", no_logprobs)
        m.setattr(model, "forward", last_only_forward)
        engine.submit(list(range(1, 40)), max_tokens=4, listener=events.append, n=2,
                      sampling=SamplingParams(temperature=1.0, frequency_penalty=0.5))
        while engine.step():
            pass
    assert events and all(ev.logprobs is None and ev.prompt_logprobs is None for ev in events)
    (o,), = engine.generate([[1, 2, 3]], max_tokens=4, sampling=SamplingParams(logprobs=0))
    assert [e.top for e in o.logprobs] == [[]] * 4


# ---- the server on the real SmolLM2 ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with smollm2_server(smollm2_gguf) as (server, model, tok, _engine):
        yield server, tok


@torch.no_grad()
def _hf_greedy(hf, prompt: list[int], max_new: int, stop_ids=()):
    """transformers' greedy continuation and log_softmax(logits) at each generated position."""
    ids, rows = list(prompt), []
    for _ in range(max_new):  # a plain forward over the whole text each step: no cache to trust
        row = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        t = int(row.argmax())
        rows.append(row)
        ids.append(t)
        if t in stop_ids:
            break
    return ids[len(prompt):], rows


def _text(tok, t, context):
    """The token text the server reports (vLLM's rule, herd.inference.server.TokenTexts)."""
    return TokenTexts(tok)(t, list(context))


def _texts(tok, ids):
    return [_text(tok, t, ids[:j]) for j, t in enumerate(ids)]


def _same_items(a, b):
    """Chat logprob items equal but for float noise (a repeated request reuses cached prompt blocks
    and computes in another order)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["token"] == y["token"] and x["bytes"] == y["bytes"] and abs(x["logprob"] - y["logprob"]) < TOL
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        assert all(abs(t["logprob"] - u["logprob"]) < TOL for t, u in zip(x["top_logprobs"], y["top_logprobs"], strict=True))


def _assert_chat_entry(tok, item, t, row, k, context):
    text = _text(tok, t, context)
    assert item["token"] == text and item["bytes"] == list(text.encode())
    assert abs(item["logprob"] - row[t].item()) < TOL, (item, row[t].item())
    values, ids = row.topk(k)
    alts = [_text(tok, i, context) for i in ids.tolist()]
    assert [x["token"] for x in item["top_logprobs"]] == alts
    assert [x["bytes"] for x in item["top_logprobs"]] == [list(a.encode()) for a in alts]
    for x, v in zip(item["top_logprobs"], values.tolist(), strict=True):
        assert abs(x["logprob"] - v) < TOL


CHAT = [{"role": "user", "content": "Reply with one word: what colour is the sky?"}]


def test_chat_logprobs_are_transformers_log_softmax(smol, hf_smollm2):
    server, tok = smol
    prompt = tok.chat.encode_dialog(CHAT)
    want, rows = _hf_greedy(hf_smollm2, prompt, 24, tok.stop_ids)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": CHAT, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 5})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    # The stop token gets its entry too (vLLM: it is among the output's token ids and counted in usage).
    assert choice["finish_reason"] == "stop" and want[-1] in tok.stop_ids, (choice, want)
    assert len(content) == len(want) == r.json()["usage"]["completion_tokens"]
    for j, (item, t, row) in enumerate(zip(content, want, rows, strict=True)):
        _assert_chat_entry(tok, item, t, row, 5, want[:j])
    assert content[-1]["token"] == tok.decode([want[-1]])  # the special token's name, as vLLM's decode
    assert "".join(x["token"] for x in content[:-1]) == choice["message"]["content"]

    # Streamed: the same items, spread over the deltas.
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": CHAT, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 5, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    streamed = [x for c in chunks for ch in c["choices"] if ch["logprobs"] for x in ch["logprobs"]["content"]]
    _same_items(streamed, content)

    # logprobs without top_logprobs: empty top lists (OpenAI, vLLM).
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": CHAT, "max_tokens": 3, "temperature": 0, "logprobs": True})
    got = r.json()["choices"][0]["logprobs"]["content"]
    assert [x["top_logprobs"] for x in got] == [[]] * 3
    assert all(abs(x["logprob"] - y["logprob"]) < TOL for x, y in zip(got, content, strict=False))
    # Not asked: null, as before.
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert r.json()["choices"][0]["logprobs"] is None


def test_completions_logprobs_are_transformers_log_softmax(smol, hf_smollm2):
    server, tok = smol
    text = "The capital of France is"
    prompt = tok.encode(text, bos=tok.bos_id is not None and tok.add_bos)
    want, rows = _hf_greedy(hf_smollm2, prompt, 8)
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": text, "max_tokens": 8, "temperature": 0, "logprobs": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == _texts(tok, want)
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    for j, (t, got, top, row) in enumerate(zip(want, lp["token_logprobs"], lp["top_logprobs"], rows, strict=True)):
        assert abs(got - row[t].item()) < TOL
        values, ids = row.topk(5)
        # Greedy: the sampled token is the top one, so the dict is exactly the top 5, in order.
        alts = [_text(tok, i, want[:j]) for i in ids.tolist()]
        assert list(top) == alts
        assert all(abs(top[a] - v) < TOL for a, v in zip(alts, values.tolist(), strict=True))
    # Streamed: the same lists, text_offset running on across the chunks.
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": text, "max_tokens": 8, "temperature": 0, "logprobs": 5, "ignore_eos": True, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    merged = {k: [] for k in lp}
    for c in chunks:
        for ch in c["choices"]:
            if ch["logprobs"]:
                for k in merged:
                    merged[k] += ch["logprobs"][k]
    assert merged["tokens"] == lp["tokens"] and merged["text_offset"] == lp["text_offset"]
    assert all(abs(x - y) < TOL for x, y in zip(merged["token_logprobs"], lp["token_logprobs"], strict=True))
    for x, y in zip(merged["top_logprobs"], lp["top_logprobs"], strict=True):
        assert list(x) == list(y) and all(abs(x[k] - y[k]) < TOL for k in x)
    # logprobs 0: the sampled token's logprob, and it alone in top_logprobs (vLLM).
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": text, "max_tokens": 2, "temperature": 0, "logprobs": 0})
    lp0 = r.json()["choices"][0]["logprobs"]
    assert [list(d) for d in lp0["top_logprobs"]] == [[t] for t in lp["tokens"][:2]]
    assert [d[t] for d, t in zip(lp0["top_logprobs"], lp["tokens"], strict=False)] == lp0["token_logprobs"]


def test_sampled_n_choices_carry_their_own_logprobs(smol):
    """n sampled choices (chat and completions): an entry per completion token, the sampled token
    always in the completions dict even when outside the top k, chat's top list the true top k."""
    server, tok = smol
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.5, "seed": 3, "n": 3, "logprobs": 1,
        "ignore_eos": True})
    choices = r.json()["choices"]
    assert len(choices) == 3 and len({c["text"] for c in choices}) > 1
    outside = 0
    for c in choices:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == c["text"]
        for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert top[t] == v and next(iter(top)) == t and len(top) in (1, 2)
            outside += len(top) == 2
            assert all(v <= w for w in top.values())  # the other entry is the most likely token
    assert outside > 0
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": CHAT, "max_tokens": 5, "temperature": 1.5, "seed": 3, "n": 2, "logprobs": True,
        "top_logprobs": 3})
    for c in r.json()["choices"]:
        content = c["logprobs"]["content"]
        assert len(content) >= 1
        for item in content:
            tops = [x["logprob"] for x in item["top_logprobs"]]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and item["logprob"] <= tops[0] + 1e-6


# ---- bad values ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debug():
    with debug_server(max_batch=8, num_blocks=64, max_n=4) as got:
        yield got


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, param, words", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "between 0 and 20"),
    ("chat", {"logprobs": True, "top_logprobs": 2.5}, "top_logprobs", "must be an integer"),
    ("chat", {"logprobs": "yes"}, "logprobs", "must be a boolean"),
    ("chat", {"logprobs": 1}, "logprobs", "must be a boolean"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "needs logprobs set to true"),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs", "needs logprobs set to true"),
    ("completions", {"logprobs": 21}, "logprobs", "between 0 and 20"),
    ("completions", {"logprobs": -1}, "logprobs", "between 0 and 20"),
    ("completions", {"logprobs": "yes"}, "logprobs", "must be an integer"),
    ("completions", {"logprobs": True}, "logprobs", "must be an integer"),
    ("completions", {"top_logprobs": 3}, "top_logprobs", "not supported"),
    ("chat", {"echo": True}, "echo", "echo is not supported"),  # vLLM's chat echo: not implemented
    ("completions", {"echo": "yes"}, "echo", "echo must be a boolean"),
    ("completions", {"echo": False, "max_tokens": 0}, "max_tokens", "between 1 and"),
])
def test_bad_logprobs_are_one_line_400s(debug, path, body, param, words):
    server, *_ = debug
    base = {"messages": MSG} if path == "chat" else {"prompt": "hi"}
    r = httpx.post(f"{server.url}/v1/{'chat/' if path == 'chat' else ''}completions", timeout=60,
                   json={**base, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err


@pytest.mark.parametrize("path, body", [
    ("chat", {"logprobs": False}), ("chat", {"logprobs": None, "top_logprobs": None}),
    ("chat", {"top_logprobs": 0}), ("chat", {"logprobs": True, "top_logprobs": 20}),
    ("completions", {"logprobs": False}), ("completions", {"logprobs": 20}), ("completions", {"logprobs": None}),
])
def test_good_logprobs_values(debug, path, body):
    server, *_ = debug
    base = {"messages": MSG} if path == "chat" else {"prompt": "hi"}
    r = httpx.post(f"{server.url}/v1/{'chat/' if path == 'chat' else ''}completions", timeout=60,
                   json={**base, "max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    asked = body.get("logprobs") not in (None, False)
    assert (r.json()["choices"][0]["logprobs"] is not None) == asked


def test_partial_utf8_tokens_read_as_vllm_reads_them(debug):
    """A byte-level token holding part of a character: vLLM (LogprobsProcessor._verify_tokens)
    decodes it after up to 4 preceding tokens of the sample; the token that completes the
    character carries all of it, an unfinished piece is "" — so the texts join into the output."""
    server, _, tok, _ = debug
    text = "a🐉b🇫🇷c"
    ids = tok.encode(text)
    texts = TokenTexts(tok)
    got = [texts(t, ids[:j]) for j, t in enumerate(ids)]
    assert "".join(got) == text
    partial = [j for j, t in enumerate(ids) if tok.decode([t]).endswith("\ufffd")]
    assert partial  # the emoji are split over byte-level tokens
    assert all(got[j] in ("", "🐉", "🇫", "🇷") or got[j].endswith(("🐉", "🇫", "🇷")) for j in partial), got
    assert texts(ids[partial[0]], []) == ""  # nothing before it to complete it
    # On the server: logit_bias +100 makes the model say the first piece, with nothing before it.
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": MSG, "max_tokens": 1, "temperature": 0, "logprobs": True,
        "logit_bias": {str(ids[partial[0]]): 100}})
    item = r.json()["choices"][0]["logprobs"]["content"][0]
    assert item["token"] == "" and item["bytes"] == []


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("path, extra", [
    ("chat", {}), ("chat", {"tools": TOOLS}), ("chat", {"stop": ["e", " a"]}), ("completions", {"stop": ["e"]}),
])
def test_an_entry_per_completion_token(debug, path, extra):
    """Every token the usage counts has its entry — the stop token, a token that completed a stop
    string, a token whose text is held back — once, in the streamed and the whole answer alike
    (with tools the reply is held until parsed, its entries with it)."""
    server, *_ = debug
    base = {"messages": MSG, "logprobs": True, "top_logprobs": 1} if path == "chat" else {"prompt": "hi", "logprobs": 1}
    url = f"{server.url}/v1/{'chat/' if path == 'chat' else ''}completions"
    body = {**base, **extra, "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 5}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    whole = r.json()

    def count(lp):
        return len(lp["content"]) if path == "chat" else len(lp["tokens"])

    assert sum(count(c["logprobs"]) for c in whole["choices"]) == whole["usage"]["completion_tokens"]
    r = httpx.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    got = [0, 0, 0]
    for c in chunks:
        for ch in c["choices"]:
            if ch["logprobs"]:
                got[ch["index"]] += count(ch["logprobs"])
    assert got == [count(c["logprobs"]) for c in whole["choices"]]  # same seed, same samples
    assert sum(got) == chunks[-1]["usage"]["completion_tokens"]


# ---- prompt logprobs (echo) -----------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(num_blocks=64, max_batch=8),
    dict(num_blocks=30, max_batch=4, max_prefill_tokens=7, block_size=4),  # chunks, preemption
    dict(num_blocks=64, max_batch=8, prefix_sharing=False),
])
def test_engine_prompt_logprobs_are_the_full_forward_ones(cfg):
    """Each prompt token after the first: its logprob after the tokens before it and the true
    top-k, once, through chunked prefill, preemption and n samples; a prompt whose blocks are
    cached from an earlier request is still computed (its positions' logits are needed)."""
    model = _model(GQA3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 40, 17, 1, 61, 33, 16, 32)]
    engine = Engine(model, **cfg)
    engine.generate(prompts[1:2], max_tokens=2)  # leaves prompt 1's blocks cached
    outs = engine.generate(prompts, max_tokens=20, n=2, sampling=SamplingParams(prompt_logprobs=3, logprobs=1))
    if cfg["num_blocks"] == 30:
        assert engine.stats["preemptions"] > 0
    for p, samples in zip(prompts, outs, strict=True):
        for o in samples:
            assert len(o.prompt_logprobs) == len(p) - 1
            full = _full_logprobs(model, p)
            for j, e in enumerate(o.prompt_logprobs):
                row = full[j]
                assert e.token_id == p[j + 1] and abs(e.logprob - row[p[j + 1]].item()) < ENGINE_TOL
                values, ids = row.topk(3)
                assert [t for t, _ in e.top] == ids.tolist()
                assert all(abs(v - w) < ENGINE_TOL for (_, v), w in zip(e.top, values.tolist(), strict=True))
            _check_entries(model, p, o.token_ids, o.logprobs, 1)
    # Not asked: none, and cached prefixes are used again.
    (o,), = engine.generate(prompts[1:2], max_tokens=2)
    assert o.prompt_logprobs is None


def test_echo_loglikelihood_as_lm_eval_asks_it(smol, hf_smollm2):
    """lm-eval's local-completions loglikelihood request: token-id prompts (context +
    continuation), echo, logprobs 1, max_tokens 1 (and vLLM's max_tokens 0): every prompt token's
    logprob after the ones before it equals transformers' log_softmax on the same GGUF, the first
    is null, and the top entry lets it tell whether the continuation is greedy."""
    server, tok = smol
    texts = ["The capital of France is Paris", "Water boils at 100 degrees"]
    prompts = [tok.encode(t) for t in texts]
    for max_tokens in (1, 0):
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "prompt": prompts, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["completion_tokens"] == len(prompts) * max_tokens
        for ids, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"]), strict=True):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + max_tokens and choice["text"].startswith(tok.decode(ids))
            assert lp["tokens"][:len(ids)] == _texts(tok, ids)
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            with torch.no_grad():
                full = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0].float(), dim=-1)
            for j in range(1, len(ids)):
                row = full[j - 1]
                assert abs(lp["token_logprobs"][j] - row[ids[j]].item()) < TOL
                top = lp["top_logprobs"][j]
                best = int(row.argmax())
                assert list(top)[0] == _text(tok, ids[j], ids[:j]) and _text(tok, best, ids[:j]) in top
                assert (max(top.values()) == lp["token_logprobs"][j]) == (best == ids[j])  # lm-eval's is_greedy
            if max_tokens == 0:
                assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    # A text prompt is echoed as given.
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": texts[0], "max_tokens": 0, "echo": True})
    assert r.json()["choices"][0]["text"] == texts[0] and r.json()["choices"][0]["logprobs"] is None


def test_echo_streams_the_prompt_first(debug):
    server, *_ = debug
    body = {"prompt": ["hi there", [5, 6, 7]], "max_tokens": 3, "echo": True, "logprobs": 2, "n": 2,
            "temperature": 1.0, "seed": 9}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    for c in whole["choices"]:
        mine = [ch for x in chunks for ch in x["choices"] if ch["index"] == c["index"]]
        assert "".join(ch["text"] for ch in mine) == c["text"]
        assert mine[0]["text"].startswith("hi there" if c["index"] < 2 else "&'(")  # ids 5 6 7 decoded
        merged = {k: [v for ch in mine if ch["logprobs"] for v in ch["logprobs"][k]] for k in c["logprobs"]}
        assert merged["tokens"] == c["logprobs"]["tokens"] and merged["text_offset"] == c["logprobs"]["text_offset"]
        assert merged["token_logprobs"][0] is None and len(merged["tokens"]) == len(c["logprobs"]["tokens"])


def test_openai_client_reads_the_logprobs(debug):
    """The official client parses every shape into its own types (chat, streamed chat, legacy
    completions with echo)."""
    import openai

    server, _, tok, _ = debug
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="debug", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, n=2)
    for c in r.choices:
        assert len(c.logprobs.content) == 4 and all(len(x.top_logprobs) == 2 for x in c.logprobs.content)
        assert "".join(x.token for x in c.logprobs.content) == c.message.content
    items = [x for ch in client.chat.completions.create(
        model="debug", messages=MSG, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        for c in ch.choices if c.logprobs for x in c.logprobs.content]
    assert [x.token for x in items] == [x.token for x in r.choices[0].logprobs.content]
    c = client.completions.create(model="debug", prompt="hi there", max_tokens=3, temperature=0, logprobs=2,
                                  echo=True).choices[0]
    assert c.text.startswith("hi there") and c.logprobs.token_logprobs[0] is None
    assert len(c.logprobs.tokens) == len(tok.encode("hi there", bos=True)) + 3
