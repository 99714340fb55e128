"""Generation on dense Llama checkpoints that transformers itself built and saved (`save_pretrained`
→ `herd.load`, packed CPU linears included), on config variants herd's own presets never have:
YaRN / linear / llama3 RoPE, attention and MLP biases, MQA and MHA, a head_dim that is not
hidden_size / heads, tied embeddings, an odd vocabulary. Greedy ids of a left-padded batch (one row
at the context limit) equal `LlamaForCausalLM.generate(do_sample=False)` one prompt at a time, and
seeded sampling (temperature, top-k, top-p) draws the same tokens as transformers' `do_sample`
after `torch.manual_seed(seed)`: the same filtered distribution and the same multinomial draws."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import herd
from herd.inference.generate import generate_batch
from herd.inference.sampling import SamplingParams

CONTEXT = 48
_BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=None, eos_token_id=None,
             pad_token_id=0)
CONFIGS = {
    "yarn-bias": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=12,
                                        attention_factor=0.9, beta_fast=16.0), attention_bias=True, mlp_bias=True),
    "linear-mqa-headdim": dict(rope_scaling=dict(rope_type="linear", factor=3.0), num_key_value_heads=1, head_dim=16),
    "llama3-mha-tied-oddvocab": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=12),
                                     num_key_value_heads=6, tie_word_embeddings=True, vocab_size=1031,
                                     rope_theta=777.0, rms_norm_eps=1e-2),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            ref = LlamaForCausalLM(LlamaConfig(**{**_BASE, **CONFIGS[name]}))
            with torch.no_grad():  # large weights: sharp logits, so no near-tie hides a difference
                for n, p in ref.named_parameters():
                    p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.3)
            ref.eval()
            path = tmp_path_factory.mktemp(name)
            ref.save_pretrained(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # no tokenizer files: ids in, ids out
                model, _ = herd.load(path)
            cache[name] = ref, model
        return cache[name]

    return get


def _prompts(vocab, lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf(ref, prompt, n, **kw):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_batch_equals_transformers(saved, name):
    ref, model = saved(name)
    prompts = _prompts(ref.config.vocab_size, (1, 9, CONTEXT - 3))  # the last has room for 3 tokens
    got = [c.ids for c in generate_batch(model, prompts, max_new_tokens=12)]
    assert [len(g) for g in got] == [12, 12, 3]  # each row runs to its own end of the context
    assert got == [_hf(ref, p, len(g), do_sample=False) for p, g in zip(prompts, got, strict=True)]
    assert len(set(got[0])) > 2  # not a degenerate repeat any model would give
    # transformers' RepetitionPenaltyLogitsProcessor over prompt + output (herd's repetition_penalty)
    sp = SamplingParams(repetition_penalty=2.5)
    pen = [c.ids for c in generate_batch(model, prompts, max_new_tokens=12, sampling=sp)]
    assert pen == [_hf(ref, p, len(g), do_sample=False, repetition_penalty=2.5) for p, g in zip(prompts, pen, strict=True)]
    if ref.config.vocab_size < 100:  # in a small vocabulary the greedy text repeats, so the penalty acts
        assert pen != got


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.5, top_p=0.6), dict(temperature=1.2, top_k=20, top_p=0.8),
                                dict(temperature=0.8, top_p=0.9, repetition_penalty=1.7)])
def test_seeded_sampling_draws_what_transformers_draws(saved, name, kw):
    ref, model = saved(name)
    prompt = _prompts(ref.config.vocab_size, (6,))[0]
    for seed in (3, 4):
        ours = generate_batch(model, [prompt], max_new_tokens=16, sampling=SamplingParams(seed=seed, **kw))[0].ids
        torch.manual_seed(seed)
        theirs = _hf(ref, prompt, 16, do_sample=True, temperature=kw["temperature"], top_k=kw.get("top_k", 0),
                     top_p=kw.get("top_p", 1.0), repetition_penalty=kw.get("repetition_penalty", 1.0))
        assert ours == theirs, seed
    other = generate_batch(model, [prompt], max_new_tokens=16, sampling=SamplingParams(seed=5, **kw))[0].ids
    assert other != ours  # the seed matters: the draws are not a greedy path in disguise
