"""load_tokenizer / tokenizer_from_gguf_metadata: every accepted spec, and clear errors for the rest."""

from __future__ import annotations

import pytest

from herd.errors import HerdError
from herd.tokenizer import (
    HFTokenizer,
    Llama3ChatFormat,
    Llama4ChatFormat,
    TemplateChatFormat,
    TiktokenTokenizer,
    load_tokenizer,
    tokenizer_from_gguf_metadata,
)


def test_named_tokenizers(llama3, llama4):
    assert isinstance(llama3, TiktokenTokenizer) and isinstance(llama3.chat, Llama3ChatFormat)
    assert isinstance(llama4, TiktokenTokenizer) and isinstance(llama4.chat, Llama4ChatFormat)


def test_gguf_file_and_metadata(smollm2_gguf, smollm2):
    assert isinstance(smollm2, HFTokenizer) and isinstance(smollm2.chat, TemplateChatFormat)
    assert tokenizer_from_gguf_metadata({"general.architecture": "llama"}) is None


@pytest.mark.parametrize("spec, match", [
    ("llama5", "unknown tokenizer 'llama5'.*\"llama3\", \"llama4\""),
    ("/no/such/tokenizer.model", "not a file or directory"),
])
def test_unknown_specs(spec, match):
    with pytest.raises(HerdError, match=match):
        load_tokenizer(spec)


def test_bad_files(tmp_path):
    with pytest.raises(HerdError, match="no tokenizer.model, tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HerdError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    bad_gguf = tmp_path / "x.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    with pytest.raises(HerdError):
        load_tokenizer(bad_gguf)
    binary = tmp_path / "tokenizer.model"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HerdError, match="cannot read"):
        load_tokenizer(binary)


def test_bad_encode_decode_input(llama3, smollm2):
    for tok in (llama3, smollm2):
        with pytest.raises(HerdError, match="takes a str"):
            tok.encode(b"bytes")
        with pytest.raises(HerdError, match="ids"):
            tok.decode([tok.vocab_size + 5])
        with pytest.raises(HerdError):
            tok.save("/tmp/unused", layout="onnx")


def test_template_errors_are_herd_errors(smollm2):
    adding = TemplateChatFormat(smollm2, "{{ messages[0].content + 1 }}")  # str + int: a TypeError inside
    with pytest.raises(HerdError, match="cannot render"):
        adding.encode_dialog([{"role": "user", "content": "x"}])
    with pytest.raises(HerdError, match="does not compile"):
        TemplateChatFormat(smollm2, "{% for %}")
    raising = TemplateChatFormat(smollm2, "{{ raise_exception('no system role allowed') }}")
    with pytest.raises(HerdError, match="no system role allowed"):
        raising.encode_dialog([{"role": "user", "content": "x"}])


def test_sentencepiece_model_gives_way_to_tokenizer_json(tmp_path, smollm2):
    smollm2.save(tmp_path, "hf")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b\x80\xff sentencepiece protobuf")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.encode("hello 12") == smollm2.encode("hello 12")


def test_either_file_of_an_hf_pair_names_its_directory(tmp_path, smollm2):
    """`--tokenizer dir/tokenizer_config.json` was read as a tiktoken file ("not a tiktoken line")."""
    smollm2.save(tmp_path, "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        tok = load_tokenizer(tmp_path / name)
        assert tok.encode("hello 12 <|im_end|>") == smollm2.encode("hello 12 <|im_end|>")
        assert tok.chat is not None


@pytest.mark.parametrize("file, key, value", [
    ("tokenizer_config.json", "eos_token", 5),
    ("tokenizer_config.json", "bos_token", ["<|im_start|>"]),
    ("tokenizer_config.json", "pad_token", {"content": 3}),
    ("generation_config.json", "eos_token_id", "2"),
    ("generation_config.json", "eos_token_id", [2, None]),
    ("generation_config.json", "eos_token_id", True),
])
def test_wrongly_typed_special_tokens_are_one_line_errors(tmp_path, smollm2, file, key, value):
    """`"eos_token": 5` in tokenizer_config.json was a TypeError traceback from tokenizers."""
    import json
    smollm2.save(tmp_path, "hf")
    path = tmp_path / file
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, key: value}))
    with pytest.raises(HerdError, match=f"{file}: {key} must be") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_generation_config_eos_ids_are_stop_ids(tmp_path, smollm2):
    import json
    smollm2.save(tmp_path, "hf")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert {2, 7} <= load_tokenizer(tmp_path).stop_ids
