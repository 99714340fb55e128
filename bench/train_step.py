"""Training-step speed: herd vs transformers' LlamaForCausalLM, side by side, same model and data.

Both models get the same config (a herd preset, `tiny` by default, mapped to a `LlamaConfig` with
herd's own `hf_config_from_args`) and identical weights (herd's `init_weights`, copied across with
`to_hf_state_dict`), run in fp32 on the CPU with the same thread count, in train mode.

One step, for each contender, is forward + loss + backward + global-norm clip + AdamW step:

  * herd: `herd.train.loop.train_step` with `NextTokenLM(document_masking=False)` on a
    `PackedBatch` whose rows are one document each, i.e. plain causal attention. (herd's attention
    still builds a boolean causal mask and hands it to SDPA; it never takes the `is_causal` path.)
    `--doc-masking` times herd's default packed-document path too (positions and a (B, 1, T, T)
    document mask built every step) as a third contender.
  * transformers: `model(input_ids, labels=..., shift_labels=targets).loss.backward()`, then
    `clip_grad_norm_` and `optimizer.step()`, as a hand-written loop would.

Both optimizers come from herd's `build_optimizer` with the same `OptimConfig` (lr 3e-4, betas
(0.9, 0.95), eps 1e-8, weight decay 0.1 on 2-D parameters only, clip 1.0), so the weight-decay
handling is identical. The data are the same random tokens, B rows of T+1: inputs are the first T,
targets the last T, so both losses average over exactly B·T next-token terms.

Timing: one warm-up step each, then `--steps` rounds in which every contender runs one step in
turn (so a slow spell of a shared machine hits all alike); tokens/s = B·T / median step time. The
warm-up step is step 0: its losses (before any update, same weights, same data) are printed with
their difference as a parity check.

    python bench/train_step.py [--preset tiny] [--batch 8] [--seq 256] [--steps 10] [--threads 2]
                               [--doc-masking]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (each contender one step per round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--doc-masking", action="store_true",
                    help="also time herd's packed-document path (document mask + restarted positions)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.checkpoint.hf import hf_config_from_args, to_hf_state_dict
    from herd.data.shards import PackedBatch
    from herd.models.args import get_preset
    from herd.models.llama3 import Transformer
    from herd.train.config import OptimConfig
    from herd.train.loop import build_optimizer, train_step
    from herd.train.objectives import NextTokenLM

    args = get_preset(a.preset)
    if a.seq > args.max_seq_len:
        args = args.replace(max_seq_len=a.seq)
    torch.manual_seed(a.seed)
    model = Transformer(args)
    model.init_weights()
    ref = LlamaForCausalLM(LlamaConfig(**hf_config_from_args(args)))
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(model.state_dict(), args), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.train()
    ref.train()
    models = {"herd": model, "transformers": ref}
    if a.doc_masking:  # its own copy of the weights, so that each contender's updates stay its own
        masked = Transformer(args)
        masked.load_state_dict(model.state_dict())
        models["herd+docmask"] = masked.train()

    cfg = OptimConfig()
    optimizers = {name: build_optimizer(m, cfg) for name, m in models.items()}
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1))
    batch = PackedBatch(tokens, torch.zeros_like(tokens))  # one document per row
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    objectives = {"herd": NextTokenLM(document_masking=False), "herd+docmask": NextTokenLM(document_masking=True)}

    def herd_step(name):
        return train_step(models[name], objectives[name], [batch], optimizers[name], cfg.grad_clip).loss

    def hf_step():
        opt = optimizers["transformers"]
        opt.zero_grad(set_to_none=True)
        loss = ref(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    steps = {name: (lambda n=name: herd_step(n)) for name in models if name != "transformers"}
    steps["transformers"] = hf_step
    steps = {name: steps[name] for name in models}  # herd, transformers, [herd+docmask]

    loss0 = {name: fn() for name, fn in steps.items()}  # step 0 doubles as the warm-up
    t = interleaved_medians(steps, a.steps)
    ntok = a.batch * a.seq

    print(f"train step (fwd + loss + bwd + clip + AdamW), preset {a.preset}: dim {args.dim}, "
          f"{args.n_layers} layers, {args.n_heads}/{args.kv_heads} heads, ffn {args.ffn_dim}, "
          f"vocab {args.vocab_size}, {args.num_params() / 1e6:.1f}M params")
    print(f"  batch {a.batch} x seq {a.seq} = {ntok} tokens/step, fp32, {a.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attn {ref.config._attn_implementation}); medians of {a.steps} interleaved rounds after 1 warm-up")
    for name in steps:
        print(f"  {name:<13} {t[name] * 1e3:8.1f} ms/step  {ntok / t[name]:9,.0f} tok/s   "
              f"step-0 loss {loss0[name]:.6f}")
    print(f"  ratio herd/transformers (tok/s)  {t['transformers'] / t['herd']:.2f}x")
    if "herd+docmask" in t:
        print(f"  ratio herd+docmask/transformers  {t['transformers'] / t['herd+docmask']:.2f}x")
    print(f"  step-0 loss difference herd - transformers  {loss0['herd'] - loss0['transformers']:+.2e}")


if __name__ == "__main__":
    main()
