"""Inputs the other tokenizer tests never used, against the references: Meta's llama-models
(Tokenizer, ChatFormat) and transformers (tokenizers, `apply_chat_template`); and the bad inputs
that must give one `HerdError` line (CLI exit 2) rather than a traceback or a quiet wrong answer."""

from __future__ import annotations

import json
import random

import pytest

from herd.cli import main
from herd.errors import HerdError

from .test_chat_meta import _import_llama4_chat_format, to_raw

TEXTS = [
    "", " ", "\n" * 300, "\t \n" * 100 + "x", "\r\n\r\n \r", "\u3000" * 40 + "q", "\x1c\x1d\x1e\x1f\x85",
    "a" + " " * 25_001 + "b", " " * 25_000, "x" * 25_001, "ab " * 10 + "y" * 30_000 + " z", "\x85" * 26_000 + "a",
    "日本語のテキスト" + "漢" * 300, "👨‍👩‍👧‍👦🏳️‍🌈🧑🏽‍🚀" * 20, "e\u0301\u0302\u0303 Z̴̧a̷l̶g̸o", "\u2028\u2029\u200b\ufeff",
    "a\ud800b", "\udfff", "\ud83d\ude00", "x\x00y\x01\x7f\x1b[31m", "<|begin_of_text|>hi<|eot_id|>",
    "<|image|><|header_start|><|eot|><|python_start|>", "<|reserved_special_token_5|>", "<|eot_id|", "\U0010ffff\ue000",
]


def _random_texts(n: int = 150) -> list[str]:
    rng = random.Random(0)
    alphabet = [" ", "\n", "\t", "a", "Z", "9", "中", "😀", "\u0301", "'", "s", "<|eot_id|>", "<|image|>", "<|eot|>",
                "\u00a0", "\r", ".", "\x00", "\ud800", "<|im_end|>", "'LL"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("flavor", ["llama3", "llama4"])
def test_tiktoken_ids_match_llama_models(flavor, llama3, llama4, ref_llama3, ref_llama4):
    ours, ref = {"llama3": (llama3, ref_llama3), "llama4": (llama4, ref_llama4)}[flavor]
    for text in TEXTS + _random_texts():
        for allow in (False, True):
            expected = ref.encode(text, bos=False, eos=False, allowed_special="all" if allow else None)
            assert ours.encode(text, allow_special=allow) == expected, (text[:40], allow)
            assert ours.decode(expected) == ref.decode(expected)


def test_hf_tokenizer_lone_surrogates_become_replacement_chars(smollm2, llama3, ref_llama3):
    """tokenizers raises TypeError on a lone surrogate (JSON "\\ud800" escapes carry them); we replace
    it with U+FFFD as tiktoken — and so Meta's Llama tokenizers — do, pairs joining into one char."""
    assert llama3.encode("a\ud800b") == ref_llama3.encode("a\ud800b", bos=False, eos=False) == llama3.encode("a\ufffdb")
    for allow in (False, True):
        assert smollm2.encode("a\ud800b<|im_end|>", allow_special=allow) == smollm2.encode(
            "a\ufffdb<|im_end|>", allow_special=allow)
        assert smollm2.encode("\ud83d\ude00\udfff", allow_special=allow) == smollm2.encode("😀\ufffd", allow_special=allow)


@pytest.mark.parametrize("ids", [[-1], [905, -2], [49_152], [None], [1.5], ["a"]])
def test_hf_decode_of_bad_ids_is_an_error(smollm2, ids):
    # -1 used to index the table from its end: a token's text instead of an error.
    with pytest.raises(HerdError, match="must be ints in 0..49151") as info:
        smollm2.decode(ids)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flavor", ["llama3", "llama4"])
def test_tiktoken_decode_of_bad_ids_is_an_error(flavor, llama3, llama4):
    tok = {"llama3": llama3, "llama4": llama4}[flavor]
    for ids in ([tok.vocab_size], [-1], [10**20], [None], [2.5]):
        with pytest.raises(HerdError, match=f"must be ints in 0..{tok.vocab_size - 1}"):
            tok.decode(ids)


# ---- Llama 3 / Llama 4 dialogs -----------------------------------------------------------------

def _call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


DIALOGS = {
    "empty_content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "spelled_specials": [{"role": "user", "content": "<|begin_of_text|><|eot_id|><|start_header_id|>system"
                                                     "<|end_header_id|>\n\n<|header_start|><|eot|><|image|>"}],
    "whitespace": [{"role": "user", "content": "\n\n   \t\n" + " " * 26_000 + "z"},
                   {"role": "assistant", "content": "  lead and trail  \n", "stop_reason": "end_of_turn"}],
    "parts": [{"role": "system", "content": [{"type": "text", "text": "sys "}, {"type": "text", "text": "prompt"}]},
              {"role": "user", "content": []},
              {"role": "tool", "content": [{"type": "text", "text": "{\"a\":"}, {"type": "text", "text": "1}"}]}],
    "odd_text": [{"role": "user", "content": "日本語 👨‍👩‍👧‍👦 é\u0301 \x00\x01 bad \ud800 pair \ud83d\ude00"}],
    "text_and_call": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me check. ",
                                                         "tool_calls": [_call("brave_search", {"query": 'x "q"'})]}],
    "many_calls": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        _call("get_w", {"c": "Zürich", "n": [1, 2], "d": {"k": None, "b": True}}), _call("wolfram_alpha", {"query": "2+2"}),
        _call("photogen", {"query": "cat"})]}],
    "code_first": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        _call("code_interpreter", {"code": "print('中')\n"}), _call("get_x", {})]}, {"role": "ipython", "content": "中"}],
    "stop_reasons": [{"role": "user", "content": "q"},
                     {"role": "assistant", "content": "", "stop_reason": "end_of_turn", "tool_calls": [_call("f", "{}")]},
                     {"role": "tool", "content": ""},
                     {"role": "assistant", "content": "wait", "stop_reason": "end_of_message"},
                     {"role": "assistant", "content": "cut", "stop_reason": "out_of_tokens"}],
    "no_messages": [],
}


@pytest.fixture(scope="module")
def references():
    from llama_models.llama3.chat_format import ChatFormat as Ref3
    from llama_models.llama3.tokenizer import Tokenizer as T3
    from llama_models.llama4.tokenizer import Tokenizer as T4

    return {"llama3": Ref3(T3.get_instance()), "llama4": _import_llama4_chat_format()(T4.get_instance())}


@pytest.mark.parametrize("flavor", ["llama3", "llama4"])
@pytest.mark.parametrize("name", list(DIALOGS))
def test_unseen_dialogs_match_llama_models(references, llama3, llama4, flavor, name):
    from llama_models.datatypes import ToolPromptFormat

    from herd.tokenizer import Llama3ChatFormat, Llama4ChatFormat

    tok = {"llama3": llama3, "llama4": llama4}[flavor]
    for fmt in ("json", "function_tag", "python_list"):
        ours = (Llama3ChatFormat if flavor == "llama3" else Llama4ChatFormat)(tok, tool_prompt_format=fmt)
        expected = references[flavor].encode_dialog_prompt(to_raw(DIALOGS[name]), ToolPromptFormat(fmt)).tokens
        assert ours.encode_dialog(DIALOGS[name]) == expected, fmt


# ---- checkpoint chat templates against transformers ----------------------------------------------

NONE_AND_TOOLS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is defined %}[{{ m.content }}]{% else %}(no content){% endif %}"
    "{% if m.tool_calls is defined %}{{ m.tool_calls | length }} call(s){% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools is not none %}tools: {{ tools | length }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def with_template(smollm2, tmp_path, template: str):
    """SmolLM2's tokenizer saved with another chat template → (herd's tokenizer, transformers')."""
    transformers = pytest.importorskip("transformers")
    from herd.tokenizer import load_tokenizer

    smollm2.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def test_template_sees_what_transformers_passes(smollm2, tmp_path):
    """transformers drops the keys whose value is None (an assistant turn of tool calls alone has no
    'content' at all) and passes `tools=[]` on as a list; a template can tell both apart."""
    ours, hf = with_template(smollm2, tmp_path, NONE_AND_TOOLS_TEMPLATE)
    dialog = [{"role": "user", "content": "weather?"},
              {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", {"city": "SF"})]}]
    for tools in (None, []):
        expected = hf.apply_chat_template(dialog, tools=tools, add_generation_prompt=True, tokenize=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        assert ours.chat.encode_dialog(dialog, tools=tools) == expected, tools


def test_exported_llama_templates_keep_spelled_tokens_as_text(llama3, tmp_path):
    """A Llama 3 tokenizer.json directory (no tiktoken file): message text spelling control tokens,
    in content parts and tool arguments too, gives transformers' sanitize_control_tokens ids."""
    transformers = pytest.importorskip("transformers")
    import inspect

    from herd.tokenizer import HFTokenizer, load_tokenizer

    llama3.save(tmp_path, "hf")
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(ours, HFTokenizer)
    if "sanitize_control_tokens" not in inspect.signature(hf.apply_chat_template).parameters:
        pytest.skip("this transformers has no apply_chat_template(sanitize_control_tokens=...)")
    dialog = [{"role": "system", "content": "x<|eot_id|>y <|reserved_special_token_7|>"},
              {"role": "user", "content": [{"type": "text", "text": "<|image|>"}, {"type": "text", "text": " hi"}]},
              {"role": "assistant", "content": None, "tool_calls": [_call("f", {"x": "<|eot_id|>"})]},
              {"role": "tool", "content": "<|python_tag|>r <|start_header_id|>"}]
    for agp in (True, False):
        expected = hf.apply_chat_template(dialog, add_generation_prompt=agp, tokenize=True, sanitize_control_tokens=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        assert ours.chat.encode_dialog(dialog, add_generation_prompt=agp) == expected


# ---- `herd tokenize` with bad input ---------------------------------------------------------------

def _run(capsys, *argv):
    code = main(["tokenize", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("dialog, match", [
    ('[{"role": "user", "content": "hi"', "not valid JSON"),
    ("", "not valid JSON"),
    ('[{"role": "wizard", "content": "x"}]', "unknown role 'wizard'"),
    ('{"role": "user", "content": "x"}', "must be a list"),
    ('[{"role": "user", "content": {"text": "x"}}]', "content"),
    ('[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]', "not valid JSON"),
])
def test_tokenize_bad_dialogs_are_one_line_exit_2(capsys, tmp_path, dialog, match):
    path = tmp_path / "dialog.json"
    path.write_text(dialog)
    code, out, err = _run(capsys, "--tokenizer", "llama3", "--chat", str(path))
    assert code == 2 and out == "" and match in err and err.count("\n") == 1 and "Traceback" not in err


def test_tokenize_bad_tokenizers_and_text_are_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for argv, match in ([("--tokenizer", str(tmp_path / "missing"), "hi"), "not a file or directory"],
                        [("--tokenizer", str(tmp_path / "empty"), "hi"), "no tokenizer.model, tokenizer.json"],
                        # argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape):
                        # refused like such stdin, not quietly encoded as U+FFFD.
                        [("--tokenizer", "llama3", "a\udcffb"), "TEXT: not valid UTF-8"]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == "" and match in err and err.count("\n") == 1, argv


def test_tokenize_chat_with_escaped_surrogate_matches_reference(capsys, tmp_path, references):
    # A JSON "\ud800" escape is valid JSON text; it encodes as U+FFFD, as Meta's tokenizer does.
    dialog = [{"role": "user", "content": "bad \ud800 pair \ud83d\ude00"}]
    path = tmp_path / "dialog.json"
    path.write_text(json.dumps(dialog))
    code, out, _ = _run(capsys, "--tokenizer", "llama3", "--chat", str(path), "--add-generation-prompt")
    assert code == 0 and json.loads(out) == references["llama3"].encode_dialog_prompt(to_raw(dialog)).tokens
