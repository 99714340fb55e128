"""Llama 4 mixture-of-experts layer, forward + backward: herd vs transformers, side by side.

The same weights in both (a one-layer Llama 4 built in herd, mapped to transformers' layout by
herd's own HF adapter), the same input, fp32 on CPU, the same thread count; the contenders are
interleaved in rounds and the medians compared. herd sends each token only through its routed
expert (tokens sorted by expert, one matmul per expert group, `torch._grouped_mm` when no gradient
is needed); transformers' `Llama4TextMoe` runs every token through every expert and zeroes the
unrouted ones by their score, so its expert FLOPs grow with the number of experts.

    python bench/moe.py [--experts 16] [--dim 512] [--ffn 1024] [--tokens 2048] [--runs 5]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from herd.checkpoint.hf_llama4 import hf_config_from_llama4_args, to_hf_llama4_state_dict
    from herd.models.llama4 import LLAMA4_PRESETS, Transformer

    args = LLAMA4_PRESETS["llama4-debug"].replace(
        n_layers=1, moe_every=1, n_experts=a.experts, dim=a.dim, moe_ffn_dim=a.ffn, ffn_hidden_dim=a.ffn,
        n_heads=8, n_kv_heads=2, head_dim=a.dim // 8)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    ref = Llama4ForCausalLM(Llama4TextConfig(**hf_config_from_llama4_args(args)))
    ref.load_state_dict(to_hf_llama4_state_dict(model.state_dict(), args), strict=False)
    ours, theirs = model.layers[0].feed_forward, ref.model.layers[0].feed_forward
    x = torch.randn(a.tokens, a.dim)

    def step(layer, hf: bool):
        def run():
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            (out[0] if hf else out).square().mean().backward()
            return xi.grad
        return run

    with torch.no_grad():
        out = ours(x)
        diff, scale = (out - theirs(x)[0]).abs().max().item(), out.abs().max().item()
    fns = {"herd": step(ours, False), "transformers": step(theirs, True)}
    med = interleaved_medians(fns, a.runs)
    print(f"Llama 4 MoE layer fwd+bwd: {a.experts} experts top-{args.top_k} + shared expert, dim {a.dim}, "
          f"expert FFN {a.ffn}, {a.tokens} tokens, fp32, {a.threads} threads, medians of {a.runs}; {machine()}")
    print(f"  outputs agree to {diff:.1e} (largest output {scale:.2f})")
    for name in fns:
        print(f"  {name:<13} {a.tokens / med[name]:9,.0f} tokens/s  ({med[name] * 1e3:.1f} ms)")
    print(f"  ratio herd/transformers {med['transformers'] / med['herd']:.2f}x")


if __name__ == "__main__":
    main()
