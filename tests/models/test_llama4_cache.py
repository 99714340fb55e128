"""Llama 4's chunked KV cache: the chunked-attention (RoPE) layers keep only their chunk, the NoPE
layers the full context, and decoding through it equals the full forward (issue 6)."""

from __future__ import annotations

import pytest
import torch

from herd.inference.generate import generate_batch
from herd.inference.kv_cache import ChunkedKVCache, KVCache, new_cache
from herd.models.llama4 import Llama4Args, Transformer

ARGS = Llama4Args(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=320, n_experts=4,
                  moe_ffn_dim=32, ffn_hidden_dim=48, max_seq_len=256, moe_every=2, attention_chunk_size=5,
                  floor_scale=4.0)


def model_for(args: Llama4Args) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights(std=0.3)
    return m.eval()


@pytest.mark.parametrize("prefill", [1, 3, 7, 12])
def test_decoding_past_chunk_boundaries_equals_full_forward(prefill):
    model = model_for(ARGS)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 31))  # six chunks of 5
    with torch.no_grad():
        full = model(tokens)
        cache = ChunkedKVCache(ARGS, batch_size=2, max_len=31)
        pieces = [model(tokens[:, :prefill], cache=cache)]
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(prefill, 31)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4
    # chunked layers hold chunk - 1 positions; the NoPE layer (index 3) holds all 31
    assert cache.local_k.shape[0] == 3 and cache.local_k.shape[3] == ARGS.attention_chunk_size - 1
    assert cache.k.shape[0] == 1 and cache.k.shape[3] == 31


def test_multi_token_steps_and_memory():
    model = model_for(ARGS)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = ChunkedKVCache(ARGS, batch_size=1, max_len=40)
        pieces = [model(tokens[:, a:b], cache=cache) for a, b in [(0, 6), (6, 9), (9, 10), (10, 23), (23, 40)]]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4
    assert cache.nbytes < KVCache(ARGS, 1, 40).nbytes / 2


def test_generation_uses_the_chunked_cache_and_left_padding_is_exact():
    model = model_for(ARGS)
    assert isinstance(new_cache(ARGS, 1, 8), ChunkedKVCache)
    assert isinstance(new_cache(ARGS.replace(attention_chunk_size=None), 1, 8), KVCache)
    prompts = [[5, 17, 99, 3, 250, 1, 7, 64, 12, 200, 33, 4], [8, 9, 10]]
    together = [c.ids for c in generate_batch(model, prompts, max_new_tokens=9)]
    alone = [generate_batch(model, [p], max_new_tokens=9)[0].ids for p in prompts]
    assert together == alone
    for p, ids in zip(prompts, alone, strict=True):  # greedy: each token is the full forward's argmax
        with torch.no_grad():
            logits = model(torch.tensor([p + ids]))[0, len(p) - 1:-1]
        assert logits.argmax(-1).tolist() == ids
