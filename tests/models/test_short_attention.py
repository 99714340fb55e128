"""Short-sequence CPU attention (herd/models/short_attention.py) against torch's
`scaled_dot_product_attention`: outputs and all three gradients, causal and document-masked."""

import pytest
import torch
import torch.nn.functional as F

from herd.models import short_attention
from herd.models.llama3 import attend
from herd.train.objectives import document_mask


def _qkv(B, H, K, T, d, seed):
    g = torch.Generator().manual_seed(seed)
    # q as the model makes it: a (B, H, T, d) view of a (B, T, H, d) tensor
    q = torch.randn(B, T, H, d, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, K, T, d, generator=g).requires_grad_()
    v = torch.randn(B, K, T, d, generator=g).requires_grad_()
    return q, k, v, torch.randn(B, H, T, d, generator=g)


@pytest.mark.parametrize("B,H,K,T,d,masked", [
    (2, 8, 4, 256, 32, False), (2, 8, 4, 256, 32, True), (1, 4, 4, 100, 16, False),
    (3, 6, 2, 200, 64, True), (2, 8, 1, 65, 32, False), (1, 2, 2, 1, 8, False), (1, 4, 2, 512, 128, True),
])
def test_matches_sdpa(B, H, K, T, d, masked):
    q, k, v, grad_out = _qkv(B, H, K, T, d, seed=T * d + masked)
    mask = None
    if masked:  # documents of random lengths, as packing makes them
        doc_ids = torch.cumsum(torch.rand(B, T, generator=torch.Generator().manual_seed(T)) < 0.03, 1)
        mask = document_mask(doc_ids)
        assert short_attention.mask_is_causal(mask)
    results = []
    for fn in (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                      enable_gqa=H != K),
               lambda: short_attention.causal_attention(q, k, v, mask)):
        q.grad = k.grad = v.grad = None
        out = fn()
        out.backward(grad_out)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for ref, ours in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)


def test_attend_dispatch():
    q, k, v, _ = _qkv(1, 4, 2, 16, 8, seed=1)
    assert short_attention.applies(q, k)
    assert not short_attention.applies(q.double(), k.double())
    long_q = torch.zeros(1, 1, short_attention.MAX_LEN + 1, 8)
    assert not short_attention.applies(long_q, long_q)
    # a mask that looks ahead (e.g. a bidirectional prefix) is not causal: attend takes the fused kernel
    # and must still give the masked attention exactly
    prefix = torch.ones(16, 16, dtype=torch.bool).tril()
    prefix[:4, :4] = True
    mask = prefix[None, None]
    assert not short_attention.mask_is_causal(mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, mask), ref)
    # an empty row (a query that may attend nothing) would be NaN in a softmax: not served here
    empty = torch.ones(16, 16, dtype=torch.bool).tril()
    empty[3] = False
    assert not short_attention.mask_is_causal(empty[None, None])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_under_activation_checkpointing(mode):
    # selective checkpointing caches the batched products' outputs and refuses them changed in place
    from herd.models.args import ModelArgs
    from herd.models.llama3 import Transformer
    from herd.train.parallel import apply_activation_checkpointing

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=80)
    tokens = torch.randint(0, 96, (2, 80), generator=torch.Generator().manual_seed(0))
    grads = []
    for ac in ("none", mode):
        torch.manual_seed(0)
        model = Transformer(args)
        model.init_weights()
        apply_activation_checkpointing(model, ac)
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
