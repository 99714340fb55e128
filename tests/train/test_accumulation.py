"""Gradient accumulation: k micro-batches give the gradient of one k-times larger batch, also when
the micro-batches hold different numbers of loss terms (torchtune #2307's bug)."""

from __future__ import annotations

import copy

import torch

from herd.data.shards import PackedBatch, PackedLoader
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train.loop import accumulate_gradients
from herd.train.objectives import NextTokenLM


def test_k_micro_batches_equal_one_big_batch(shards):
    torch.manual_seed(0)
    model = Transformer(get_preset("debug").replace(vocab_size=258))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    other = copy.deepcopy(model)
    obj = NextTokenLM()
    loader = PackedLoader(shards, batch_size=2, seq_len=48, seed=3, vocab_size=258)
    micro = [loader.batch(i) for i in range(4)]
    terms = [obj.num_terms(b) for b in micro]
    assert len(set(terms)) > 1, "micro-batches should differ in loss terms to test normalization"
    big = PackedBatch(torch.cat([b.tokens for b in micro]), torch.cat([b.doc_ids for b in micro]))

    loss_k, n_k = accumulate_gradients(model, obj, micro)
    loss_1, n_1 = accumulate_gradients(other, obj, [big])
    assert n_k == n_1 == sum(terms)
    assert abs(float(loss_k) - float(loss_1)) <= 1e-6
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-6, name
