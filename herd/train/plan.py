"""`herd plan`: memory and FLOP arithmetic for a dense Llama preset on a 4D mesh, before renting it.

Per GPU, for the most loaded pipeline stage, in the layout herd/train/parallel.py builds (bf16
compute through FSDP2's MixedPrecisionPolicy, fp32 master weights, fp32 gradients, AdamW):

    parameters   fp32 master shard (÷ dp_shard·cp) + the bf16 copy being computed with (a whole
                 stage when pipelined, since FSDP keeps it gathered across micro-batches; else the
                 two blocks in flight: the current one and the prefetched next)
    gradients    fp32, sharded like the master weights
    optimizer    AdamW's two fp32 moments, sharded
    activations  what backward keeps per token per layer (÷ tp with sequence parallel, ÷ cp), times
                 the stage's layers, times the micro-batches in flight (1F1B: up to pp on the first
                 stage), plus the last stage's logits and their fp32 softmax for one micro-batch

FLOPs are ModelArgs.flops_per_token (6ND plus causal attention, the paper's §3.2.1 convention).
The paper's 405B run (SPEC §3; paper Table 4): 8,192 H100s as TP 8 × PP 16 × DP 64, sequence
8,192, 32 sequences per data-parallel rank (16M tokens per step), 430 TFLOP/s per GPU = 43% MFU.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from herd.errors import HerdError
from herd.models.args import ModelArgs, get_preset
from herd.train.parallel import AC_MODES, ParallelConfig, check_layout, split_layers

GiB = 1024**3
H100_BF16_PEAK = 989e12  # dense BF16 FLOP/s of an H100 SXM
H100_MEMORY = 81559 * 2**20  # bytes: an 80 GB H100 as nvidia-smi reports it (81,559 MiB)


@dataclass
class Plan:
    model: str
    world: int
    degrees: dict
    seq_len: int
    rows_per_dp: int  # sequences per data-parallel rank per optimizer step
    microbatches: int
    tokens_per_step: int
    activation_checkpoint: str
    stage_layers: int
    stage_params: int  # parameters on the most loaded stage, per tensor-parallel rank
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    total_bytes: float
    flops_per_token: float
    flops_per_gpu_per_step: float
    step_seconds_at_mfu: float
    mfu: float

    def format(self) -> str:
        d = " × ".join(f"{k}={v}" for k, v in self.degrees.items() if v > 1) or "1 GPU"
        fit = "fits" if self.total_bytes <= H100_MEMORY else "does NOT fit"
        cap = H100_MEMORY / GiB
        lines = [
            f"{self.model} on {self.world:,} GPUs ({d}), seq {self.seq_len:,}, {self.rows_per_dp} sequences per "
            f"data-parallel rank in {self.microbatches} micro-batch(es): {self.tokens_per_step / 1e6:.1f}M tokens/step",
            f"per GPU (most loaded stage: {self.stage_layers} layers, {self.stage_params / 1e9:.2f}B parameters "
            f"per TP rank; activation checkpointing: {self.activation_checkpoint}):",
            f"  parameters   {self.params_bytes / GiB:8.2f} GiB   fp32 master shard + bf16 working copy",
            f"  gradients    {self.grads_bytes / GiB:8.2f} GiB   fp32, sharded",
            f"  optimizer    {self.optimizer_bytes / GiB:8.2f} GiB   AdamW moments, fp32, sharded",
            f"  activations  {self.activations_bytes / GiB:8.2f} GiB   kept for backward, in-flight micro-batches",
            f"  total        {self.total_bytes / GiB:8.2f} GiB   ({fit} in an H100's {cap:.1f} GiB)",
            f"compute: {self.flops_per_token / 1e9:,.1f} GFLOP/token (training), "
            f"{self.flops_per_gpu_per_step / 1e15:,.1f} PFLOP per GPU per step; "
            f"{self.step_seconds_at_mfu:.1f} s/step at {self.mfu:.0%} MFU "
            f"({self.mfu * H100_BF16_PEAK / 1e12:.0f} TFLOP/s per H100)",
        ]
        return "\n".join(lines)


def _block_params(a: ModelArgs) -> int:
    p = a.dim * a.hd * (a.n_heads + 2 * a.kv_heads) + a.n_heads * a.hd * a.dim + 3 * a.dim * a.ffn_dim + 2 * a.dim
    if getattr(a, "attention_bias", False):  # as ModelArgs.num_params counts them
        p += a.hd * (a.n_heads + 2 * a.kv_heads) + a.dim
    if getattr(a, "mlp_bias", False):
        p += 2 * a.ffn_dim + a.dim
    return p


def activation_elements_per_token(a: ModelArgs, mode: str) -> int:
    """Elements one block keeps for backward per token (before ÷ tp·cp), bf16.
    none: block input and the FFN input (RMSNorm backward), both norm outputs (matmul inputs), q/k/v
    after RoPE and the attention output (SDPA backward; flash attention keeps no T×T scores), w1 and
    w3 outputs and their SwiGLU product (w2's input). selective: the matmul and attention outputs
    plus the block input; norms, RoPE and SwiGLU are recomputed. full: the block input only."""
    D, F, qkv = a.dim, a.ffn_dim, (a.n_heads + 2 * a.kv_heads) * a.hd
    attn_out = a.n_heads * a.hd
    if mode == "none":
        return 4 * D + qkv + attn_out + 3 * F
    if mode == "selective":
        return 3 * D + qkv + attn_out + 2 * F
    return D


def plan(args: ModelArgs, cfg: ParallelConfig, world: int | None, seq_len: int, rows_per_dp: int = 1,
         mfu: float = 0.40, name: str = "model") -> Plan:
    """The per-GPU arithmetic for `args` under `cfg` (world = product of the degrees when None)."""
    cfg.validate()
    if world is not None and world <= 0:
        raise HerdError(f"--world must be a positive number of GPUs (got {world})")
    if seq_len > args.max_seq_len:  # as `herd pretrain` refuses train.seq_len past it
        raise HerdError(f"--seq {seq_len:,} exceeds the model's max_seq_len of {args.max_seq_len:,}")
    if world is None:
        if cfg.dp_shard == -1:
            raise HerdError("give --parallel.dp_shard (or --world) so the number of GPUs is known")
        world = math.prod(getattr(cfg, k) for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp"))
    d = cfg.degrees(world)
    pp, tp, cp = d["pp"], d["tp"], d["cp"]
    shard = d["dp_shard"] * cp  # FSDP shards over dp_shard × cp
    if args.n_heads % tp or args.kv_heads % tp:
        raise HerdError(f"tp={tp} must divide n_heads ({args.n_heads}) and n_kv_heads ({args.kv_heads})")
    if seq_len <= 0 or rows_per_dp <= 0:
        raise HerdError("--seq and --batch must be positive")
    if seq_len % (tp * (2 * cp if cp > 1 else 1)):
        raise HerdError(f"--seq {seq_len} must be divisible by tp (and 2·cp) for sequence/context parallel")
    n_mb = (cfg.pp_microbatches or rows_per_dp) if pp > 1 else 1  # as Parallel.microbatches
    if rows_per_dp % n_mb:
        raise HerdError(f"--batch {rows_per_dp} sequences per data-parallel rank do not split into {n_mb} micro-batches")
    if pp > 1 and n_mb < pp:  # said in plan's own terms before check_layout says it in training's
        raise HerdError(f"--batch {rows_per_dp} makes {n_mb} micro-batch(es) per data-parallel rank; pipeline "
                        f"parallel needs at least pp={pp} (give --batch {pp} or more)")
    # Everything else training itself refuses (parallel.Parallel.check): an FFN or vocabulary tp does
    # not divide, tied embeddings under tp/pp, ep on a dense model, fewer micro-batches than stages.
    # The plan priced such layouts as if they could run.
    check_layout(cfg, d, args, [rows_per_dp * d["dp_replicate"] * d["dp_shard"]], [seq_len])
    stages = split_layers(args.n_layers, pp * cfg.stages_per_rank)
    emb = args.vocab_size * args.dim
    block = _block_params(args)

    # the most loaded rank: its stages' blocks plus embeddings (first) or norm + output (last)
    def rank_params(r: int) -> tuple[int, int]:
        ids = [r + k * pp for k in range(cfg.stages_per_rank)]
        layers = sum(len(stages[s]) for s in ids)
        p = layers * block
        if 0 in ids:
            p += emb
        if len(stages) - 1 in ids:
            p += args.dim + (0 if args.tie_embeddings and pp == 1 else emb)
        return layers, p

    per_rank = [rank_params(r) for r in range(pp)]
    layers, params = max(per_rank, key=lambda x: x[1])
    params_tp = params / tp
    master = 4 * params_tp / shard
    working = 2 * params_tp if pp > 1 else 2 * 2 * block / tp  # bf16 gathered: stage, or 2 blocks
    grads = 4 * params_tp / shard
    optim = 8 * params_tp / shard

    tokens_mb = rows_per_dp // n_mb * seq_len
    per_layer = activation_elements_per_token(args, cfg.activation_checkpoint) * 2 / (tp * cp)  # bf16 bytes
    in_flight = min(pp, n_mb) if pp > 1 else 1
    if pp == 1:  # gradient accumulation runs micro-batches one after another
        in_flight = 1
    act = per_layer * tokens_mb * layers * in_flight
    if cfg.activation_checkpoint == "full":  # one block's activations live while it is recomputed
        act += activation_elements_per_token(args, "none") * 2 / (tp * cp) * tokens_mb
    # logits of one micro-batch on the last stage: bf16 output, its fp32 copy, fp32 softmax grad
    act += tokens_mb / cp * args.vocab_size / tp * (2 + 4 + 4)
    total = master + working + grads + optim + act
    dp_total = d["dp_replicate"] * d["dp_shard"]
    tokens_step = dp_total * rows_per_dp * seq_len
    fpt = args.flops_per_token(seq_len, training=True)
    per_gpu = fpt * tokens_step / world
    return Plan(model=name, world=world, degrees=d, seq_len=seq_len, rows_per_dp=rows_per_dp, microbatches=n_mb,
                tokens_per_step=tokens_step, activation_checkpoint=cfg.activation_checkpoint, stage_layers=layers,
                stage_params=int(params_tp), params_bytes=master + working, grads_bytes=grads,
                optimizer_bytes=optim, activations_bytes=act, total_bytes=total, flops_per_token=fpt,
                flops_per_gpu_per_step=per_gpu, step_seconds_at_mfu=per_gpu / (mfu * H100_BF16_PEAK), mfu=mfu)


# ---- `herd plan` ---------------------------------------------------------------------------------
PLAN_EXAMPLES = """\
examples:
  herd plan --model llama3-405b --parallel.tp=8 --parallel.pp=16 --parallel.dp_shard=64 --seq 8192 \
            --batch 32                                      # the paper's 405B layout (Table 4)
  herd plan --model llama3-8b --parallel.dp_shard=8 --seq 8192 --batch 2 --parallel.activation_checkpoint=selective
"""


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    from herd.train.cli import _PretrainParser

    p = subparsers.add_parser(
        "plan", help="per-GPU memory and FLOPs of a preset on a 4D mesh",
        description="Per-GPU memory (parameters, gradients, optimizer state, activations) and FLOPs of a "
                    "dense preset under a parallel layout given as --parallel.KEY=VALUE (pp, dp_replicate, "
                    "dp_shard, cp, tp, pp_schedule, pp_microbatches, activation_checkpoint).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLAN_EXAMPLES)
    p.__class__ = _PretrainParser  # collects the dotted --parallel.* overrides
    p.add_argument("--model", required=True, help="a dense preset (llama3-8b, llama3-70b, llama3-405b, ...)")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence length (default: 8192, or the model's max_seq_len when shorter)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per data-parallel rank per optimizer step (default: 1, or the fewest a "
                        "pipeline runs: pp, or parallel.pp_microbatches; the paper's 405B run: 32 at seq 8192)")
    p.add_argument("--world", type=int, default=None, help="number of GPUs (default: the product of the degrees)")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilization for the step time (default: 0.40)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan, overrides=[])
    return p


def cmd_plan(a) -> None:
    from herd.train.config import parse_override

    cfg = ParallelConfig()
    cfg.dp_shard = 1 if a.world is None else -1
    for item in a.overrides:
        section, key, value = parse_override(item)
        if section != "parallel":
            raise HerdError(f"herd plan takes --parallel.KEY=VALUE options, not {item}")
        if key not in ParallelConfig.__dataclass_fields__:
            raise HerdError(f"unknown option parallel.{key}; valid: "
                            f"{', '.join('parallel.' + k for k in ParallelConfig.__dataclass_fields__)}")
        expected = type(getattr(ParallelConfig(), key))
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise HerdError(f"parallel.{key}: expected {expected.__name__}, got {value!r}")
        setattr(cfg, key, value)
    if cfg.activation_checkpoint not in AC_MODES:
        raise HerdError(f"parallel.activation_checkpoint {cfg.activation_checkpoint!r}: choose {', '.join(AC_MODES)}")
    args = get_preset(a.model)
    if not isinstance(args, ModelArgs):
        raise HerdError(f"{a.model}: herd plan covers the dense presets")
    if not 0 < a.mfu <= 1:
        raise HerdError(f"--mfu {a.mfu}: a fraction in (0, 1]")
    seq = a.seq if a.seq is not None else min(8192, args.max_seq_len)
    batch = a.batch
    if batch is None:  # a pipeline needs a micro-batch per stage (at least)
        batch = max(cfg.pp_microbatches, cfg.pp) if cfg.pp > 1 else 1
    result = plan(args, cfg, a.world, seq, batch, a.mfu, name=a.model)
    print(json.dumps(asdict(result), indent=1) if a.json else result.format())
