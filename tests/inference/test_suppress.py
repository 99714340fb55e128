"""Reserved special tokens are never generated through herd.generate / herd.stream: a model that
never saw them in training (any herd pre-training run) leaves their logits near zero, which can
outrank real tokens when sampling."""

from __future__ import annotations

import torch

import herd
from herd.api import reserved_ids
from herd.inference.sampling import SamplingParams, sample
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.tokenizer import load_tokenizer


def test_reserved_ids_are_the_reserved_specials_of_llama3():
    tok = load_tokenizer("llama3")
    ids = reserved_ids(tok)
    from llama_models.llama3.tokenizer import Tokenizer as Reference  # Meta's own

    ref = Reference.get_instance().special_tokens
    assert ids == tuple(sorted(i for name, i in ref.items() if name.startswith("<|reserved_special_token")))
    assert tok.eot_id not in ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert all("reserved" in tok.decode([i]) for i in ids)


def test_suppressed_ids_are_never_sampled_greedy_or_not():
    logits = torch.zeros(4, 10)
    logits[:, 3] = 50.0  # the suppressed id is by far the most likely
    params = SamplingParams(suppress=(3, 7))
    assert sample(logits, params).tolist() == [0, 0, 0, 0]  # the first of the remaining (equal) logits
    hot = SamplingParams(temperature=1.0, suppress=(3, 7))
    draws = sample(logits.repeat(250, 1), hot, torch.Generator().manual_seed(0))
    assert not set(draws.tolist()) & {3, 7}


def test_generate_never_emits_a_reserved_token():
    tok = load_tokenizer("llama3")
    torch.manual_seed(0)
    model = Transformer(get_preset("debug").replace(vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():  # make every reserved token the model's favourite
        model.output.weight[list(reserved_ids(tok))] *= 0
        model.output.weight[list(reserved_ids(tok))] += model.norm.weight * 5
    text = herd.generate(model, tok, "Hello", max_new_tokens=8, temperature=0.9, seed=1)
    ids = tok.encode(text, allow_special=True)
    assert not set(ids) & set(reserved_ids(tok)) and "reserved" not in text
