"""Structured outputs (herd/inference/structured.py, llguidance): response_format json_object /
json_schema and tool_choice "required" / named, as OpenAI's API and vLLM's server give them. The
real SmolLM2 GGUF writes the JSON (checked with json.loads and the jsonschema package); a random
debug model checks the mask itself (every sampled token allowed by a replayed matcher), n>1 samples
and preemption; bad schemas and tool names are one-line 400s naming their field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams, TokenCounts, process_logits, sample
from herd.inference.structured import Matcher, json_schema_grammar
from herd.models.args import PRESETS
from herd.models.llama3 import Transformer

from .servers import bad_request_error, debug_server, smollm2_server

# ---- schemas ------------------------------------------------------------------------------------

# additionalProperties false: the grammar closes each object after its keys (a 135M model left free
# keeps inventing keys until max_tokens).
ENUM = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["color"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "address"], "additionalProperties": False}
ARRAY = {"type": "object", "properties": {"fruits": {"type": "array", "minItems": 2, "maxItems": 4,
                                                     "items": {"type": "string", "maxLength": 12}}},
         "required": ["fruits"], "additionalProperties": False}
BOUNDS = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65}},
          "required": ["age"], "additionalProperties": False}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 30}},
                                          "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                          "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                                          "required": ["a", "b"], "additionalProperties": False}}},
]


def _fmt(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---- the real SmolLM2 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with smollm2_server(smollm2_gguf) as (server, model, tok, engine):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield client, model, tok, engine


@pytest.mark.parametrize("schema, ask", [
    (ENUM, "What color is the sky? Answer in JSON."),
    (NESTED, "Give a person's name and address as JSON."),
    (ARRAY, "List some fruits as JSON."),
    (BOUNDS, "How old is a typical college student? Answer in JSON."),
])
def test_json_schema_output_follows_the_schema(smol, schema, ask):
    client, *_ = smol
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": ask}],
                                       temperature=0, max_tokens=120, response_format=_fmt(schema))
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_is_an_object(smol):
    client, *_ = smol
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is 2+2? Reply in JSON with key answer."}],
        temperature=0, max_tokens=100, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_response_format(smol):
    """vLLM takes response_format on /v1/completions too."""
    client, *_ = smol
    r = client.completions.create(model="smollm2", prompt="The sky's color, as JSON:", temperature=0,
                                  max_tokens=60, extra_body={"response_format": _fmt(ENUM)})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), ENUM)


def test_n_samples_and_streaming_each_follow_the_schema(smol):
    client, *_ = smol
    msgs = [{"role": "user", "content": "List some fruits as JSON."}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=1.0, seed=3, n=3,
                                       max_tokens=80, response_format=_fmt(ARRAY))
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), ARRAY)
    texts, reasons = ["", ""], [None, None]
    for chunk in client.chat.completions.create(model="smollm2", messages=msgs, temperature=1.0, seed=4, n=2,
                                                max_tokens=80, response_format=_fmt(ARRAY), stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["stop", "stop"]
    for t in texts:
        jsonschema.validate(json.loads(t), ARRAY)


def test_named_tool_choice_returns_that_call(smol):
    client, *_ = smol
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=60, tools=TOOLS,
                                       tool_choice=choice)
    c = r.choices[0]
    # vLLM: the generated JSON is the named function's arguments; finish_reason as generated.
    assert c.finish_reason == "stop" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=60,
                                                 tools=TOOLS, tool_choice=choice, stream=True))
    calls = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or [])]
    # streamed as vLLM streams a named call: the first delta names it (with its id), the rest carry
    # pieces of the arguments, which add up to the unstreamed reply's
    assert len(calls) > 3 and all(d.index == 0 for d in calls)
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in calls[1:])
    assert "".join(d.function.arguments for d in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_required_tool_choice_calls_one_of_the_tools(smol):
    client, *_ = smol
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=120, tools=TOOLS,
                                       tool_choice="required")
    c = r.choices[0]
    # vLLM: "required" ends with finish_reason "tool_calls"; the JSON array's items are the calls.
    assert c.finish_reason == "tool_calls" and c.message.tool_calls and c.message.content is None, c.message
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in c.message.tool_calls:
        assert call.function.name in params and call.id
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


def _streamed_calls(chunks, index=0):
    """A streamed choice's tool calls, each {"id", "name", "arguments", "deltas"} from its deltas."""
    calls = {}
    for ch in chunks:
        for c in ch.choices:
            for d in (c.delta.tool_calls or []) if c.index == index else []:
                if d.index not in calls:  # the first delta of a call names it, with its id
                    assert d.id and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": "", "deltas": 0}
                else:
                    assert d.id is None and d.function.name is None, d
                calls[d.index]["arguments"] += d.function.arguments
                calls[d.index]["deltas"] += 1
    return [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("ask, extra", [
    ("What is the weather in Paris?", {"temperature": 0}),
    ("Add 2 and 3, and tell me the weather in Rome.", {"temperature": 1.0, "seed": 5, "n": 3}),
])
def test_required_tool_choice_streams_arguments_piece_by_piece(smol, ask, extra):
    """As vLLM streams tool_choice "required": each call's first delta names it, then its arguments
    come in pieces, which add up to the non-streamed reply's call (they used to come as one delta
    when the reply ended)."""
    client, *_ = smol
    kw = dict(model="smollm2", messages=[{"role": "user", "content": ask}], max_tokens=150, tools=TOOLS,
              tool_choice="required", logprobs=True, **extra)
    r = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c.message
        got = _streamed_calls(chunks, c.index)
        assert [(x["name"], x["arguments"]) for x in got] == [(t.function.name, t.function.arguments)
                                                              for t in c.message.tool_calls]
        for x in got:
            assert x["deltas"] > 1, got
            jsonschema.validate(json.loads(x["arguments"]), params[x["name"]])
        ends = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].index == c.index]
        assert ends[-1] == "tool_calls"
        # every token's logprobs still streamed, though the tokens before a call's arguments send no delta
        streamed = [e for ch in chunks for x in ch.choices if x.index == c.index and x.logprobs
                    for e in x.logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in c.logprobs.content]


def test_required_tool_choice_cut_short_before_a_call_is_its_text(smol):
    client, *_ = smol
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              max_tokens=6, temperature=0, tools=TOOLS, tool_choice="required")
    r = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert _streamed_calls(chunks) == []
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == r.choices[0].message.content


def _required_reply(calls, rng) -> str:
    """The JSON array tool_choice "required" writes, with the whitespace the grammar allows put in
    at random, keys in either order, and an unrelated key."""
    def ws():
        return rng.choice(["", "", " ", "\n", " \n\t "])

    def dump(v):
        if isinstance(v, dict):
            return "{" + ws() + ("," + ws()).join(json.dumps(k) + ws() + ":" + ws() + dump(x) + ws()
                                                 for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ws() + ("," + ws()).join(dump(x) + ws() for x in v) + "]"
        return json.dumps(v, ensure_ascii=rng.random() < 0.5)
    items = []
    for c in calls:
        keys = [("name", c["name"]), ("parameters", c["parameters"])] + [("x", [1, "]"])] * (rng.random() < 0.3)
        items.append(dump(dict(keys[::-1] if rng.random() < 0.3 else keys)))
    return ws() + "[" + ws() + ("," + ws()).join(i + ws() for i in items) + "]" + ws()


def test_required_calls_scanner_matches_json_loads_however_the_text_is_split():
    """RequiredCalls reads each call's name and arguments out of the reply as it streams: the
    arguments always a prefix of the final ones, which json.loads reads as the parameters."""
    import random

    from herd.inference.server import RequiredCalls

    rng = random.Random(0)
    values = [{}, {"a": 'x, }{]\\" y '}, {"b": [1, {"c": " }"}], "d": None}, 5, 'str " } ', [], {"k": "ü ", "e": 1.5}]
    for _ in range(300):
        calls = [{"name": rng.choice(["f", 'g"h', "ö"]), "parameters": rng.choice(values)}
                 for _ in range(rng.randint(1, 3))]
        text = _required_reply(calls, rng)
        assert [{k: v for k, v in c.items() if k != "x"} for c in json.loads(text)] == calls
        whole = RequiredCalls()
        whole.feed(text)
        assert whole.names == [c["name"] for c in calls], text
        final = [whole.arguments(k) for k in range(len(calls))]
        assert [json.loads(a) for a in final] == [c["parameters"] for c in calls], text
        split, i = RequiredCalls(), 0
        while i < len(text):
            j = i + rng.randint(1, 5)
            split.feed(text[i:j])
            i = j
            assert all(final[k].startswith(split.arguments(k)) for k in range(len(split.names))), text
        assert [split.arguments(k) for k in range(len(calls))] == final


@torch.no_grad()
def test_without_response_format_greedy_is_unchanged(smol):
    """No response_format (or {"type": "text"}): the same greedy ids as a plain argmax loop."""
    client, model, tok, _ = smol
    msgs = [{"role": "user", "content": "Name three colors."}]
    prompt = tok.chat.encode_dialog(msgs, add_generation_prompt=True)
    ids = list(prompt)
    for _ in range(12):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] in tok.stop_ids:
            ids.pop()
            break
    want = tok.decode(ids[len(prompt):])
    for extra in ({}, {"response_format": {"type": "text"}}):
        r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=12, **extra)
        assert r.choices[0].message.content == want


# ---- the mask itself, on a random debug model ----------------------------------------------------

@pytest.fixture(scope="module")
def debug():
    with debug_server(max_batch=8, num_blocks=64, max_n=4) as got:
        yield got


def _replay_allowed(grammar, tok, vocab, ids):
    """Every token of `ids` allowed by a fresh matcher at its place."""
    m = Matcher(grammar, tok, vocab)
    for t in ids:
        if not m.allowed(vocab)[t]:
            return False
        assert m.advance(t)
    return True


def test_process_logits_masks_and_sample_obeys():
    logits = torch.randn(1, 10)
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, [2, 7]] = True
    out = process_logits(logits, SamplingParams(logit_bias={3: 100.0}), allowed=allowed)
    assert torch.isinf(out[0, ~allowed[0]]).all() and torch.isfinite(out[0, allowed[0]]).all()
    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(), SamplingParams(temperature=1.5, top_k=5), SamplingParams(temperature=1.0,
                                                                                             presence_penalty=1.0)):
        for _ in range(20):
            t = int(sample(logits, params, g, allowed=allowed,
                                counts=[TokenCounts([1]).sync([2], 10, "cpu")])[0])
            assert t in (2, 7)


def test_every_sampled_token_is_allowed_even_with_n_and_preemption():
    """A random model samples at temperature 1: left free it writes anything. Each sample's tokens
    must replay through a fresh matcher, end in a complete JSON the schema accepts — also for the
    samples of an n>1 request (their matchers fork) and through preemption (a tiny KV cache
    makes the engine preempt and recompute; a matcher advanced twice would fail the replay)."""
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    torch.manual_seed(0)
    model = Transformer(PRESETS["debug"].replace(vocab_size=tok.vocab_size, tie_embeddings=True))
    model.init_weights(std=0.5)
    model.eval()
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "bb", "ccc"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["k", "n"], "additionalProperties": False}
    # Compact JSON (vLLM's --disable-any-whitespace): a random model given free whitespace loops on it.
    grammar = json_schema_grammar(schema, any_whitespace=False)
    engine = Engine(model, tok, max_batch=8, num_blocks=26, block_size=4)
    prompts = [tok.encode(f"request {i}: give JSON", bos=True) for i in range(4)]
    sp = SamplingParams(temperature=1.0, seed=5, grammar=grammar)
    outs = engine.generate(prompts, max_tokens=40, sampling=sp, n=2)
    assert engine.stats["preemptions"] > 0
    for per_prompt in outs:
        assert len(per_prompt) == 2
        for o in per_prompt:
            assert o.finish_reason == "stop", o.text
            assert _replay_allowed(grammar, tok, tok.vocab_size, o.token_ids)
            jsonschema.validate(json.loads(o.text), schema)
    # Without a grammar the same model writes no JSON at all.
    free = engine.generate(prompts[:1], max_tokens=10, sampling=SamplingParams(temperature=1.0, seed=5))
    with pytest.raises(ValueError):
        json.loads(free[0][0].text)


def test_debug_server_json_object_and_stream(debug):
    server, model, tok, engine = debug
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "hi"}], n=2,
                                       temperature=1.0, seed=1, max_tokens=30, response_format=_fmt(schema))
    # A random model may spend its tokens on the whitespace JSON allows (vLLM's default grammar):
    # what it wrote is still a prefix of one of the two answers.
    for c in r.choices:
        compact = "".join(c.message.content.split())
        assert any(x.startswith(compact) for x in ('{"ok":true}', '{"ok":false}')), c.message.content
    texts = [""] * 2
    for chunk in client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "hi"}], n=2,
                                                temperature=1.0, seed=2, max_tokens=30, response_format=_fmt(schema),
                                                stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for t in texts:
        assert any(x.startswith("".join(t.split())) for x in ('{"ok":true}', '{"ok":false}')), t


# ---- refusals -----------------------------------------------------------------------------------

_T = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("path, body, param, words", [
    ("chat", {"response_format": _fmt({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})},
     "response_format", "invalid JSON schema"),
    ("chat", {"response_format": _fmt({"type": "integer", "minimum": 5, "maximum": 2})},
     "response_format", "invalid JSON schema"),
    ("chat", {"response_format": _fmt({"type": "string", "pattern": "(("})}, "response_format", "invalid JSON schema"),
    ("completions", {"response_format": _fmt({"type": "nonsense"})}, "response_format", "invalid JSON schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format",
     "name must be"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format", "schema must be"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format", "type must be"),
    ("chat", {"response_format": "json"}, "response_format", "must be an object"),
    ("chat", {"response_format": {"type": "json_object", "schema": {}}}, "response_format", "unexpected field"),
    ("chat", {"tools": _T, "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
     "not among tools"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "not among tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("chat", {"tools": _T, "tool_choice": "always"}, "tool_choice", "tool_choice must be"),
    ("chat", {"tools": _T, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
              "tool_choice": "required"}, "tool_choice", "invalid tools' parameters"),
])
def test_bad_structured_requests_are_one_line_400s(debug, path, body, param, words):
    err = bad_request_error(debug[0], path, body)
    assert err["param"] == param and words in err["message"], err
