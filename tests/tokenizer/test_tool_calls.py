"""Tool calls both ways, on inputs the other chat tests never used: generated replies decoded as
llama-models' `decode_assistant_message` decodes them (and sent back as the next request's
history), tool definitions and call arguments of the wrong shape (one `HerdError` line each), and
checkpoint templates given tool calls the way vLLM gives them to transformers."""

from __future__ import annotations

import json
import random

import pytest
from llama_models.datatypes import RawMessage, StopReason

from herd.errors import HerdError

from .test_chat_meta import _import_llama4_chat_format, to_raw
from .test_unseen_inputs import with_template


@pytest.fixture(scope="module")
def references():
    from llama_models.llama3.chat_format import ChatFormat as Ref3
    from llama_models.llama3.tokenizer import Tokenizer as T3
    from llama_models.llama4.tokenizer import Tokenizer as T4

    return {"llama3": Ref3(T3.get_instance()), "llama4": _import_llama4_chat_format()(T4.get_instance())}


@pytest.fixture(scope="module")
def toks(llama3, llama4):
    return {"llama3": llama3, "llama4": llama4}


def _ours(msg):
    return (msg["stop_reason"], msg["content"],
            [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])])


def _theirs(msg):
    return (msg.stop_reason.value, msg.content,
            [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in msg.tool_calls])


# ---- decoding replies ---------------------------------------------------------------------------

REPLIES = [
    # Spaces: the reference strips them with the stop token still on, so trailing ones stay.
    ("llama3", "Hello there.  <|eot_id|>"),
    ("llama3", "  lead and trail  <|eom_id|>"),
    ("llama3", "  cut short  "),
    ("llama3", "<|python_tag|>print(1)  <|eom_id|>"),
    ("llama4", "Sure.   <|eot|>"),
    # Llama 4's <|python_end|> is taken out of a reply that opened with <|python_start|> only.
    ("llama4", '[get_weather(city="SF")]<|python_end|><|eom|>'),
    ("llama4", "Type <|python_end|> to end.<|eot|>"),
    ("llama4", "<|python_start|>print(2)<|python_end|><|eom|>"),
    # A search builtin written as a custom call: its argument becomes the query.
    ("llama3", '{"type": "function", "name": "brave_search", "parameters": {"q": "gold price"}}<|eom_id|>'),
    ("llama3", '<function=wolfram_alpha>{"expression": "2+2"}</function><|eot_id|>'),
    ("llama4", '[photogen(prompt="a cat")]<|eot|>'),
    ("llama3", '{"name": "brave_search", "parameters": {"query": "q1"}}<|eot_id|>'),
    # Python-list values that are JSON values in another spelling, as the reference reads them.
    ("llama3", "[f(a={1, 2})]<|eot_id|>"),
    ("llama3", "[f(a=b'x', b=(1, 2))]<|eot_id|>"),
]


@pytest.mark.parametrize("flavor, reply", REPLIES)
def test_decode_assistant_matches_reference(references, toks, flavor, reply):
    tok = toks[flavor]
    ids = tok.encode(reply, allow_special=True)
    expected = _theirs(references[flavor].decode_assistant_message(ids, StopReason.out_of_tokens))
    assert _ours(tok.chat.decode_assistant(ids)) == expected


@pytest.mark.parametrize("flavor, reply", [r for r in REPLIES if '"q' in r[1] or "2+2" in r[1] or "cat" in r[1]])
def test_decoded_builtin_call_goes_back_as_the_reference_encodes_it(references, toks, flavor, reply):
    """The call the server returned comes back in the next request's history (arguments as a JSON
    string): herd must encode it, as the reference encodes its own decoded message."""
    tok = toks[flavor]
    ids = tok.encode(reply, allow_special=True)
    msg = tok.chat.decode_assistant(ids)
    sent = {"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function",
         "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
        for c in msg["tool_calls"]]}
    theirs = references[flavor].decode_assistant_message(ids, StopReason.out_of_tokens)
    theirs.stop_reason = StopReason.end_of_message  # how a turn of tool calls ends, without one given
    dialog = [{"role": "user", "content": "look it up"}, sent]
    expected = references[flavor].encode_dialog_prompt(
        [RawMessage(role="user", content="look it up"), theirs]).tokens
    assert tok.chat.encode_dialog(dialog) == expected


@pytest.mark.parametrize("reply", [
    "[f(a={[]: 1})]",      # literal_eval raises TypeError (unhashable key): was a crash
    "[f(**{'a': 1})]",     # was a call with a None argument name
    "[f(a=1j)]", "[f(a={1: 2})]", "[f(a=x)]", "[f(1)]", "[f(a=1e999)]",
    '{"name": "", "parameters": {}}',  # was a call named "" that the next request refused
])
def test_python_list_without_json_arguments_is_text(llama3, reply):
    msg = llama3.chat.decode_assistant(llama3.encode(reply + "<|eot_id|>", allow_special=True))
    assert msg == {"role": "assistant", "content": reply, "stop_reason": "end_of_turn"}


def test_random_replies_decode_to_json_arguments(llama3, llama4):
    """Whatever the model writes, decoding never raises and every call's arguments are JSON (the
    server sends them as a JSON string)."""
    rng = random.Random(0)
    pieces = ["[", "]", "(", ")", "f", "g", "=", "a", "b", ",", " ", "'", '"', "{", "}", ":", "1", "[]", "**", "b'",
              "j", "(1,)", "x", "None", "{1, 2}", "<function=f>", "</function>", '"name"', '"parameters"',
              ".call(query=", "brave_search", "\n"]
    for _ in range(400):
        tok = rng.choice([llama3, llama4])
        prefix = rng.choice(["", "[f(", tok.chat.python_start, tok.chat.python_start + "[g("])
        text = prefix + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        ids = tok.encode(text, allow_special=True) + rng.choice([[], [tok.eot_id], [tok.eom_id]])
        for call in tok.chat.decode_assistant(ids).get("tool_calls", []):
            assert call["function"]["name"] and isinstance(call["function"]["arguments"], dict), text
            json.dumps(call["function"]["arguments"], allow_nan=False)


# ---- bad tool definitions and calls ---------------------------------------------------------------

def _fn(**kw):
    return {"type": "function", "function": {"name": "f", **kw}}


@pytest.mark.parametrize("tools, match", [
    ([_fn(parameters="x")], r"tool 0 \(f\): 'parameters' must be a JSON schema object, got str"),
    ([_fn(parameters={"properties": ["a"]})], r"'parameters.properties' must map"),
    ([_fn(parameters={"properties": {"a": "int"}})], r"'parameters.properties' must map"),
    ([_fn(parameters={"properties": {"a": {}}, "required": "a"})], r"'parameters.required' must be a list"),
    ([_fn(parameters={"properties": {"a": {}}, "required": 5})], r"'parameters.required' must be a list"),
    (["brave_search", {"type": "retrieval"}], r"tool 1: unknown tool type 'retrieval'"),
])
def test_bad_tool_definitions_are_one_line_errors(llama3, llama4, tools, match):
    for tok in (llama3, llama4):
        with pytest.raises(HerdError, match=match) as info:
            tok.chat.encode_dialog([{"role": "user", "content": "hi"}], tools=tools)
        assert "\n" not in str(info.value)


def test_builtin_tool_type_is_that_builtin(llama3):
    dialog = [{"role": "user", "content": "hi"}]
    assert (llama3.chat.encode_dialog(dialog, tools=[{"type": "brave_search"}])
            == llama3.chat.encode_dialog(dialog, tools=["brave_search"]))


@pytest.mark.parametrize("call, match", [
    ({"name": "f", "arguments": {"a": {1, 2}}}, r"message 1: tool call 'f' arguments are not JSON values"),
    ({"name": "brave_search", "arguments": {"q": "x"}}, r"message 1: builtin tool call 'brave_search' needs a 'query'"),
    ({"name": "code_interpreter", "arguments": "{}"}, r"message 1: builtin tool call 'code_interpreter' needs a 'code'"),
])
def test_bad_tool_call_arguments_name_the_message(llama3, llama4, call, match):
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]}]
    for tok in (llama3, llama4):
        with pytest.raises(HerdError, match=match) as info:
            tok.chat.encode_dialog(dialog)
        assert "\n" not in str(info.value)


# ---- checkpoint templates: tool calls as vLLM renders them ---------------------------------------

TOOL_CALLS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content if m.content is defined else '' }}"
    "{% if m.tool_calls is defined %}[calls]{% for c in m.tool_calls %}{{ c.function.name }} "
    "{{ c.function.arguments | tojson }};{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _vllm_messages(dialog):
    """vLLM's chat_utils `_postprocess_messages`: tool call arguments given as a JSON string are
    parsed to a dict before the template renders them; an empty tool_calls list is dropped."""
    out = []
    for m in dialog:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls") == []:
            del m["tool_calls"]
        elif m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _vllm_arguments(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _vllm_arguments(args):
    if not args:  # None or "": vLLM passes {}
        return {}
    return args if isinstance(args, (dict, list)) else json.loads(args)


def _hf_ids(hf, dialog, **kw):
    out = hf.apply_chat_template(dialog, tokenize=True, **kw)
    return out if isinstance(out, list) else out["input_ids"]


def _call(name, args):
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}


def test_template_tool_call_arguments_are_parsed_as_vllm_does(smollm2, tmp_path):
    ours, hf = with_template(smollm2, tmp_path, TOOL_CALLS_TEMPLATE)
    dialog = [{"role": "user", "content": "weather?"},
              {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", '{"city":"Zürich","n":[1, 2]}'),
                                                                    _call("now", "")]},
              {"role": "tool", "content": "sunny"},
              {"role": "assistant", "content": "Sunny.", "tool_calls": []}]
    expected = _hf_ids(hf, _vllm_messages(dialog), add_generation_prompt=True)
    assert ours.chat.encode_dialog(dialog) == expected
    assert '[calls]get_weather {"city": "Zürich", "n": [1, 2]};now {};' in ours.decode(expected)
    assert "Sunny.[calls]" not in ours.decode(expected)  # the empty list is gone, as in vLLM


def test_exported_llama3_template_takes_builtin_calls_as_sent(references, llama3, tmp_path):
    """OpenAI clients send arguments as JSON strings; the exported Llama 3 template reads a builtin
    call's query from them, as vLLM renders it, giving Llama3ChatFormat's (Meta's) ids."""
    transformers = pytest.importorskip("transformers")
    from herd.tokenizer import load_tokenizer

    llama3.save(tmp_path, "hf")
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    dialog = [{"role": "user", "content": "gold price, and the weather?"},
              {"role": "assistant", "content": None, "tool_calls": [_call("brave_search", '{"query": "gold price"}')]},
              {"role": "tool", "content": "$2,400"},
              {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", '{"city":"SF"}')]},
              {"role": "tool", "content": "\"25 C\""}]
    expected = _hf_ids(hf, _vllm_messages(dialog), add_generation_prompt=True)
    assert ours.chat.encode_dialog(dialog) == expected == llama3.chat.encode_dialog(dialog)
    assert expected == references["llama3"].encode_dialog_prompt(to_raw(dialog)).tokens


@pytest.mark.parametrize("reply, calls", [
    # vLLM's hermes tool parser reads every <tool_call> block; only the first was read as one
    # object spanning both blocks, which is no JSON: the calls came back as text.
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n'
     "</tool_call>", [("f", {"a": 1}), ("g", {})]),
    ('<tool_call>{"name": "f", "arguments": {"a": "<b>"}}</tool_call>', [("f", {"a": "<b>"})]),
    ('Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call>', []),     # text first: text
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>oops</tool_call>', []),
])
def test_template_reply_of_tool_call_blocks(smollm2, reply, calls):
    msg = smollm2.chat.decode_assistant(smollm2.encode(reply + "<|im_end|>", allow_special=True))
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])] == calls
    assert msg["content"] == ("" if calls else reply) and msg["stop_reason"] == "end_of_turn"
