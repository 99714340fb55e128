"""Causal attention for short sequences on the CPU, as batched matrix products in causal blocks.

Why not `F.scaled_dot_product_attention`: its CPU kernel (flash attention) walks the sequence in
small tiles with a per-tile online softmax. With the head dimensions of small models (32–64) those
tiles' products are too thin to run near the machine's GEMM rate, and a training step of the `tiny`
preset (T = 256, d = 32) spent ~17 ms per layer in it, a fifth of the whole step
(bench/train_step.py). Here each block of queries is one batched product against the keys up to its
own end — blocks wholly above the diagonal are never computed, so the work is about half of the
full T×T square, as in flash attention — and the probabilities are kept for the backward pass. Those
are B·H·T²/2 numbers a layer, which is why this is only for short sequences (`applies`); long ones,
GPUs and decoding keep the fused kernel.

Grouped-query attention folds the G query heads that share a key/value head into the rows of one
product, so keys and values are read once per group and never repeated in memory.
"""

from __future__ import annotations

import torch

MAX_LEN = 512  # longest sequence served here; past it the saved probabilities (T² a head) cost too much
BLOCK = 64  # query rows per block: the causal skip is finer with smaller blocks, the products thinner


def applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this path serves q (B, H, T, d) against k (B, K, S, d): self-attention (T == S) of a
    short sequence in fp32 on the CPU."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[2] == k.shape[2] <= MAX_LEN
            and not torch.compiler.is_compiling())  # under compile, Inductor fuses its own attention


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + causal mask) v for q (B, H, T, d), k and v (B, K, T, d), H a multiple of K.

    mask: None (plain causal), or boolean (B or 1, 1, T, T), True where a query may attend, that
    already lies within the causal triangle and keeps each query's own position (e.g. a document
    mask); `mask_is_causal` says whether one does. Returns (B, H, T, d) as a view of a (B, T, H, d)
    tensor, so the caller's transpose back to (B, T, H·d) is free."""
    return _BlockCausal.apply(q, k, v, mask)


def mask_is_causal(mask: torch.Tensor) -> bool:
    """True if a boolean (…, T, T) mask allows nothing above the diagonal and every query its own
    position, so no row is empty (an empty row is NaN in a softmax) and no block above the diagonal
    is needed."""
    return not bool(mask.triu(1).any()) and bool(mask.diagonal(dim1=-2, dim2=-1).all())


class _BlockCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask):
        # Nothing made here is changed in place afterwards: selective activation checkpointing
        # (herd/train/parallel.py) caches the products' outputs and refuses mutated ones.
        B, H, T, d = q.shape
        K = k.shape[1]
        G = H // K
        scale = d ** -0.5
        q5 = q.view(B, K, G, T, d)  # q is (B, H, T, d) with any strides; the head split is a view
        kg = k.reshape(B * K, T, d)
        vg = v.reshape(B * K, T, d)
        if mask is None:
            bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        else:
            bias = torch.where(mask[:, None], 0.0, float("-inf")).to(q.dtype)  # (B or 1, 1, 1, T, T)
        saved, outs = [], []
        for t0 in range(0, T, BLOCK):
            t1 = min(t0 + BLOCK, T)
            qi = (q5[:, :, :, t0:t1] * scale).reshape(B * K, G * (t1 - t0), d)  # scaled once, on the small side
            # the mask block: keys past t1 are masked for all of these queries, so they are left out
            s = torch.bmm(qi, kg[:, :t1].transpose(1, 2)).view(B, K, G, t1 - t0, t1) + bias[..., t0:t1, :t1]
            p = torch.softmax(s.view(B * K, G * (t1 - t0), t1), dim=-1)
            del s
            outs.append(torch.bmm(p, vg[:, :t1]).view(B, K, G, t1 - t0, d).permute(0, 3, 1, 2, 4))
            saved += [qi, p]
        out = torch.cat(outs, dim=1)  # (B, T, K, G, d): the caller's (B, T, H, d) layout
        ctx.save_for_backward(kg, vg, out, *saved)
        ctx.scale = scale
        return out.view(B, T, H, d).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        kg, vg, out, *saved = ctx.saved_tensors
        B, T, K, G, d = out.shape
        scale = ctx.scale
        go = grad_out.transpose(1, 2).reshape(B, T, K, G, d)
        delta = (go * out).sum(-1, keepdim=True)  # rowsum(dO ∘ O): the softmax backward's row term
        dq = torch.empty_like(out)
        dk = torch.zeros_like(kg)
        dv = torch.zeros_like(vg)
        for i, t0 in enumerate(range(0, T, BLOCK)):
            t1 = min(t0 + BLOCK, T)
            n = G * (t1 - t0)
            qi, p = saved[2 * i], saved[2 * i + 1]
            goi = go[:, t0:t1].permute(0, 2, 3, 1, 4).reshape(B * K, n, d)
            # (a product into a fresh tensor, then one add: baddbmm_ into a strided slice runs one
            # small GEMM per batch entry)
            dv[:, :t1] += torch.bmm(p.transpose(1, 2), goi)
            ds = torch.bmm(goi, vg[:, :t1].transpose(1, 2))  # dP
            di = delta[:, t0:t1].permute(0, 2, 3, 1, 4).reshape(B * K, n, 1)
            ds.sub_(di).mul_(p)  # dS = P ∘ (dP − rowsum(dO ∘ O))
            dqi = torch.bmm(ds, kg[:, :t1]).mul_(scale)
            dq[:, t0:t1] = dqi.view(B, K, G, t1 - t0, d).permute(0, 3, 1, 2, 4)
            dk[:, :t1] += torch.bmm(ds.transpose(1, 2), qi)  # qi carries the scale already
        H = K * G
        return (dq.view(B, T, H, d).transpose(1, 2), dk.view(B, K, T, d), dv.view(B, K, T, d), None)
