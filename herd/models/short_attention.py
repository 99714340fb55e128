"""Causal attention for short sequences on the CPU, as batched matrix products in causal blocks.

Why not `F.scaled_dot_product_attention`: its CPU kernel (flash attention) walks the sequence in
small tiles with a per-tile online softmax. With the head dimensions of small models (32–64) those
tiles' products are too thin to run near the machine's GEMM rate, and a training step of the `tiny`
preset (T = 256, d = 32) spent ~14 ms per layer in it, a sixth of the whole step
(bench/train_step.py). Here each block of queries is one batched product against the keys up to its
own end — blocks wholly above the diagonal are never computed, so the work is about half of the
full T×T square, as in flash attention — and the probabilities are kept for the backward pass. Those
are B·H·T²/2 numbers a layer, which is why this is only for short sequences (`applies`); long ones,
GPUs and decoding keep the fused kernel.

Grouped-query attention folds the G query heads that share a key/value head into the rows of one
product, so keys and values are read once per group and never repeated in memory.

Forward and backward are two custom operators (`torch.ops.herd.short_attention[_backward]`), so
`torch.compile` (`train.compile`) calls them as they are instead of tracing the block loop — which
Inductor turned into slower code than these aten calls — or falling back to the flash kernel.
Being opaque, they can also look at the mask's values: a mask that lets a query see a later key
(which no causal block skip may serve) makes every block read all keys.
"""

from __future__ import annotations

import torch

MAX_LEN = 512  # longest sequence served here; past it the saved probabilities (T² a head) cost too much
BLOCK = 64  # query rows per block: the causal skip is finer with smaller blocks, the products thinner


def applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this path serves q (B, H, T, d) against k (B, K, S, d): self-attention (T == S) of a
    short sequence in fp32 on the CPU, with or without a mask."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[2] == k.shape[2] <= MAX_LEN


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v for q (B, H, T, d), k and v (B, K, T, d), H a multiple of K.

    mask: None (plain causal), or boolean (B or 1, 1, T, T), True where a query may attend. A query
    with no key to attend gets zeros, as torch's SDPA gives it. Returns (B, H, T, d) as a view of a
    (B, T, H, d) tensor, so the caller's transpose back to (B, T, H·d) is free."""
    out, _, _ = torch.ops.herd.short_attention(q, k, v, mask)
    return out.transpose(1, 2)


def looks_ahead(mask: torch.Tensor) -> bool:
    """True if a boolean (…, T, T) mask lets some query attend a later key: the causal blocks would
    leave such a key out."""
    return bool(mask.triu(1).any())


_UPPER: dict[tuple[torch.dtype, int], torch.Tensor] = {}


def _upper(dtype: torch.dtype) -> torch.Tensor:
    """(BLOCK, BLOCK): -inf above the diagonal, 0 elsewhere — the diagonal block's causal mask,
    made once, not per call (never written: it is only added)."""
    key = (dtype, BLOCK)
    if key not in _UPPER:
        _UPPER[key] = torch.full((BLOCK, BLOCK), float("-inf"), dtype=dtype).triu(1)
    return _UPPER[key]


def _num_probs(T):
    """Σ over query blocks of rows × keys up to the block's end, in closed form, so the fake
    (shape-only) operator also works with a symbolic T."""
    n = T // BLOCK
    r = T - n * BLOCK
    return BLOCK * BLOCK * n * (n + 1) // 2 + r * T


class _Blocks:
    """The query blocks of one attention call and each block's scores and probabilities.

    Keys past a block's last query are masked for all of its queries and left out — unless the mask
    looks ahead (`looks_ahead`), when every block reads all T keys; its probabilities are then not
    kept but recomputed in the backward pass (the case is rare: a bidirectional prefix, say)."""

    def __init__(self, q, k, mask, ahead: bool | None = None):
        B, H, T, d = q.shape
        self.B, self.K, self.T, self.d = B, k.shape[1], T, d
        self.G = H // self.K
        self.scale = d ** -0.5
        # The queries scaled once, laid out (B, K, T, G, d): a block's rows — its queries, each with
        # the G heads of its group — are then one contiguous run per (b, k), so every block's
        # (B·K, rows·G, d) operand is a view, not a scaled copy per block.
        self.qs = q.new_empty(B, self.K, T, self.G, d)
        torch.mul(q.view(B, self.K, self.G, T, d).transpose(2, 3), self.scale, out=self.qs)
        self.kg = k.reshape(B * self.K, T, d)
        self.mask, self.ahead, self.empty = mask, False, None
        if mask is None:  # only a diagonal block has keys later than some of its queries
            self.upper = _upper(q.dtype)
        else:
            self.ahead = looks_ahead(mask) if ahead is None else ahead
            # (B or 1, 1, T, 1, T) against the scores' (B, K, rows, G, keys); an add of 0/-inf runs
            # ~2x faster than masked_fill_ with a broadcast boolean mask
            self.bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))[:, :, :, None]
            empty = ~mask.any(-1)  # queries with nothing to attend: a softmax row of -inf is NaN
            if bool(empty.any()):
                self.empty = empty[:, :, :, None, None]

    def __iter__(self):
        """(t0, t1, end): the block's queries t0..t1 and the keys 0..end they read."""
        for t0 in range(0, self.T, BLOCK):
            t1 = min(t0 + BLOCK, self.T)
            yield t0, t1, self.T if self.ahead else t1

    def queries(self, t0, t1):
        """The block's scaled queries, G heads folded into rows (query-major): (B·K, rows·G, d), a view."""
        return self.qs[:, :, t0:t1].view(self.B * self.K, (t1 - t0) * self.G, self.d)

    def probabilities(self, qi, t0, t1, end, out=None):
        s = torch.bmm(qi, self.kg[:, :end].transpose(1, 2))
        s5 = s.view(self.B, self.K, t1 - t0, self.G, end)
        if self.mask is None:
            s5[..., t0:].add_(self.upper[:t1 - t0, None, :t1 - t0])
        else:
            s5.add_(self.bias[:, :, t0:t1, :, :end])
        # into `out` (the kept probabilities' slice) when given, sparing a copy
        p = torch.softmax(s, -1) if out is None else torch.ops.aten._softmax.out(s, -1, False, out=out.view(s.shape))
        if self.empty is not None:
            p.view(s5.shape).masked_fill_(self.empty[:, :, t0:t1], 0.0)
        return p


@torch.library.custom_op("herd::short_attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ out (B, T, H, d), every block's probabilities, flat (B·H·`_num_probs(T)`), and whether
    the mask looked ahead (a boolean scalar, so the backward need not look at the mask again)."""
    B, H, T, d = q.shape
    blocks = _Blocks(q, k, mask)
    K, G = blocks.K, blocks.G
    vg = v.reshape(B * K, T, d)
    out = q.new_empty(B, T, K, G, d)
    probs = q.new_empty(B * H * _num_probs(T))
    if blocks.ahead:
        probs.zero_()  # not used (see `_Blocks`), but never uninitialised memory in an output
    at = 0
    for t0, t1, end in blocks:
        n = B * H * (t1 - t0) * end
        keep = None if blocks.ahead else probs[at:at + n]
        at += n
        p = blocks.probabilities(blocks.queries(t0, t1), t0, t1, end, keep)
        out[:, t0:t1] = torch.bmm(p, vg[:, :end]).view(B, K, t1 - t0, G, d).transpose(1, 2)
    return out.view(B, T, H, d), probs, torch.tensor(blocks.ahead)


@_attention.register_fake
def _(q, k, v, mask):
    B, H, T, d = q.shape
    return q.new_empty(B, T, H, d), q.new_empty(B * H * _num_probs(T)), q.new_empty((), dtype=torch.bool)


@torch.library.custom_op("herd::short_attention_backward", mutates_args=())
def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        probs: torch.Tensor, mask: torch.Tensor | None, ahead: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out (B, T, H, d) → dq (B, T, H, d), dk and dv (B, K, T, d)."""
    B, H, T, d = q.shape
    ahead = bool(ahead)
    blocks = _Blocks(q, k, mask if ahead else None, ahead)  # the mask only matters to recomputed probabilities
    K, G, kg = blocks.K, blocks.G, blocks.kg
    vg = v.reshape(B * K, T, d)
    go = grad_out.reshape(B, T, K, G, d)
    dq = q.new_empty(B, T, K, G, d)
    dk = torch.zeros_like(kg)
    dv = torch.zeros_like(vg)
    at = 0
    for t0, t1, end in blocks:
        n = G * (t1 - t0)
        qi = blocks.queries(t0, t1)
        if blocks.ahead:
            p = blocks.probabilities(qi, t0, t1, end)
        else:
            p = probs[at:at + B * K * n * end].view(B * K, n, end)
            at += p.numel()
        goi = go[:, t0:t1].transpose(1, 2).reshape(B * K, n, d)
        # (a product into a fresh tensor, then one add: baddbmm_ into a strided slice runs one
        # small GEMM per batch entry)
        dv[:, :end] += torch.bmm(p.transpose(1, 2), goi)
        # dS = P ∘ (dP − rowsum(dP ∘ P)), one fused pass; rowsum(dP ∘ P) = rowsum(dO ∘ O), the
        # flash-attention row term. Masked and empty entries have P = 0, so their dS is 0.
        ds = torch._softmax_backward_data(torch.bmm(goi, vg[:, :end].transpose(1, 2)), p, -1, p.dtype)
        torch.mul(torch.bmm(ds, kg[:, :end]).view(B, K, t1 - t0, G, d).transpose(1, 2),
                  blocks.scale, out=dq[:, t0:t1])
        dk[:, :end] += torch.bmm(ds.transpose(1, 2), qi)  # qi carries the scale already
    return dq.view(B, T, H, d), dk.view(B, K, T, d), dv.view(B, K, T, d)


@_attention_backward.register_fake
def _(grad_out, q, k, v, probs, mask, ahead):
    B, H, T, d = q.shape
    return q.new_empty(B, T, H, d), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask = inputs
    _, probs, ahead = output
    ctx.masked = mask is not None
    ctx.save_for_backward(q, k, v, probs, ahead, *([mask] if ctx.masked else []))
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the probabilities


def _backward(ctx, grad_out, _grad_probs, _grad_ahead):
    q, k, v, probs, ahead, *mask = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    dq, dk, dv = torch.ops.herd.short_attention_backward(grad_out, q, k, v, probs, mask[0] if mask else None, ahead)
    return dq.transpose(1, 2), dk, dv, None


_attention.register_autograd(_backward, setup_context=_setup_context)
