"""The OpenAI-compatible server, in-process on a free loopback port: the official `openai` client
against `herd.generate` on the real SmolLM2, 64 concurrent clients good and bad on a small random
model with the real Llama 3 tokenizer, the regression list of bad requests, tool calls, shutdown."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai  # a test dependency (pyproject [test])
import pytest
import torch
from torch import nn

import herd
from herd.api import reserved_ids
from herd.inference.engine import Engine
from herd.inference.generate import generate_batch
from herd.inference.sampling import SamplingParams
from herd.inference.server import ServerThread, create_app
from herd.models.args import PRESETS
from herd.models.llama3 import Transformer

from .servers import debug_server, smollm2_server


def _wait_idle(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.has_work


def _pool_is_full(engine):
    _wait_idle(engine)
    assert engine.blocks_free == engine.blocks.num_blocks
    assert all(r == 0 for r in engine.blocks.refs)


# ---- the real model and the official client --------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with smollm2_server(smollm2_gguf) as (server, model, tok, engine):
        yield server, model, tok, engine


def test_openai_client_gets_herd_generate_text(smol):
    server, model, tok, engine = smol
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = herd.generate(model, tok, messages, max_new_tokens=10)
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == want and want
    # the answer's tokens, and the end-of-turn token that ended it when it ended on its own (as vLLM counts)
    stopped = reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(tok.encode(want)) + stopped
    chunks = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want

    prompt = "The three primary colors are"
    want = herd.generate(model, tok, prompt, max_new_tokens=8)
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == want
    chunks = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want
    _pool_is_full(engine)


def test_openai_client_schema_and_meaning(smol):
    """What a vLLM user checks with the official client: every response parses into its pydantic
    models, and the fields mean what OpenAI means (usage counts the template's prompt ids; a stream
    opens with the role, ends each choice with its finish_reason, then the usage chunk)."""
    server, model, tok, engine = smol
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    prompt_ids = len(tok.chat.encode_dialog(messages, add_generation_prompt=True))
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    (choice,) = reply.choices
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "smollm2"
    assert abs(reply.created - time.time()) < 600
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"  # SmolLM2 answers within 16 tokens and ends its turn
    text = choice.message.content
    assert text and "<|im_end|>" not in text
    u = reply.usage
    assert u.prompt_tokens == prompt_ids and u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The reply's tokens and the end-of-turn token that stopped it, as vLLM counts them.
    assert u.completion_tokens == len(tok.encode(text)) + 1

    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "smollm2" for c in chunks)
    *body, last = chunks
    assert body[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in body[1:])
    assert "".join(c.choices[0].delta.content or "" for c in body) == text
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["stop"]
    assert last.choices == [] and last.usage == u  # include_usage: one more chunk, no choices
    assert all(c.usage is None for c in body)

    # The new name and the old one; max_completion_tokens wins when both come (as vLLM).
    for kw in ({"max_completion_tokens": 3}, {"max_tokens": 3}, {"max_completion_tokens": 3, "max_tokens": 9}):
        r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, **kw)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
        assert text.startswith(r.choices[0].message.content)
    # stop as a string and as a list: the text ends before it, finish_reason "stop".
    cut = text.index(" ", 1)
    for stop in (text[cut:cut + 2], [text[cut:cut + 2], "never-there"]):
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0, stop=stop)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text[:cut], "stop")
    # n samples with a seed: indices 0..n-1, the same again with the same seed.
    kw = {"model": "smollm2", "messages": messages, "max_tokens": 4, "n": 2, "seed": 7, "temperature": 1.0,
          "top_p": 0.9}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.prompt_tokens == prompt_ids and a.usage.completion_tokens == 8  # the prompt counted once
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine) == a.choices[i].message.content
    # OpenAI's "developer" role is the system turn.
    dev = [{"role": "developer", "content": "Answer in French."}] + messages
    r = client.chat.completions.create(model="smollm2", messages=dev, max_tokens=4, temperature=0)
    sys_ = [{"role": "system", "content": "Answer in French."}] + messages
    assert r.usage.prompt_tokens == len(tok.chat.encode_dialog(sys_))
    assert r.choices[0].message.content == herd.generate(model, tok, sys_, max_new_tokens=4)
    # models.retrieve
    assert client.models.retrieve("smollm2").id == "smollm2"
    _pool_is_full(engine)


@pytest.mark.parametrize("kw, error, words", [
    ({"model": "gpt-4"}, openai.NotFoundError, "does not exist"),
    # SmolLM2's template never reads `tools`: the model would not see them.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
     openai.BadRequestError, "chat template has no tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, openai.BadRequestError, "not among tools"),
    ({"tool_choice": "auto"}, openai.BadRequestError, 'tool_choice "auto" needs tools'),  # as vLLM
    ({"response_format": {"type": "xml"}}, openai.BadRequestError, "response_format type must be"),
    ({"top_logprobs": 2}, openai.BadRequestError, "top_logprobs needs logprobs set to true"),  # as OpenAI, vLLM
    ({"frequency_penalty": 2.5}, openai.BadRequestError, "frequency_penalty must be between -2 and 2"),
    ({"stream_options": {"include_usage": True}}, openai.BadRequestError, "only allowed when stream"),
    ({"extra_body": {"min_q": 0.1}}, openai.BadRequestError, "unrecognized request argument"),
    ({"extra_body": {"repetition_penalty": 0}}, openai.BadRequestError, "repetition_penalty must be"),
    ({"reasoning_effort": "low"}, openai.BadRequestError, "unrecognized request argument"),
    ({"max_completion_tokens": 10 ** 6}, openai.BadRequestError, "max_completion_tokens 1000000 exceed"),
])
def test_openai_client_errors_in_openai_shape(smol, kw, error, words):
    server, _, _, engine = smol
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
    for stream in (False, True):
        if stream and "stream_options" in kw:
            continue
        with pytest.raises(error) as e:
            client.chat.completions.create(**kw, stream=stream)
        err = e.value.response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    _pool_is_full(engine)


def test_models_retrieve_unknown_is_404(smol):
    server, *_ = smol
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    # Tool choice "none" leaves the tools out: accepted on a template without them.
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none")
    assert r.choices[0].message.tool_calls is None


# ---- a small random model with the real Llama 3 tokenizer --------------------------------------------

@pytest.fixture(scope="module")
def debug():
    with debug_server(max_batch=32, num_blocks=160, max_n=8) as served:
        yield served


def _expected(model, tok, ids, max_tokens):
    # As herd.generate: the tokenizer's reserved tokens are never produced (this random model's
    # argmax lands on some of Llama 3's 250 reserved ids).
    c = generate_batch(model, [ids], max_new_tokens=max_tokens, stop_ids=sorted(tok.stop_ids),
                       sampling=SamplingParams(suppress=reserved_ids(tok)))[0]
    return tok.decode(c.ids)


def test_64_concurrent_clients_good_bad_and_gone(debug):
    server, model, tok, engine = debug
    url = server.url
    good = []  # (body, expected text, path)
    for i in range(24):
        prompt = f"Request {i}: " + "tell me more " * (i % 7)
        body = {"model": "debug", "prompt": prompt, "max_tokens": 4 + i % 5, "temperature": 0}
        good.append((body, _expected(model, tok, tok.encode(prompt, bos=True), body["max_tokens"]), "/v1/completions"))
    for i in range(12):
        messages = [{"role": "user", "content": f"Question number {i}?" + " more" * i}]
        body = {"model": "debug", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
        ids = tok.chat.encode_dialog(messages)
        good.append((body, _expected(model, tok, ids, 6), "/v1/chat/completions"))
    bad = ([b'{"prompt": "unterminated', b"[1, 2", b"\xff\xfe{}", b""]
           + [json.dumps({"prompt": "hi", "max_tokens": 3, "frobnicate": i}).encode() for i in range(4)]
           + [json.dumps({"prompt": "hi", "max_tokens": -i - 1}).encode() for i in range(4)]
           + [json.dumps({"prompt": list(range(5, 300)), "max_tokens": 3}).encode() for _ in range(4)]
           + [json.dumps(b).encode() for b in ({"prompt": [-1]}, {"prompt": "x", "n": 100},
                                                {"prompt": "x", "temperature": -1}, {"messages": []})])
    statuses: list[int] = []
    texts: list[tuple[str, str]] = []

    async def good_client(client, body, want, path):
        if body.get("stream"):
            text = ""
            async with client.stream("POST", url + path, json=body) as r:
                statuses.append(r.status_code)
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        delta = json.loads(line[6:])["choices"]
                        text += "".join(c["delta"].get("content") or "" for c in delta)
        else:
            r = await client.post(url + path, json=body)
            statuses.append(r.status_code)
            text = r.json()["choices"][0]["text"]
        texts.append((text, want))

    async def bad_client(client, raw):
        r = await client.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
        assert "message" in r.json()["error"]

    async def leaving_client(client, i):
        body = {"prompt": f"a long story {i}", "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            statuses.append(r.status_code)
            lines = r.aiter_lines()
            for _ in range(3):
                await lines.__anext__()
        # leaving the block closes the connection mid-stream

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            jobs = ([good_client(client, *g) for g in good] + [bad_client(client, b) for b in bad]
                    + [leaving_client(client, i) for i in range(8)])
            assert len(jobs) == 64
            await asyncio.gather(*jobs)

    asyncio.run(main())
    assert all(s < 500 for s in statuses) and len(statuses) == 64
    assert all(got == want for got, want in texts) and len(texts) == len(good)
    _pool_is_full(engine)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 200, None),  # Llama 3 adds BOS: a valid one-token prompt
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [-1]}, 400, "outside the vocabulary"),
    ({"prompt": [999999]}, 400, "outside the vocabulary"),
    ({"prompt": [1.5]}, 400, "prompt must be"),
    ({"prompt": "hi", "n": 9}, 400, "n must be between 1 and 8"),
    ({"prompt": "hi", "n": 0}, 400, "n must be"),
    ({"prompt": "hi", "max_tokens": 10 ** 9}, 400, "maximum context length"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens must be an integer"),
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "top_p": 1.01}, 400, "top_p"),
    ({"prompt": "hi", "top_k": -2}, 400, "top_k"),
    ({"prompt": "hi", "top_k": -1}, 200, None),  # vLLM's "off", as 0 (test_top_k_minus_one_is_off)
    ({"prompt": "hi", "stop": [chr(97 + i % 26) * (1 + i // 26) for i in range(33)]}, 400, "at most 32 stop"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop sequence"),
    ({"prompt": "hi", "seed": 2 ** 70}, 400, "seed"),
    ({"prompt": "hi", "logprobs": 3}, 200, None),  # tests/inference/test_logprobs.py checks the values
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs must be between 0 and 20"),
    ({"prompt": "hi", "logprobs": False}, 200, None),
    ({"prompt": "hi", "echo": 0}, 400, "echo must be a boolean"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "only allowed when stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}, "stream": True}, 200, None),
    ({"prompt": "hi", "stream_options": {"include_usage": None}, "stream": True}, 200, None),  # unset, as vLLM
    ({"prompt": "hi", "stream_options": {"include_usage": 1}, "stream": True}, 400, "stream_options"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream must be"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "hi", "model": "DEBUG"}, 404, "does not exist"),
    ({"prompt": "hi", "model": ""}, 200, None),  # vLLM: an empty name is the served model (was a 404)
    ({"prompt": list(range(1, 400))}, 400, "maximum context length"),
])
def test_bad_requests_get_4xx_in_openai_shape(debug, body, status, words):
    server, _, _, engine = debug
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    if words:
        err = r.json()["error"]
        assert words in err["message"] and err["type"]
    _pool_is_full(engine)


def test_top_k_minus_one_is_off(debug):
    """top_k -1 is vLLM's "consider all tokens" (its SamplingParams default, accepted beside 0):
    it was a 400 here. The same seeded samples as top_k 0, and not those of top_k 1 (greedy)."""
    server = debug[0]
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 3, "ignore_eos": True, "n": 2}
    texts = {}
    for k in (-1, 0, 1):
        r = httpx.post(server.url + "/v1/completions", json={**body, "top_k": k}, timeout=60)
        assert r.status_code == 200, r.text
        texts[k] = [c["text"] for c in r.json()["choices"]]
    assert texts[-1] == texts[0] != texts[1]


def test_malformed_bodies_headers_and_routes(debug):
    server, _, _, engine = debug
    url = server.url
    post = lambda path, content, **kw: httpx.post(url + path, content=content, timeout=60, **kw)  # noqa: E731
    cases = [
        (post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'), 400, "UTF-8"),
        (post("/v1/completions", b'{"prompt": "\\ud800"}'), 400, "surrogate"),
        (post("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'), 400, "temperature"),
        (post("/v1/completions", b"[" * 100000 + b"]" * 100000), 400, "nested too deeply"),
        (post("/v1/completions", b'["a list"]'), 400, "JSON object"),
        (post("/v1/completions", b" " * (2 << 20)), 413, "bytes"),
        (post("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}'), 400, "role"),
        (post("/v1/chat/completions", b'{"messages": "hi"}'), 400, "messages"),
        (httpx.get(url + "/v1/nothing-here"), 404, "Not Found"),
        (httpx.get(url + "/v1/completions"), 405, "Method Not Allowed"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.request.content[:60], r.status_code, r.text)
        assert words in r.json()["error"]["message"]
    # A header block over uvicorn's limit is refused by the HTTP layer, never reaching the app.
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers={"x-big": "a" * 200_000}, timeout=60)
        assert 400 <= r.status_code < 500
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the connection was closed (or reset) instead: also no 5xx, and the server lives on
    assert httpx.get(url + "/health").json()["status"] == "ok"
    _pool_is_full(engine)


def test_n_stop_and_seed_over_http(debug):
    server, model, tok, engine = debug
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "n": 3, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    texts = [c["text"] for c in r["choices"]]
    assert len(set(texts)) == 1 and [c["index"] for c in r["choices"]] == [0, 1, 2]
    stop = texts[0][3:6]
    r = httpx.post(server.url + "/v1/completions", json={**body, "stop": stop, "n": 1}, timeout=60).json()
    assert r["choices"][0]["text"] == texts[0][:texts[0].index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    sampled = {**body, "temperature": 1.0, "seed": 5}
    a = httpx.post(server.url + "/v1/completions", json=sampled, timeout=60).json()
    b = httpx.post(server.url + "/v1/completions", json=sampled, timeout=60).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1
    assert a["usage"]["completion_tokens"] == 3 * 12
    _pool_is_full(engine)


# ---- tool calls: a scripted "model" that always answers with a Llama 3 JSON tool call -----------------

class Scripted(nn.Module):
    """Emits a fixed token sequence after any prompt of `prompt_len` tokens."""

    def __init__(self, args, script):
        super().__init__()
        self.args, self.script, self.prompt_len = args, script, 0
        self.tok_embeddings = nn.Embedding(1, 1)  # the engine reads the device and dtype here

    def forward(self, tokens, *, cache=None, positions=None, mask=None, last_only=False):
        step = (positions[:, -1] + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        logits = torch.zeros(tokens.shape[0], 1, self.args.vocab_size)
        logits[torch.arange(tokens.shape[0]), 0, torch.tensor(self.script)[step]] = 1.0
        return logits


def test_tool_calls_in_openai_shape():
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    script = tok.encode(call) + [tok.token_to_id("<|eom_id|>")]
    model = Scripted(PRESETS["debug"].replace(vocab_size=tok.vocab_size), script)
    engine = Engine(model, tok, num_blocks=64)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "description": "the city"}},
                                                   "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    model.prompt_len = len(tok.chat.encode_dialog(messages, tools=tools))
    with ServerThread(create_app(engine, "scripted")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="scripted", messages=messages, tools=tools, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (tc,) = choice.message.tool_calls
        assert tc.type == "function" and tc.function.name == "get_weather" and tc.id
        assert json.loads(tc.function.arguments) == {"city": "Paris"}
        chunks = list(client.chat.completions.create(model="scripted", messages=messages, tools=tools,
                                                     temperature=0, stream=True))
        calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            (0, "get_weather", {"city": "Paris"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert chunks[0].choices[0].delta.role == "assistant"
        # A forced tool_choice must name one of the tools (test_structured.py runs the forced calls).
        with pytest.raises(openai.BadRequestError, match="not among tools"):
            client.chat.completions.create(model="scripted", messages=messages, tools=tools,
                                           tool_choice={"type": "function", "function": {"name": "nope"}})
        # Without tools the same output is plain text.
        model.prompt_len = len(tok.chat.encode_dialog(messages))
        reply = client.chat.completions.create(model="scripted", messages=messages, temperature=0)
        assert reply.choices[0].message.content == call and reply.choices[0].finish_reason == "stop"
    _pool_is_full(engine)


def test_graceful_shutdown_finishes_in_flight_requests():
    torch.manual_seed(0)
    model = Transformer(PRESETS["debug"]).eval()
    engine = Engine(model, num_blocks=64)
    server = ServerThread(create_app(engine, "debug")).__enter__()
    result = {}

    def client():
        result["r"] = httpx.post(server.url + "/v1/completions", timeout=60,
                                 json={"prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True})

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while not engine.has_work and time.monotonic() < deadline:
        time.sleep(0.005)
    server.__exit__(None, None, None)  # uvicorn stops accepting and waits for the request
    t.join()
    r = result["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
    assert not server.thread.is_alive() and engine._thread is None
    _pool_is_full(engine)


def test_herd_serve_refuses_bad_options_in_one_line(capsys):
    from herd.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "herd: error: --port must be in 0..65535, got 70000"
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--model", "/no/such/model.gguf", "--port", "0"]) == 2
    assert "no model" in capsys.readouterr().err


def test_chat_without_max_tokens_fits_the_kv_cache(smol):
    """OpenAI clients often send no max_tokens: the default is the rest of the context, capped at
    what this server's KV cache (64 MiB: ~1,400 positions of SmolLM2's 8,192) holds for the request,
    rather than a 400 for every such request."""
    server, model, tok, engine = smol
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert engine.blocks.num_blocks * engine.block_size < model.args.max_seq_len
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0)
    assert reply.choices[0].message.content == herd.generate(model, tok, messages, max_new_tokens=64)
    _pool_is_full(engine)
