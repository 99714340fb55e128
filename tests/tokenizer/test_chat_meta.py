"""Llama 3 / Llama 4 chat formats against Meta's reference `ChatFormat` (llama-models) and the
prompt-format documents llama-models ships."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import llama_models
import pytest
from llama_models.datatypes import RawMessage, StopReason, ToolCall, ToolPromptFormat

from herd.errors import HerdError
from herd.tokenizer import Llama3ChatFormat, Llama4ChatFormat

DATA = Path(__file__).parent / "data"
DOCS = Path(llama_models.__file__).parent

WEATHER_ARGS = {"city": "San Francisco", "metric": "celsius"}
DIALOGS = {
    "user_only": [{"role": "user", "content": "Who are you?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
        {"role": "assistant", "content": "\"What is a helpful assistant?\""},
        {"role": "user", "content": [{"type": "text", "text": "And in "}, {"type": "text", "text": "中文？ 😀"}]},
    ],
    "builtin_search": [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "latest price of 1oz gold"}}}]},
        {"role": "tool", "content": "{\"price\": \"$2,400\"}"},
        {"role": "assistant", "content": "About $2,400."},
        {"role": "user", "content": "And the 100th decimal of pi?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "wolfram_alpha", "arguments": "{\"query\": \"100th decimal of pi\"}"}}]},
        {"role": "ipython", "content": "7"},
    ],
    "code_interpreter": [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Is 7 prime? Use code."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "code_interpreter",
                                              "arguments": {"code": "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"}}}]},
        {"role": "tool", "content": "True"},
    ],
    "custom_tool": [
        {"role": "user", "content": "Weather in SF?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER_ARGS)}}]},
        {"role": "tool", "content": "\"25 C\""},
        {"role": "assistant", "content": "It is 25 C in San Francisco.", "stop_reason": "end_of_turn"},
    ],
}


def to_raw(messages):
    """The same dialog as llama-models RawMessages. A tool-calling assistant turn is one the model
    ended with end_of_message, which is what our format assumes when no stop_reason is given."""
    raw = []
    for i, m in enumerate(messages):
        calls = []
        for c in m.get("tool_calls") or []:
            args = c["function"]["arguments"]
            calls.append(ToolCall(call_id=str(i), tool_name=c["function"]["name"],
                                  arguments=json.loads(args) if isinstance(args, str) else args))
        stop = m.get("stop_reason") or ("end_of_message" if calls else None)
        role = "tool" if m["role"] in ("tool", "ipython") else m["role"]
        content = m.get("content") or ""
        if isinstance(content, list):
            content = [{"type": "text", "text": p["text"]} for p in content]
        raw.append(RawMessage(role=role, content=content, tool_calls=calls,
                              stop_reason=StopReason(stop) if stop else None))
    return raw


def _import_llama4_chat_format():
    """llama_models.llama4.chat_format imports torchvision for its image transforms, which text
    dialogs never use. Without torchvision installed, import it against a stub that is removed
    again right away, so nothing else in the session sees a fake torchvision."""
    import importlib
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("llama_models.llama4.chat_format").ChatFormat
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    stubs = {n: types.ModuleType(n) for n in names}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        return importlib.import_module("llama_models.llama4.chat_format").ChatFormat
    finally:
        for n in names:
            sys.modules.pop(n, None)


@pytest.fixture(scope="module")
def formats(llama3, llama4):
    from llama_models.llama3.chat_format import ChatFormat as Ref3
    from llama_models.llama3.tokenizer import Tokenizer as T3
    from llama_models.llama4.tokenizer import Tokenizer as T4

    Ref4 = _import_llama4_chat_format()

    return {"llama3": (llama3.chat, Ref3(T3.get_instance())), "llama4": (llama4.chat, Ref4(T4.get_instance()))}


@pytest.mark.parametrize("flavor", ["llama3", "llama4"])
@pytest.mark.parametrize("name", list(DIALOGS))
def test_dialog_ids_match_reference(formats, flavor, name):
    ours, ref = formats[flavor]
    expected = ref.encode_dialog_prompt(to_raw(DIALOGS[name])).tokens
    assert ours.encode_dialog(DIALOGS[name]) == expected
    # The reference always appends the assistant header; without a generation prompt we stop before it.
    header = ours.header("assistant")
    assert expected[-len(header):] == header
    assert ours.encode_dialog(DIALOGS[name], add_generation_prompt=False) == expected[:-len(header)]


@pytest.mark.parametrize("fmt", ["json", "function_tag", "python_list"])
def test_custom_tool_call_formats_match_reference(formats, llama3, fmt):
    _, ref = formats["llama3"]
    ours = Llama3ChatFormat(llama3, tool_prompt_format=fmt)
    dialog = DIALOGS["custom_tool"]
    assert ours.encode_dialog(dialog) == ref.encode_dialog_prompt(to_raw(dialog), ToolPromptFormat(fmt)).tokens


def test_explicit_stop_reason_wins_for_llama3(formats, llama3):
    _, ref = formats["llama3"]
    dialog = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "", "stop_reason": "end_of_turn", "tool_calls": [
                  {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "q"}}}]}]
    assert llama3.chat.encode_dialog(dialog) == ref.encode_dialog_prompt(to_raw(dialog)).tokens
    assert llama3.chat.encode_dialog(dialog)[-len(llama3.chat.header("assistant")) - 1] == llama3.token_to_id("<|eot_id|>")


# ---- tool system prompts against the documents llama-models ships ---------------------------

def _doc_dialogs(path: Path, header=("<|start_header_id|>", "<|end_header_id|>"), eot="<|eot_id|>"):
    """The (role, content) messages of every "Input Prompt Format" block of a prompt_format.md."""
    text = path.read_text(encoding="utf-8")
    blocks = re.findall(r"##### Input Prompt Format\n```\n(.*?)```", text, re.S)
    pat = re.compile(re.escape(header[0]) + r"(\w+)" + re.escape(header[1]) + r"\n\n(.*?)" + re.escape(eot), re.S)
    return [pat.findall(b) for b in blocks]


def _find(dialogs, needle):
    return next(d for d in dialogs if any(needle in content for _, content in d))


TRENDING_SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "int", "description": "The number of songs to return"},
        "genre": {"type": "str", "description": "The genre of the songs to return"}}}}}


@pytest.mark.parametrize("case", ["builtin", "json_custom", "code_interpreter_3_2"])
def test_llama31_tool_prompts_match_meta_docs(formats, llama3, case):
    _, ref = formats["llama3"]
    if case == "builtin":
        doc = _find(_doc_dialogs(DOCS / "llama3_1" / "prompt_format.md"), "Tools: brave_search, wolfram_alpha\nCutting")
        tools, today, system = ["brave_search", "wolfram_alpha"], date(2024, 9, 21), "You are a helpful assistant."
    elif case == "json_custom":
        doc = _find(_doc_dialogs(DOCS / "llama3_1" / "prompt_format.md"), "Return function calls in JSON format.")
        tools, today, system = [TRENDING_SONGS], date(2024, 9, 21), "You are a helpful assistant."
    else:
        doc = _find(_doc_dialogs(DOCS / "llama3_2" / "text_prompt_format.md"), "Today Date: 24 September 2024")
        tools, today, system = ["code_interpreter"], date(2024, 9, 24), None
    user = doc[-1][1]
    dialog = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    ours = Llama3ChatFormat(llama3, today=today)
    expected = ref.encode_dialog_prompt([RawMessage(role=r, content=c) for r, c in doc]).tokens
    assert ours.encode_dialog(dialog, tools=tools) == expected


def test_llama4_tool_prompt_matches_meta_doc(llama4, formats):
    _, ref = formats["llama4"]
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get weather info for places",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "The name of the city to get the weather for"},
            "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                       "default": "celsius"}}}}}
    # The system message of "Zero shot function calling - system message" in Llama 4's prompt_format.md.
    system = (DATA / "llama4_tools_system_prompt.txt").read_text(encoding="utf-8")
    dialog = [{"role": "user", "content": "What is the weather in SF and Seattle?"}]
    expected = ref.encode_dialog_prompt(
        [RawMessage(role="system", content=system), RawMessage(role="user", content=dialog[0]["content"])]).tokens
    assert llama4.chat.encode_dialog(dialog, tools=[weather]) == expected


# ---- decoding replies -------------------------------------------------------------------------

REPLIES = [
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    "<|python_tag|>def f(n):\n    return n\n\nprint(f(7))<|eom_id|>",
    '{"type": "function", "name": "get_weather", "parameters": {"city": "SF"}}<|eot_id|>',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    '[get_weather(city="San Francisco", metric="celsius")]<|eot_id|>',
    "Just text, 中文 😀.<|eot_id|>",
    "Cut off mid-sent",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_decode_assistant_matches_reference(formats, llama3, reply):
    _, ref = formats["llama3"]
    ids = llama3.encode(reply, allow_special=True)
    ours = llama3.chat.decode_assistant(ids)
    theirs = ref.decode_assistant_message(ids, StopReason.out_of_tokens)
    assert ours["stop_reason"] == theirs.stop_reason.value
    assert ours["content"] == theirs.content
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in ours.get("tool_calls", [])]
    want = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in theirs.tool_calls]
    assert got == want


def test_decode_assistant_llama4(llama4):
    ids = llama4.encode('<|python_start|>[get_weather(city="SF")]<|python_end|><|eom|>', allow_special=True)
    msg = llama4.chat.decode_assistant(ids)
    assert msg["stop_reason"] == "end_of_message"
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "SF"}}


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ("not a list", "must be a list"),
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user"}], "missing 'content'"),
    (["hello"], "must be a dict"),
    ([{"role": "user", "content": 3}], "content"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "unsupported content part"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "brave_search", "arguments": {}}}]}], "query"),
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}], "only assistant"),
])
def test_bad_dialogs_raise_herd_error(llama3, llama4, bad, match):
    for fmt in (llama3.chat, llama4.chat):
        with pytest.raises(HerdError, match=match) as info:
            fmt.encode_dialog(bad)
        assert "\n" not in str(info.value)


def test_bad_tools_and_formats_raise_herd_error(llama3):
    with pytest.raises(HerdError, match="not a builtin tool"):
        llama3.chat.encode_dialog([{"role": "user", "content": "x"}], tools=["teleport"])
    with pytest.raises(HerdError, match="tool prompt format"):
        Llama3ChatFormat(llama3, tool_prompt_format="yaml")
    with pytest.raises(HerdError, match="lacks"):
        Llama4ChatFormat(llama3)
