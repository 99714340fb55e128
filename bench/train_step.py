"""Training-step speed: herd vs transformers' LlamaForCausalLM, side by side, same model and data.

Both models get the same config (a herd preset, `tiny` by default, mapped to a `LlamaConfig` with
herd's own `hf_config_from_args`) and identical weights (herd's `init_weights`, copied across with
`to_hf_state_dict`), run in fp32 on the CPU with the same thread count, in train mode.

One step, for each contender, is forward + loss + backward + global-norm clip + AdamW step:

  * herd: `herd.train.loop.train_step` with `NextTokenLM(document_masking=False)` on a
    `PackedBatch` whose rows are one document each (plain causal attention), eager or with the loss
    wrapped in `herd.train.objectives.Compiled` as `train.compile = true` runs it.
  * transformers: `model(input_ids, labels=..., shift_labels=targets).loss.backward()`, then
    `clip_grad_norm_` and `optimizer.step()`, as a hand-written loop would; eager, or the same loss
    function under `torch.compile` (what a user who compiles their loop gets).

Both optimizers come from herd's `build_optimizer` with the same `OptimConfig` (lr 3e-4, betas
(0.9, 0.95), eps 1e-8, weight decay 0.1 on 2-D parameters only, clip 1.0; torch's fused AdamW kernel,
herd's default and transformers' Trainer's, `adamw_torch_fused`, on torch ≥ 2.8). The data are the same
random tokens, B rows of T+1: inputs are the first T, targets the last T.

The memory allocator is a process-wide setting, so the bench runs itself in child processes:
some with glibc's default (`system`: large blocks mmap'd and unmapped on every free) and some with
`herd.runtime.retain_freed_memory()` (`retain`), which `herd pretrain` applies on CPU
(`train.retain_memory`). In each child the contenders take turns, one step each per round, so a
slow spell of the machine hits all alike. A ratio across allocators compares two processes, run
at different times: so the children alternate (`--passes` pairs, system first in one pass and
retain first in the next), every round of every pass is pooled, and tokens/s = B·T / the median
step time. Each contender's first step in a child (before any update, same weights, same data) is
its warm-up (and compilation); its loss is printed as a parity check.

The ratios printed: herd as `herd pretrain` runs it (retained memory; eager by default, compiled
with `train.compile`) against transformers as a hand-written loop runs it (eager, default allocator)
— the issue's target — and, so that nobody reads more into it than there is, each like against like.
Last, the floor: the step's matrix products and attention alone at its shapes (`step_floor`), timed
in the same rounds, and what ratio a step made of nothing else would reach — the most any
implementation of this model in fp32 on this machine could gain over transformers.

    python bench/train_step.py [--preset tiny] [--batch 8] [--seq 256] [--steps 8] [--passes 2]
                               [--threads 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys

import torch
from timing import interleaved_times, machine, median_time

ALLOCATORS = ("system", "retain")


def run_child(a) -> dict:
    """Time every contender in this process (its allocator already set); returns name → (each
    round's seconds, step-0 loss)."""
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.checkpoint.hf import hf_config_from_args, to_hf_state_dict
    from herd.data.shards import PackedBatch
    from herd.models.args import get_preset
    from herd.models.llama3 import Transformer
    from herd.train.config import OptimConfig
    from herd.train.loop import build_optimizer, train_step
    from herd.train.objectives import Compiled, NextTokenLM

    args = get_preset(a.preset)
    if a.seq > args.max_seq_len:
        args = args.replace(max_seq_len=a.seq)
    torch.manual_seed(a.seed)
    base = Transformer(args)
    base.init_weights()
    hf_sd = to_hf_state_dict(base.state_dict(), args)
    cfg = OptimConfig()
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1))
    batch = PackedBatch(tokens, torch.zeros_like(tokens))  # one document per row
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def herd_contender(compiled: bool):
        model = Transformer(args)
        model.load_state_dict(base.state_dict())
        model.train()
        opt = build_optimizer(model, cfg)
        objective = NextTokenLM(document_masking=False)
        if compiled:
            objective = Compiled(objective)
        return lambda: train_step(model, objective, [batch], opt, cfg.grad_clip).loss

    def hf_loss(model, inputs, targets):
        return model(input_ids=inputs, labels=targets, shift_labels=targets).loss

    def hf_contender(compiled: bool):
        ref = LlamaForCausalLM(LlamaConfig(**hf_config_from_args(args)))
        missing, unexpected = ref.load_state_dict(hf_sd, strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        ref.train()
        opt = build_optimizer(ref, cfg)
        loss_fn = torch.compile(hf_loss) if compiled else hf_loss

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ref, inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    steps = {"herd eager": herd_contender(False), "transformers eager": hf_contender(False)}
    if a.compile:
        steps["herd compiled"] = herd_contender(True)
        steps["transformers compiled"] = hf_contender(True)
    loss0 = {name: fn() for name, fn in steps.items()}  # step 0: warm-up and compilation
    timed = dict(steps)
    if a.child == "retain":
        timed["floor"] = step_floor(base, a)
        timed["floor"]()  # its warm-up (the steps had theirs above)
    t = interleaved_times(timed, a.steps, warm_up=False)
    return {name: (t[name], loss0.get(name)) for name in timed}


def step_floor(model, a):
    """What any implementation of this step must spend on its matrix products and attention: every
    linear layer's three products (forward, input gradient, weight gradient) on B·T rows, and each
    layer's causal attention forward and backward — torch's flash kernel or herd's short-sequence
    one (herd/models/short_attention.py), whichever is faster here — at the step's shapes, and
    nothing else (no norms, RoPE, SwiGLU, loss softmax or AdamW). Returned as one more contender, so
    it is timed in the same rounds as the steps."""
    import torch.nn.functional as F

    from herd.models import short_attention

    M = a.batch * a.seq
    shapes = collections.Counter((m.out_features, m.in_features) for m in model.modules()
                                 if isinstance(m, torch.nn.Linear))
    mats = [(torch.randn(M, k), torch.randn(n, k), torch.randn(M, n), count) for (n, k), count in shapes.items()]
    args = model.args
    B, H, K, T, d = a.batch, args.n_heads, args.kv_heads, a.seq, args.hd
    q = torch.randn(B, T, H, d).transpose(1, 2).requires_grad_()
    k, v = torch.randn(B, K, T, d, requires_grad=True), torch.randn(B, K, T, d, requires_grad=True)
    go = torch.randn(B, H, T, d)
    kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H > K)}
    if short_attention.applies(q, k):
        kernels["short"] = lambda: short_attention.causal_attention(q, k, v)
    fastest = min(kernels.values(), key=lambda f: median_time(lambda: f().backward(go), 5))

    def floor():
        for x, w, g, count in mats:
            for _ in range(count):
                x @ w.t(), g @ w, g.t() @ x
        for _ in range(args.n_layers):
            fastest().backward(go)
    return floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed rounds per child process (each contender one step per round)")
    ap.add_argument("--passes", type=int, default=2, help="pairs of child processes (system, retain), alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager contenders only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=ALLOCATORS, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        if a.child == "retain":
            from herd.runtime import retain_freed_memory
            assert retain_freed_memory(), "glibc's mallopt is not available here"
        print(json.dumps(run_child(a)))
        return

    import transformers

    from herd.models.args import get_preset

    rounds: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    losses: dict[tuple[str, str], float] = {}
    for p in range(a.passes):
        for alloc in ALLOCATORS[::-1] if p % 2 else ALLOCATORS:
            cmd = [sys.executable, __file__, "--child", alloc, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"child ({alloc}) failed:\n{out.stderr[-3000:]}")
            for name, (times, loss0) in json.loads(out.stdout.strip().splitlines()[-1]).items():
                rounds[(alloc, name)] += times
                losses[(alloc, name)] = loss0
    results = {key: (statistics.median(times), losses[key]) for key, times in rounds.items()}
    floor = results.pop(("retain", "floor"))[0]

    args = get_preset(a.preset)
    ntok = a.batch * a.seq
    print(f"train step (fwd + loss + bwd + clip + AdamW), preset {a.preset}: dim {args.dim}, "
          f"{args.n_layers} layers, {args.n_heads}/{args.kv_heads} heads, ffn {args.ffn_dim}, "
          f"vocab {args.vocab_size}, {args.num_params() / 1e6:.1f}M params")
    print(f"  batch {a.batch} x seq {a.seq} = {ntok} tokens/step, fp32, {a.threads} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__} (sdpa); medians of {a.steps} "
          f"interleaved rounds after a warm-up step in each of {a.passes} child processes per allocator, "
          f"alternating; {machine()}")
    print(f"  {'allocator':<10}{'contender':<23}{'ms/step':>9}{'tok/s':>9}   step-0 loss")
    for (alloc, name), (sec, loss0) in results.items():
        print(f"  {alloc:<10}{name:<23}{sec * 1e3:9.1f}{ntok / sec:9,.0f}   {loss0:.6f}")

    def ratio(herd: tuple[str, str], hf: tuple[str, str]) -> str:
        return f"{results[hf][0] / results[herd][0]:.2f}x"

    print("  ratios, herd / transformers tokens/s:")
    as_run = f"{ratio(('retain', 'herd eager'), ('system', 'transformers eager'))}"
    if a.compile:
        as_run += f" (with train.compile {ratio(('retain', 'herd compiled'), ('system', 'transformers eager'))})"
    print(f"    herd as `herd pretrain` runs it (retain) vs a hand-written transformers loop (eager, system): {as_run}")
    for alloc in ALLOCATORS:
        like = [f"eager {ratio((alloc, 'herd eager'), (alloc, 'transformers eager'))}"]
        if a.compile:
            like.append(f"compiled {ratio((alloc, 'herd compiled'), (alloc, 'transformers compiled'))}")
        print(f"    like against like, {alloc} allocator: " + ", ".join(like))
    hf = results[("retain", "transformers eager")][0]
    print(f"  floor: the step's matrix products and attention alone, nothing else (retain, same rounds): "
          f"{floor * 1e3:.1f} ms, {hf / floor:.2f}x transformers' eager step (retain); 1.3x that step is "
          f"{hf / 1.3 * 1e3:.1f} ms")
    loss0 = [v[1] for v in results.values()]
    print(f"  step-0 losses spread (parity of all contenders): {max(loss0) - min(loss0):.2e}")


if __name__ == "__main__":
    main()
