"""Loading and generating from checkpoint directories the way users have them: Meta and HF
layouts carrying the real Llama 3 tokenizer, and a directory with no tokenizer at all."""

from __future__ import annotations

import json

import pytest
import torch
from llama_models.datatypes import RawMessage
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

import herd
from herd.checkpoint import write_checkpoint
from herd.cli import main
from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer
from herd.tokenizer import load_tokenizer
from tests.reference import random_state_dict

# Llama 3's real vocabulary on a tiny body: the tokenizer and chat format are the real ones.
TINY_LLAMA3 = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                        max_seq_len=256)


@pytest.fixture(scope="module")
def tiny_weights():
    return random_state_dict(TINY_LLAMA3)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_llama3_directory_generates_with_reference_chat_format(fmt, tmp_path, tiny_weights, capsys):
    path = tmp_path / fmt
    write_checkpoint(path, fmt, TINY_LLAMA3, tiny_weights, tokenizer=load_tokenizer("llama3"))
    model, tokenizer = herd.load(path)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"}]
    ref = ChatFormat(MetaTokenizer.get_instance()).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in dialog])
    assert tokenizer.chat.encode_dialog(dialog) == ref.tokens
    assert tokenizer.stop_ids >= {128009, 128008, 128001}  # eot, eom, end_of_text
    with torch.no_grad():
        logits = model(torch.tensor([ref.tokens]))
    unpacked = Transformer(TINY_LLAMA3)
    unpacked.load_state_dict(tiny_weights)
    with torch.no_grad():
        assert (logits - unpacked(torch.tensor([ref.tokens]))).abs().max() <= 1e-4
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0


def test_directory_without_tokenizer_loads_with_a_warning(tmp_path, tiny_weights):
    write_checkpoint(tmp_path / "bare", "hf", TINY_LLAMA3, tiny_weights)
    with pytest.warns(UserWarning, match="without a tokenizer"):
        model, tokenizer = herd.load(tmp_path / "bare")
    assert tokenizer is None and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 128256)
    assert main(["generate", "--model", str(tmp_path / "bare"), "--prompt", "x"]) == 2


def test_broken_tokenizer_file_is_an_error_not_a_silent_none(tmp_path, tiny_weights):
    path = tmp_path / "broken"
    write_checkpoint(path, "hf", TINY_LLAMA3, tiny_weights)
    (path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(herd.HerdError):
        herd.load(path)


def test_llama4_hf_directory_loads_and_generates(tmp_path):
    from herd.models.llama4 import LLAMA4_PRESETS
    from herd.models.llama4 import Transformer as Llama4

    tokenizer = load_tokenizer("llama4")  # its ids are checked against llama-models in tests/tokenizer
    args = LLAMA4_PRESETS["llama4-debug"].replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    source = Llama4(args)
    source.init_weights()
    write_checkpoint(tmp_path / "l4", "hf", args, source.state_dict(), tokenizer=tokenizer)
    model, loaded = herd.load(tmp_path / "l4")
    assert isinstance(model, Llama4)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tokenizer.chat.encode_dialog(dialog)
    assert loaded.chat.encode_dialog(dialog) == ids  # the exported chat template reproduces the format
    with torch.no_grad():
        assert (model(torch.tensor([ids])) - source.eval()(torch.tensor([ids]))).abs().max() <= 1e-4
    assert main(["generate", "--model", str(tmp_path / "l4"), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
