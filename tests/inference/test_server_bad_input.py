"""Bad request bodies found by fuzzing `herd serve`: each is a 4xx in OpenAI's error shape whose
`param` names the offending field (as vLLM's server answers), never a 500 or a hang — including
values that pass validation but used to break the engine's thread (a tiny temperature or top_p),
after which every request hung. And if the engine's thread does die, requests get an error at once."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams, sample
from herd.inference.server import ServerThread, create_app
from herd.models.args import PRESETS
from herd.models.llama3 import Transformer

from .servers import debug_server


@pytest.fixture(scope="module")
def server():
    with debug_server(max_batch=8, num_blocks=64, max_n=4) as (s, _, _, engine):
        yield s, engine


def test_tiny_temperature_or_top_p_is_greedy_not_a_dead_engine():
    logits = torch.randn(3, 100) * 20
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=5e-324),
                   SamplingParams(temperature=1e-30, top_k=5),
                   SamplingParams(temperature=0.5, top_p=1e-10), SamplingParams(temperature=1.0, top_p=5e-324)):
        assert sample(logits, params, torch.Generator().manual_seed(0)).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 5e-324},
                                   {"temperature": 0.7, "top_p": 1e-10}, {"top_p": 5e-324}])
def test_tiny_sampling_values_over_http(server, extra):
    """These passed validation, then NaN probabilities raised in torch.multinomial on the engine's
    thread: it died, and this and every later request waited forever."""
    s, engine = server
    for stream in (False, True):
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True, "stream": stream, **extra})
        assert r.status_code == 200, r.text
    assert httpx.get(s.url + "/health", timeout=10).json()["status"] == "ok"


FN = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize("path, body, param, words", [
    # tools: each malformed definition names tools[i] (was "invalid messages or tools:
    # AttributeError: 'str' object has no attribute 'get'", blamed on messages)
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools", "tools[0].function.parameters must be a JSON schema object"),
    ("chat", {"tools": [FN, {"type": "function", "function": {"name": "g", "parameters": {"properties": "x"}}}]},
     "tools", "tools[1].function.parameters.properties"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 5}}}}]},
     "tools", "tools[0].function.parameters.properties"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": 5}}}]},
     "tools", "tools[0].function.parameters.required"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": [[1]]}}}]},
     "tools", "tools[0].function.parameters.required"),
    ("chat", {"tools": [{"type": "function", "function": {}}]}, "tools", "tools[0].function.name"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
     "tools", "tools[0].function.description"),
    # OpenAI's FunctionDefinition.strict is a boolean: a string was accepted
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools", "tools[0].function.strict must be a boolean"),
    # a text part without its text: was "unsupported content part 'text' (only text parts are supported)"
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", "a text part must be"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages",
     "a text part must be"),
    # a chat prompt over the context is the messages' fault, with or without max_tokens (was "prompt")
    ("chat", {"messages": [{"role": "user", "content": "a " * 600}], "max_tokens": 2}, "messages",
     "maximum context length"),
    # non-integer token ids: was "token id \"x\" is outside the vocabulary"
    ("completions", {"prompt": [[1, 2], [3, "x"]]}, "prompt", "token ids must be integers"),
    ("completions", {"prompt": [[1, True]]}, "prompt", "token ids must be integers"),
    # fields herd ignores still have OpenAI's types (vLLM's request model checks them): were accepted
    ("completions", {"prompt": "hi", "user": 5}, "user", "user must be a string"),
    ("chat", {"store": "yes"}, "store", "store must be a boolean"),
    ("chat", {"parallel_tool_calls": 1}, "parallel_tool_calls", "must be a boolean"),
    ("chat", {"metadata": ["x"]}, "metadata", "metadata must be an object"),
])
def test_bad_fields_are_400s_naming_the_field(server, path, body, param, words):
    s, engine = server
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {}) | {"max_tokens": 2}
    r = httpx.post(f"{s.url}/v1/{'chat/' if path == 'chat' else ''}completions", json={**base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and words in err["message"], err


def test_good_tools_and_ignored_fields_still_pass(server):
    s, _ = server
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}]
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2,
            "tools": tools, "user": "u1", "store": False, "metadata": {"k": "v"}, "parallel_tool_calls": True}
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_not_sent_as_json_is_a_400(server, path, content_type):
    """vLLM's FastAPI models read a JSON body only under application/json (or +json, or no
    Content-Type); a text/plain body was parsed and answered 200 here (`curl -d` without
    -H 'Content-Type: application/json' sends a form)."""
    s, _ = server
    body = {"/v1/completions": {"prompt": "hi", "max_tokens": 2}, "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "/tokenize": {"prompt": "hi"},
        "/detokenize": {"tokens": [1, 2]}}[path]
    r = httpx.post(s.url + path, content=json.dumps(body), headers={"content-type": content_type}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "application/json" in err["message"], err
    for ok in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json", None):
        headers = {} if ok is None else {"content-type": ok}
        r = httpx.post(s.url + path, content=json.dumps(body), headers=headers, timeout=60)
        assert r.status_code == 200, (ok, r.text)


def test_a_number_over_python_s_digit_limit_is_a_400(server):
    s, _ = server
    raw = b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"  # int() refuses > 4300 digits: was a 500
    r = httpx.post(s.url + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "number" in r.json()["error"]["message"], r.text


class _Fatal(BaseException):
    """Not an Exception: gets past the engine's per-step recovery and ends its thread."""


class _Broken(Transformer):
    def forward(self, *a, **kw):
        raise _Fatal("boom")


def test_a_dead_engine_answers_at_once_instead_of_hanging(monkeypatch):
    torch.manual_seed(0)
    model = _Broken(PRESETS["debug"]).eval()
    engine = Engine(model, num_blocks=32)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # the engine thread's traceback
    with ServerThread(create_app(engine, "debug")) as s:
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_stopped", r.text
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 4, "stream": True}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_stopped", r.text
        assert time.monotonic() - t0 < 20
        h = httpx.get(s.url + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "error"


def test_an_engine_that_dies_mid_stream_ends_the_stream_with_an_error(monkeypatch):
    torch.manual_seed(0)
    calls = []

    class DiesLater(Transformer):
        def forward(self, *a, **kw):
            calls.append(1)
            if len(calls) > 3:
                raise _Fatal("boom")
            return super().forward(*a, **kw)

    engine = Engine(DiesLater(PRESETS["debug"]).eval(), num_blocks=32)
    monkeypatch.setattr("threading.excepthook", lambda args: None)
    with ServerThread(create_app(engine, "debug")) as s:
        body = {"prompt": [1, 2, 3], "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_stopped", events


def test_a_failing_step_is_a_500_for_its_requests_and_the_server_goes_on(capfd):
    """An exception in an engine step used to end the engine's thread, and the server answered 500
    to everything until restarted. Now the step's requests get an error (a 500 in OpenAI's shape,
    or an error event then [DONE] in a stream), and the next request is served as by a fresh engine."""
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    torch.manual_seed(0)
    fail = {2, 6}  # the non-streamed request's decode, then the streamed one's

    class Flaky(Transformer):
        calls = 0

        def forward(self, *a, **kw):
            Flaky.calls += 1
            if Flaky.calls in fail:
                raise RuntimeError("injected failure")
            return super().forward(*a, **kw)

    model = Flaky(PRESETS["debug"].replace(vocab_size=tok.vocab_size, tie_embeddings=True))
    model.init_weights(std=0.5)
    model.eval()
    body = {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True, "n": 2, "seed": 7}
    engine = Engine(model, tok, max_batch=8, num_blocks=64, block_size=16)
    with ServerThread(create_app(engine, "debug")) as s:
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 500, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "engine_error"
        Flaky.calls = 3
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error", events
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)  # no more failures
        assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/health", timeout=10).json()["status"] == "ok"
        deadline = time.monotonic() + 30
        while engine.has_work and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.blocks_free == engine.blocks.num_blocks
    fresh = Engine(model, tok, max_batch=8, num_blocks=64, block_size=16)
    with ServerThread(create_app(fresh, "debug")) as s:
        want = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
    assert [c["text"] for c in r.json()["choices"]] == [c["text"] for c in want.json()["choices"]]
    err = capfd.readouterr().err
    assert err.count("RuntimeError: injected failure") == 2, err  # each failure's traceback, once
