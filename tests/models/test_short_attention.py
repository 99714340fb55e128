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


def _run(fn, q, k, v, grad_out):
    """fn() → (output, dq, dk, dv) for the output gradient grad_out."""
    q.grad = k.grad = v.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


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
        assert not short_attention.looks_ahead(mask)
    results = [_run(fn, q, k, v, grad_out) for fn in (
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != K),
        lambda: short_attention.causal_attention(q, k, v, mask))]
    for ref, ours in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)


def test_attend_dispatch():
    q, k, v, _ = _qkv(1, 4, 2, 16, 8, seed=1)
    assert short_attention.applies(q, k)
    assert not short_attention.applies(q.double(), k.double())
    long_q = torch.zeros(1, 1, short_attention.MAX_LEN + 1, 8)
    assert not short_attention.applies(long_q, long_q)


def _masks(T):
    # a mask that looks ahead (a bidirectional prefix): no causal block may skip its keys, so the
    # operator hands it to torch's fused kernel
    prefix = torch.ones(T, T, dtype=torch.bool).tril()
    prefix[:4, :4] = True
    # queries that may attend nothing (a padded row): zeros, as SDPA gives them, not a softmax's NaN
    empty = torch.ones(2, 1, T, T, dtype=torch.bool).tril()
    empty[0, 0, 3] = False
    empty[1, 0, T - 5:] = False
    return {"prefix": prefix[None, None], "empty rows": empty}


@pytest.mark.parametrize("kind", ["prefix", "empty rows"])
@pytest.mark.parametrize("T", [16, 130])
def test_other_masks_match_sdpa(kind, T):
    mask = _masks(T)[kind]
    assert short_attention.looks_ahead(mask) == (kind == "prefix")
    q, k, v, grad_out = _qkv(2, 4, 2, T, 8, seed=T)
    results = [_run(fn, q, k, v, grad_out) for fn in (
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        lambda: attend(q, k, v, mask))]
    for ref, ours in zip(*results, strict=True):
        assert ours.isfinite().all()
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_under_compile(masked):
    # torch.compile calls the two operators as they are (no graph break, no fallback to the flash
    # kernel), with the same numbers as eager; T changes between calls, so the fake operators must
    # follow a symbolic T
    compiled = torch.compile(short_attention.causal_attention, fullgraph=True)
    for T in (64, 100, 37):
        q, k, v, grad_out = _qkv(2, 4, 2, T, 16, seed=T)
        mask = None
        if masked:
            doc_ids = torch.cumsum(torch.rand(2, T, generator=torch.Generator().manual_seed(T)) < 0.1, 1)
            mask = document_mask(doc_ids)
        results = [_run(lambda f=f, q=q, k=k, v=v, mask=mask: f(q, k, v, mask), q, k, v, grad_out)
                   for f in (short_attention.causal_attention, compiled)]
        for ref, ours in zip(*results, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_operator_contract():
    # torch.library's own checks: fake shapes and strides match the real ones, autograd registration,
    # no aliasing of inputs (opcheck)
    q, k, v, _ = _qkv(2, 4, 2, 70, 8, seed=3)
    mask = document_mask(torch.cumsum(torch.rand(2, 70, generator=torch.Generator().manual_seed(0)) < 0.1, 1))
    for m in (None, mask, _masks(70)["prefix"]):
        torch.library.opcheck(torch.ops.herd.short_attention.default, (q, k, v, m))


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
