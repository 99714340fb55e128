"""A checkpoint converted to HF generates in transformers as it does in herd (`herd generate`
greedy = transformers' greedy `generate`). config.json said no special-token ids and there was no
generation_config.json, so transformers used LlamaConfig's defaults (bos 1, eos 2): it stopped on
whatever token 2 is and ran on past end of text / end of turn, and it picked the reserved special
tokens herd never samples. Each model here always predicts one token, so the stop and suppression
rules alone decide what comes out."""

from __future__ import annotations

import json

import pytest
import torch

from herd.api import stream
from herd.checkpoint import convert, write_checkpoint
from herd.inference.generate import Completion
from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer
from herd.tokenizer import load_tokenizer
from herd.tokenizer.train import write_tiktoken_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Llama 3's special tokens over the 256 byte tokens: 512 ids, 246 of them reserved."""
    d = tmp_path_factory.mktemp("tok")
    write_tiktoken_model({bytes([i]): i for i in range(256)}, d / "tokenizer.model")
    return load_tokenizer(d)


def _always(args: ModelArgs, token: int) -> dict[str, torch.Tensor]:
    """Weights whose logits are `dim` for `token` and 0 elsewhere at every position: all-ones
    embeddings pass the zeroed blocks unchanged, the final norm keeps ones, one output row is ones."""
    with torch.device("meta"):
        model = Transformer(args)
    sd = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    for k in sd:
        if k == "tok_embeddings.weight" or k.endswith("norm.weight"):
            sd[k].fill_(1.0)
    sd["output.weight"][token] = 1.0
    return sd


def test_converted_checkpoint_generates_as_herd_does(tokenizer, tmp_path):
    import herd

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.vocab_size,
                     multiple_of=32, max_seq_len=64)
    reserved = tokenizer.special_tokens["<|reserved_special_token_5|>"]
    cases = {"eos": tokenizer.eos_id, "eot": tokenizer.special_tokens["<|eot_id|>"],
             "byte 2": 2, "reserved": reserved}
    for name, token in cases.items():
        meta, hf = tmp_path / f"meta-{token}", tmp_path / f"hf-{token}"
        write_checkpoint(meta, "meta", args, _always(args, token), tokenizer=tokenizer)
        convert(meta, hf, "hf")
        model, tok = herd.load(meta, for_inference=False)
        done = Completion()
        for _ in stream(model, tok, "ab", max_new_tokens=4, completion=done):
            pass
        ours = done.ids + ([done.stop_token] if done.stop_token is not None else [])
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        prompt = torch.tensor([tok.encode("ab", bos=True)])
        with torch.no_grad():
            theirs = ref.generate(prompt, max_new_tokens=4, do_sample=False)[0, prompt.shape[1]:].tolist()
        assert theirs == ours, (name, theirs, ours)
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tokenizer.eos_id and set(gen["eos_token_id"]) == tokenizer.stop_ids
    assert reserved in gen["suppress_tokens"] and tokenizer.eos_id not in gen["suppress_tokens"]
    assert json.loads((hf / "config.json").read_text())["bos_token_id"] == tokenizer.bos_id
