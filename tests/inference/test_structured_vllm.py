"""vLLM's structured-output request forms (herd/inference/server.py, structured.py): the
`structured_outputs` object (json, regex, choice, grammar, json_object) and the legacy
guided_json / guided_regex / guided_choice / guided_grammar fields, on /v1/chat/completions and
/v1/completions, sent through the official client's extra_body as a vLLM user sends them. The real
SmolLM2 GGUF writes the replies; each is checked independently of llguidance (re.fullmatch of the
regex or of a regex equivalent to the grammar, membership of the choice list, jsonschema). Bad
requests are one-line 400s naming their field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from herd.inference.structured import Matcher, choice_grammar

from .servers import bad_request_error, smollm2_server

DATE = r"\d{4}-\d{2}-\d{2}"
# Regex metacharacters everywhere: a choice is its exact text, never a pattern.
CHOICES = ["a+b", "(x)", "yes.", "no|maybe", "[1-3]*"]
# A Lark grammar (llguidance's dialect) and a regex that accepts exactly its language.
LARK = 'start: answer " " count\nanswer: "yes" | "no"\ncount: /[0-9]{1,3}/\n'
LARK_RE = r"(yes|no) [0-9]{1,3}"
GBNF = 'root ::= ("red" | "green" | "blue") "!"'
GBNF_RE = r"(red|green|blue)!"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with smollm2_server(smollm2_gguf) as (server, model, tok, engine):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield client, server, tok


def _chat(client, ask, extra, **kw):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": ask}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 30), extra_body=extra,
                                          **kw)


def test_choice_grammar_is_literal(smol):
    """The choice's metacharacters are text: "a+b" is accepted, "aab" (what the pattern a+b would
    match) is not, and the grammar is done after a whole choice."""
    _, _, tok = smol
    m = Matcher(choice_grammar(CHOICES), tok, tok.vocab_size)
    assert all(m.advance(t) for t in tok.encode("a+b")) and m.done
    m = Matcher(choice_grammar(CHOICES), tok, tok.vocab_size)
    assert not all(m.advance(t) for t in tok.encode("aab"))


def test_structured_outputs_regex(smol):
    client, *_ = smol
    r = _chat(client, "When did the first man land on the moon? Answer with a date.",
              {"structured_outputs": {"regex": DATE}})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.tool_calls is None
    assert re.fullmatch(DATE, c.message.content), c.message.content


def test_structured_outputs_choice_with_metacharacters(smol):
    client, *_ = smol
    r = _chat(client, "Pick one.", {"structured_outputs": {"choice": CHOICES}})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content in CHOICES, r.choices[0].message.content
    r = client.completions.create(model="smollm2", prompt="Pick one option:", temperature=0, max_tokens=20,
                                  extra_body={"structured_outputs": {"choice": CHOICES}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text in CHOICES, r.choices[0].text


@pytest.mark.parametrize("grammar, pattern", [(LARK, LARK_RE), (GBNF, GBNF_RE)])
def test_structured_outputs_grammar(smol, grammar, pattern):
    """A Lark grammar, and a GBNF one (llguidance converts it, as vLLM's guidance backend does)."""
    client, *_ = smol
    r = _chat(client, "Do you like apples, and how many did you eat?", {"structured_outputs": {"grammar": grammar}})
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message.content
    r = client.completions.create(model="smollm2", prompt="Answer:", temperature=0, max_tokens=20,
                                  extra_body={"guided_grammar": grammar})
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text


def test_structured_outputs_json_and_json_object(smol):
    client, *_ = smol
    for spec in (PERSON, json.dumps(PERSON)):  # vLLM takes the schema or a JSON string of it
        r = _chat(client, "Describe a person as JSON.", {"structured_outputs": {"json": spec}}, max_tokens=60)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = _chat(client, "Describe a person as JSON.",
              {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}}, max_tokens=60)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False), text
    r = client.completions.create(model="smollm2", prompt="A JSON object:", temperature=0, max_tokens=60,
                                  extra_body={"structured_outputs": {"json_object": True}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="smollm2", prompt="A person as JSON:", temperature=0, max_tokens=60,
                                  extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_legacy_guided_fields(smol):
    client, *_ = smol
    r = _chat(client, "Is the sky blue?", {"guided_choice": ["yes", "no", "(maybe)"]})
    assert r.choices[0].message.content in ("yes", "no", "(maybe)")
    r = client.completions.create(model="smollm2", prompt="Today's date is", temperature=0, max_tokens=20,
                                  extra_body={"guided_regex": DATE})
    assert r.choices[0].finish_reason == "stop" and re.fullmatch(DATE, r.choices[0].text), r.choices[0].text
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    r = _chat(client, "What is your phone number?", {"guided_regex": phone})
    assert r.choices[0].finish_reason == "stop" and re.fullmatch(phone, r.choices[0].message.content)


def test_streaming_and_n_samples(smol):
    client, *_ = smol
    texts, reasons = ["", ""], [None, None]
    for chunk in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Give a date."}], temperature=1.0, seed=7, n=2,
            max_tokens=30, stream=True, extra_body={"structured_outputs": {"regex": DATE}}):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["stop", "stop"]
    assert all(re.fullmatch(DATE, t) for t in texts), texts
    r = client.completions.create(model="smollm2", prompt="Pick one option:", temperature=1.0, seed=3, n=2,
                                  max_tokens=20, extra_body={"guided_choice": CHOICES})
    assert len(r.choices) == 2
    assert all(c.finish_reason == "stop" and c.text in CHOICES for c in r.choices), [c.text for c in r.choices]


# ---- refusals -----------------------------------------------------------------------------------

_T = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
_SO = "structured_outputs"


@pytest.mark.parametrize("path", ["chat", "completions"])
@pytest.mark.parametrize("body, param, words", [
    ({_SO: {"regex": "a", "choice": ["a"]}}, _SO, "exactly one constraint"),
    ({_SO: {}}, _SO, "exactly one constraint"),
    ({_SO: {"regex": "a"}, "response_format": {"type": "json_object"}}, _SO, "cannot be combined with response_format"),
    ({_SO: {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice", "cannot be combined with structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one of"),
    ({_SO: {"regex": "(("}}, _SO, "invalid regex"),
    ({"guided_regex": "a{5,2}"}, "guided_regex", "invalid regex"),
    ({_SO: {"grammar": 'start: "a" | ('}}, _SO, "invalid grammar"),
    ({_SO: {"grammar": "start: undefined_rule"}}, _SO, "invalid grammar"),
    ({"guided_grammar": ""}, "guided_grammar", "invalid grammar"),
    ({_SO: {"choice": []}}, _SO, "non-empty list of strings"),
    ({_SO: {"choice": ["a", 1]}}, _SO, "non-empty list of strings"),
    ({"guided_choice": "a"}, "guided_choice", "non-empty list of strings"),
    ({_SO: {"regex": "a", "pattern": "b"}}, _SO, "unexpected field(s) pattern"),
    ({_SO: {"regex": 5}}, _SO, "regex must be a string"),
    ({"guided_regex": ["a"]}, "guided_regex", "must be a string"),
    ({_SO: {"json": "{not json"}}, _SO, "not JSON"),
    ({_SO: {"json": [1]}}, _SO, "must be a JSON schema object"),
    ({_SO: {"json": {"type": "nonsense"}}}, _SO, "invalid JSON schema"),
    ({_SO: {"json_object": False}}, _SO, "json_object must be true"),
    ({_SO: {"regex": "a", "structural_tag": "x"}}, _SO, "not supported"),
    ({_SO: {"regex": "a", "disable_any_whitespace": "yes"}}, _SO, "must be a boolean"),
    ({_SO: "a+"}, _SO, "must be an object"),
])
def test_bad_vllm_structured_requests_are_one_line_400s(smol, path, body, param, words):
    err = bad_request_error(smol[1], path, body)
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("extra", [{_SO: {"choice": ["a"]}}, {"guided_regex": "a"}])
def test_forced_tool_choice_and_a_constraint_is_a_400(smol, extra):
    client, *_ = smol
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       tools=_T, tool_choice="required", extra_body=extra)
    err = e.value.body
    assert err["param"] == next(iter(extra)) and "cannot be combined with a forced tool_choice" in err["message"]


def test_a_grammar_that_fails_while_generating_is_an_error_not_a_reply(smol):
    """llguidance compiles a{1000000} and fails on its first token ("too many expressions"): the
    reply would not follow the regex, so the request ends in one line naming the grammar, streamed
    or not — never "aaaa" with finish_reason "stop"."""
    client, server, _ = smol
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "Say a", {"guided_regex": "a{1000000}"}, max_tokens=5)
    err = e.value.body
    assert err["param"] == "guided_regex" and err["code"] == "grammar_error", err
    assert "structured-output grammar failed" in err["message"] and "\n" not in err["message"]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "prompt": "a", "max_tokens": 5, "stream": True, "guided_regex": "a{1000000}"}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "grammar_error"
    assert not any('"finish_reason":"stop"' in line.replace(" ", "") for line in lines)
