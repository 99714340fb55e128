"""4D parallelism for herd models on PyTorch's own distributed engine (SPEC §3: the 405B model
trained on up to 16K H100s with [TP, CP, PP, DP] parallelism and FSDP for data parallel).

Everything here is applied from outside an unmodified model (DESIGN principle 2), in a fixed order:

    expert parallel (Llama 4 MoE) / tensor+sequence parallel → activation checkpointing
    → per-block torch.compile (GPU) → FSDP2 (`fully_shard`, bf16 MixedPrecisionPolicy on GPU)

over one `DeviceMesh` with dims [pp, dp_replicate, dp_shard, cp, tp] (outermost first: TP is the
innermost dim so its heavy traffic stays inside a node, as in the paper's ordering). Expert
parallel (`parallel.ep`, herd/train/expert_parallel.py) splits dp_shard into dp_shard_mod_ep × ep
and flattens the two back into dp_shard, so everything but the experts sees the same five dims. Pipeline
parallel cuts the model into stages by layers (`torch.distributed.pipelining`, 1F1B, interleaved
1F1B or GPipe); context parallel shards the sequence (PyTorch's `context_parallel`, GPU only).

The loop (herd/train/loop.py) asks a `Parallel` for its step functions: the data-parallel share of
each micro-batch, the loss normalized by the loss terms of the whole step over all data-parallel
ranks (so the gradient equals the single-process gradient of the global batch), a gradient-norm
clip that sees every shard, and rank-0-only logging. A layout that does not fit the world size,
the model or the batch is a one-line `HerdError`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.models.llama3 import DecoderOnly
from herd.models.llama4 import moe_layers
from herd.models.rope import rope_frequencies, rope_rotations
from herd.train.expert_parallel import apply_expert_parallel, check_expert_parallel, shard_experts_fsdp
from herd.train.objectives import IGNORE, NextTokenLM, document_mask, document_positions, lm_targets

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
AC_MODES = ("none", "selective", "full")
# Models up to this size are initialized whole on every rank with the run's seed and then sharded,
# so any layout starts from exactly the single-process weights; larger ones are initialized shard
# by shard on the device (a 405B model never exists whole on one host: DESIGN principle 3).
FULL_INIT_MAX_PARAMS = 1_000_000_000


@dataclass
class ParallelConfig:
    """Degrees of the five mesh dims (their product is the world size) and per-model techniques."""

    pp: int = 1  # pipeline stages across ranks
    dp_replicate: int = 1  # replicated data parallel (HSDP's outer dim)
    dp_shard: int = -1  # FSDP degree; -1 = whatever the other dims leave of the world size
    cp: int = 1  # context parallel (sequence sharding in attention; GPU only)
    tp: int = 1  # tensor parallel with sequence-parallel norms
    ep: int = 1  # expert parallel for MoE layers: ranks borrowed from dp_shard (must divide it)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | gpipe
    pp_microbatches: int = 0  # per data-parallel share of a micro-batch; 0 = one sequence each
    pp_stages_per_rank: int = 0  # 0 = 2 for interleaved_1f1b, else 1
    activation_checkpoint: str = "none"  # none | selective (save matmuls + attention) | full
    compile: bool = False  # torch.compile each block (GPU only)
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocabulary-sharded logits

    def degrees(self, world_size: int) -> dict[str, int]:
        """The five degrees with dp_shard=-1 resolved; checked against the world size."""
        d = {k: getattr(self, k) for k in MESH_DIMS}
        for k, v in d.items():
            if v == 0 or v < -1 or (v == -1 and k != "dp_shard"):
                raise HerdError(f"parallel.{k}={v}: degrees are positive integers (dp_shard may be -1)")
        others = math.prod(v for k, v in d.items() if k != "dp_shard")
        if d["dp_shard"] == -1:
            if world_size % others:
                raise HerdError(f"world size {world_size} is not divisible by pp×dp_replicate×cp×tp = {others}")
            d["dp_shard"] = world_size // others
        if math.prod(d.values()) != world_size:
            layout = "×".join(f"{k}={v}" for k, v in d.items() if v > 1) or "1"
            # `--resume` takes the layout from the run's saved config, so resuming a torchrun run in
            # one process (or on another world size) lands here: say how to re-lay it out too
            raise HerdError(f"parallel layout {layout} needs {math.prod(d.values())} processes, this run has "
                            f"{world_size} (launch with torchrun --nproc_per_node {math.prod(d.values())}, or "
                            f"give degrees for {world_size}, e.g. --parallel.dp_shard=-1 with pp/tp/cp/dp_replicate "
                            "that divide it: checkpoints reshard to any layout)")
        if d["dp_shard"] % self.ep:
            raise HerdError(f"parallel.ep={self.ep} must divide parallel.dp_shard={d['dp_shard']}: expert "
                            "parallel borrows its ranks from FSDP's data-parallel dim")
        return d

    def validate(self) -> None:
        if self.ep < 1:
            raise HerdError(f"parallel.ep={self.ep}: degrees are positive integers")
        if self.ep > 1:
            other = [f"{k}={getattr(self, k)}" for k in ("tp", "cp", "pp") if getattr(self, k) != 1]
            if other:
                raise HerdError(f"parallel.ep={self.ep} with parallel.{', '.join(other)} is not supported: expert "
                                "parallel combines with FSDP/HSDP (dp_shard, dp_replicate) only")
        if self.pp_schedule not in PP_SCHEDULES:
            raise HerdError(f"parallel.pp_schedule {self.pp_schedule!r}: choose {', '.join(PP_SCHEDULES)}")
        if self.activation_checkpoint not in AC_MODES:
            raise HerdError(f"parallel.activation_checkpoint {self.activation_checkpoint!r}: choose "
                            f"{', '.join(AC_MODES)}")
        if self.pp_microbatches < 0 or self.pp_stages_per_rank < 0:
            raise HerdError("parallel.pp_microbatches and parallel.pp_stages_per_rank must be >= 0")
        if self.pp_schedule == "interleaved_1f1b" and self.pp_stages_per_rank == 1:
            raise HerdError("parallel.pp_schedule=interleaved_1f1b needs pp_stages_per_rank >= 2")
        if self.pp_schedule != "interleaved_1f1b" and self.pp_stages_per_rank > 1:
            raise HerdError(f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} needs "
                            "pp_schedule=interleaved_1f1b")

    @property
    def stages_per_rank(self) -> int:
        return self.pp_stages_per_rank or (2 if self.pp_schedule == "interleaved_1f1b" else 1)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> torch.device:
    """Join the torchrun job (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU; each rank gets its GPU."""
    dev = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        store = _elastic_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
    return dev


def _elastic_store():
    """Under torchrun, the rendezvous store with a prefix for this restart. The agent keeps one store
    across restarts, so without it the workers of a restarted job can read the dead workers'
    connection addresses from the previous attempt and wait on them forever (seen with gloo)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=not agent_hosts and os.environ["RANK"] == "0",
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"herd/attempt_{restart}", store)


def build_mesh(degrees: dict[str, int], device_type: str, ep: int = 1):
    """The [pp, dp_replicate, dp_shard, cp, tp] mesh; with expert parallel (ep > 1) dp_shard is built
    as dp_shard_mod_ep × ep and flattened back, so `mesh["dp_shard"]` is the same group of ranks
    either way (herd/train/expert_parallel.py)."""
    from torch.distributed.device_mesh import init_device_mesh

    if ep == 1:
        return init_device_mesh(device_type, tuple(degrees[k] for k in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")
    sizes = {**degrees, "dp_shard_mod_ep": degrees["dp_shard"] // ep, "ep": ep}
    mesh = init_device_mesh(device_type, tuple(sizes[k] for k in names), mesh_dim_names=names)
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    return mesh


# ---- tensor / sequence parallel -------------------------------------------------------------------
def apply_tensor_parallel(model: nn.Module, tp_mesh, loss_parallel: bool) -> None:
    """Megatron-style TP with sequence parallelism (DTensor `parallelize_module`): q/k/v and w1/w3
    column-sharded (each rank owns whole heads, which is why the model views heads as -1), wo and w2
    row-sharded; between blocks the residual stream and the RMSNorms are sharded along the sequence
    (dim 1), all-gathered on entry to attention / FFN and reduce-scattered on exit. The output head
    leaves logits sharded over the vocabulary for a loss-parallel cross-entropy."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    for block in model.layers.children():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # Attention.forward(x, rotations, mask, cache, layer): only x is sequence-sharded.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


# ---- activation checkpointing and compile ---------------------------------------------------------
def _saved_ops() -> set:
    """Ops whose outputs selective checkpointing keeps: the matmuls and attention (expensive to
    recompute); norms, RoPE, SiLU and other elementwise work are recomputed in backward."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"]
    from herd.models import short_attention  # noqa: F401  (registers torch.ops.herd.short_attention)

    return {getattr(aten, n).default for n in names if hasattr(aten, n)} | {torch.ops.herd.short_attention.default}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward (`full`) or all but its matmul and attention
    outputs (`selective`). The block's forward is wrapped in place, so parameter names (and with
    them checkpoints) do not change."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    if mode == "none":
        return
    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    def selective_context():
        return create_selective_checkpoint_contexts(policy)

    # Plain closures (no functools.partial, no context_fn for full AC): torch.compile of the block
    # then traces the checkpoint as one region instead of silently falling back to eager.
    def wrap(inner):
        if mode == "full":
            def checkpointed(*args, **kwargs):
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        else:
            def checkpointed(*args, **kwargs):
                return checkpoint(inner, *args, use_reentrant=False, context_fn=selective_context, **kwargs)
        return checkpointed

    for block in model.layers.children():
        block.forward = wrap(block.forward)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (same parameter names); the blocks are identical, so one
    compilation serves them all."""
    for block in model.layers.children():
        block.compile()


# ---- FSDP2 ------------------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, dp_mesh, *, mixed_precision: bool, pipelined: bool, expert_mesh=None) -> None:
    """fully_shard each block, the embeddings, the norm+output head together, then the root, so one
    block's parameters are all-gathered at a time. On GPU, parameters compute in bf16 while
    gradients are reduced in fp32 (MixedPrecisionPolicy). With expert parallel, `expert_mesh` (the
    whole mesh) is where the experts get their own FSDP over dp_shard_mod_ep, wrapped first so the
    blocks' FSDP leaves them out."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": dp_mesh}
    if mixed_precision:
        # Inputs are not cast: a block's activations arrive in bf16 from the bf16 embedding anyway,
        # while its RoPE rotations (cos, sin) must stay fp32 (bf16 angles lose whole positions at
        # long context, and the complex rotation needs fp32).
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False)
    # With pipelining each micro-batch would all-gather again: keep parameters gathered instead.
    reshard = not pipelined
    if expert_mesh is not None:
        shard_experts_fsdp(model, expert_mesh, kw, reshard)
    # Tied embeddings (Llama 3.2 1B/3B, SmolLM2): one parameter serves the first and the last layer,
    # and FSDP2 refuses a parameter shared across groups, so both stay with the root group (gathered
    # for the whole step, as torchtitan does with tied weights).
    tied = bool(getattr(getattr(model, "args", None), "tie_embeddings", False))
    if getattr(model, "tok_embeddings", None) is not None and not tied:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard, **kw)
    for block in model.layers.children():
        fully_shard(block, reshard_after_forward=reshard, **kw)
    head = [m for m in (getattr(model, "norm", None), getattr(model, "output", None)) if m is not None]
    if head and not tied:
        # Backward starts with these right after forward: no point in resharding them.
        fully_shard(head, reshard_after_forward=False, **kw)
    fully_shard(model, **kw)


# ---- pipeline stages ----------------------------------------------------------------------------------
class PipelineStageModule(nn.Module):
    """One pipeline stage of a herd decoder: a run of its blocks, plus the token embeddings on the
    first stage and the final norm and output head on the last. Blocks keep their index as name
    (`layers.7....`), so parameter names are the full model's and checkpoints move between layouts."""

    def __init__(self, model: DecoderOnly, layer_ids: Sequence[int], first: bool, last: bool):
        super().__init__()
        self.args = model.args
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.rope_scale = model.rope_scale

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: tokens (B, T) on the first stage, hidden states (B, T, D) after; → hidden states, or
        fp32 logits (B, T, V) on the last stage (as DecoderOnly.head)."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        rotations = rope_rotations(self.inv_freq, positions, self.rope_scale)
        for block in self.layers.values():
            h = block(h, rotations, mask)
        return self.output(self.norm(h)).float() if self.output is not None else h


class PipelineParts(nn.Module):
    """This rank's stages as one module (what the optimizer, the checkpoints and `init_weights` see),
    with the full model's parameter names. It has no forward: the schedule runs the stages."""

    RESIDUAL_PROJECTIONS = DecoderOnly.RESIDUAL_PROJECTIONS
    init_weights = DecoderOnly.init_weights

    def __init__(self, model: DecoderOnly, stages: list[PipelineStageModule]):
        super().__init__()
        self.args = model.args
        self.stages = stages  # a plain list: the stages' parameters are registered below, once
        self.tok_embeddings = next((s.tok_embeddings for s in stages if s.tok_embeddings is not None), None)
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        self.norm = next((s.norm for s in stages if s.norm is not None), None)
        self.output = next((s.output for s in stages if s.output is not None), None)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        device = device or next(self.parameters()).device
        inv_freq = rope_frequencies(self.args.hd, self.args.rope_theta, self.args.rope_scaling, device=device)
        for s in self.stages:
            s.inv_freq = inv_freq

    def forward(self, *args, **kwargs):
        raise HerdError("a pipeline-parallel model runs through its schedule (herd.train.parallel.Parallel)")


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, as-even-as-possible runs of layers; the earlier stages take the remainder."""
    if n_stages > n_layers:
        raise HerdError(f"pipeline parallel: {n_stages} stages but the model has only {n_layers} layers")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def _pp_loss(denominator: list[float]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss / denominator[0]
    return loss_fn


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (the loss-parallel cross-entropy) as a plain tensor, gradient kept."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _LocalLoss:
    """Wraps an objective so its loss is a plain tensor even when the logits are a DTensor."""

    def __init__(self, objective):
        self.objective = objective

    def num_terms(self, batch) -> int:
        return self.objective.num_terms(batch)

    def loss_sum(self, model, batch) -> torch.Tensor:
        return _local(self.objective.loss_sum(model, batch))


# ---- the run's layout --------------------------------------------------------------------------------
def check_layout(cfg: ParallelConfig, d: dict[str, int], args, batch_sizes: Sequence[int],
                 seq_lens: Sequence[int]) -> None:
    """Refuse layouts (degrees `d`) the model or the global batch sizes and sequence lengths cannot
    be split into. Shared by training (Parallel.check) and `herd plan`, so a plan never prices a
    layout that training would refuse."""
    tp, cp, pp = d["tp"], d["cp"], d["pp"]
    dp_size = d["dp_replicate"] * d["dp_shard"]
    check_expert_parallel(cfg.ep, args)
    if tp > 1 and getattr(args, "n_experts", 0):
        raise HerdError(f"parallel.tp={tp}: tensor parallel for Llama 4 MoE models is not implemented; shard "
                        "the experts with parallel.ep over the dp_shard ranks instead")
    if tp > 1:
        if args.n_heads % tp or args.kv_heads % tp:
            raise HerdError(f"parallel.tp={tp} must divide n_heads ({args.n_heads}) and n_kv_heads "
                            f"({args.kv_heads}): each rank owns whole heads")
        if args.ffn_dim % tp or args.vocab_size % tp and cfg.loss_parallel:
            raise HerdError(f"parallel.tp={tp} must divide the FFN width ({args.ffn_dim}) and, with loss "
                            f"parallel, the vocabulary ({args.vocab_size})")
        if args.tie_embeddings:
            raise HerdError("tensor parallel with tied embeddings is not supported (set parallel.tp=1)")
    if pp > 1 and args.tie_embeddings:
        raise HerdError("pipeline parallel with tied embeddings is not supported (the embedding and the "
                        "output head live on different stages)")
    for b in batch_sizes:
        if b % dp_size:
            raise HerdError(f"train.batch_size={b} must be divisible by the data-parallel degree "
                            f"dp_replicate×dp_shard={dp_size}")
        if pp > 1:
            rows = b // dp_size
            n_mb = cfg.pp_microbatches or rows  # as Parallel.microbatches
            if rows % n_mb or n_mb < pp:
                raise HerdError(f"pipeline parallel: each data-parallel share ({rows} rows) must split into "
                                f"parallel.pp_microbatches={n_mb} micro-batches, at least pp={pp}")
    for t in seq_lens:
        if t % (tp * 2 * cp if cp > 1 else tp):
            raise HerdError(f"train.seq_len={t} must be divisible by tp{'×2×cp' if cp > 1 else ''} "
                            f"(= {tp * 2 * cp if cp > 1 else tp}) for sequence/context parallel")


class Parallel:
    """This process's place in the layout and the functions the training loop calls through it.

    Single process (no torchrun): nothing is distributed, `parallelize` applies only activation
    checkpointing / compile, and the loop's own step functions are used.
    """

    def __init__(self, cfg: ParallelConfig, device: str = "cpu"):
        cfg.validate()
        if cfg.cp > 1 and torch.device(device).type != "cuda":
            raise HerdError("parallel.cp > 1 (context parallel) runs on GPUs only (PyTorch's context_parallel "
                            "needs CUDA SDPA kernels)")
        if cfg.compile and cfg.tp > 1:
            # herd's CPU checks of compiled tensor-parallel blocks (torch 2.13, DTensor + SP + loss
            # parallel) failed in backward or gave wrong gradients; compile is verified with FSDP only.
            raise HerdError("parallel.compile with parallel.tp > 1 is refused for now (compiled DTensor blocks "
                            "gave wrong gradients in herd's checks); compile with FSDP/PP, or TP without compile")
        if cfg.compile and torch.device(device).type != "cuda":
            raise HerdError("parallel.compile is for GPU runs (per-block torch.compile); leave it off on CPU")
        self.cfg = cfg
        self.device = init_distributed(device)
        self.world = world_size()
        self.d = cfg.degrees(self.world)
        self.distributed = self.world > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.mesh = build_mesh(self.d, self.device.type, cfg.ep) if self.distributed else None
        self.dp_size = self.d["dp_replicate"] * self.d["dp_shard"]  # ranks that read different rows
        self.grad_ranks = self.dp_size * self.d["cp"]  # ranks whose gradients FSDP averages
        if self.distributed:
            coord = {k: self.mesh[k].get_local_rank() for k in MESH_DIMS}
            self.dp_rank = coord["dp_replicate"] * self.d["dp_shard"] + coord["dp_shard"]
            self.pp_rank = coord["pp"]
        else:
            self.dp_rank, self.pp_rank = 0, 0
        self.is_main = self.rank == 0
        # torchrun sets this on the workers it restarts after a failure (--max-restarts).
        self.restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.sharded = self.distributed and self.grad_ranks > 1  # FSDP2 applies
        self.pipelined = self.d["pp"] > 1
        self.schedule = None
        self.stage_infos: list[tuple[bool, bool]] = []  # (first, last) per local stage
        self._denominator = [1.0]
        self.mixed_precision = False

    @property
    def active(self) -> bool:
        """Whether the model needs `parallelize` at all."""
        return self.distributed or self.cfg.activation_checkpoint != "none" or self.cfg.compile

    def describe(self) -> str:
        dims = [f"{k}={v}" for k, v in self.d.items() if v > 1] + ([f"ep={self.cfg.ep}"] if self.cfg.ep > 1 else [])
        return " × ".join(dims) or "single process"

    # ---- building ----
    @contextlib.contextmanager
    def rank0_first(self):
        """Rank 0 runs the body first (e.g. preparing shards on a shared filesystem), then the rest.

        When rank 0 fails in the body (a bad data path, say) it prints the job's one error line and
        leaves, and the barrier the other ranks wait in breaks ("Connection closed by peer"): they
        leave as for any bad input (herd.errors.print_error: quietly, status 2, once the launcher
        stops them) rather than each printing a collective's traceback."""
        if self.distributed and not self.is_main:
            try:
                dist.barrier()
            except RuntimeError as e:  # gloo and NCCL report a lost peer as RuntimeError (DistBackendError)
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                raise HerdError(f"rank 0 stopped before the other ranks could go on ({first})") from None
        yield
        if self.distributed and self.is_main:
            dist.barrier()

    def check(self, args, train) -> None:
        """Refuse layouts the model or the batches (a TrainConfig's sizes) cannot be split into."""
        batch_sizes = [train.batch_size] + [e[1] for e in train.batch_schedule]
        seq_lens = [train.seq_len] + [e[2] for e in train.batch_schedule]
        check_layout(self.cfg, self.d, args, batch_sizes, seq_lens)

    def microbatches(self, rows: int) -> int:
        """Micro-batches per pipeline step for a share of `rows` sequences: one sequence each unless
        set (the fewest activations in flight and the smallest bubble, (pp-1)/micro-batches)."""
        return self.cfg.pp_microbatches or rows

    def parallelize(self, model: DecoderOnly, *, mixed_precision: bool = False) -> nn.Module:
        """Apply the layout to a model built on the meta device; returns the module to train (the
        model itself, or this rank's pipeline stages as `PipelineParts`). Weights are not initialized
        yet: call `init_weights` next (or load a checkpoint)."""
        self.mixed_precision = mixed_precision and self.distributed
        if self.pipelined:
            return self._build_pipeline(model)
        parallelize(model, self.mesh, self.cfg, mixed_precision=self.mixed_precision)
        return model

    def _build_pipeline(self, model: DecoderOnly) -> nn.Module:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        from herd.models.llama3 import Transformer

        if type(model) is not Transformer:
            raise HerdError(f"pipeline parallel splits the dense Llama 3 Transformer; {type(model).__module__}."
                            f"{type(model).__name__} is not supported yet")
        pp, per_rank = self.d["pp"], self.cfg.stages_per_rank
        n_stages = pp * per_rank
        runs = split_layers(model.args.n_layers, n_stages)
        # Rank r holds stages r, r+pp, r+2pp, ... (the interleaved schedules' "loop" placement).
        ids = [self.pp_rank + k * pp for k in range(per_rank)]
        modules, stages = [], []
        pp_group = self.mesh["pp"].get_group()
        for s in ids:
            first, last = s == 0, s == n_stages - 1
            m = PipelineStageModule(model, runs[s], first, last)
            parallelize(m, self.mesh, self.cfg, mixed_precision=self.mixed_precision, pipelined=True)
            modules.append(m)
            self.stage_infos.append((first, last))
            stages.append((s, m))
        parts = PipelineParts(model, modules)
        self._make_stages = lambda: [PipelineStage(m, s, n_stages, self.device, group=pp_group) for s, m in stages]
        loss_fn = _pp_loss(self._denominator)
        if self.cfg.pp_schedule == "interleaved_1f1b":
            self._schedule_fn = lambda st, n: ScheduleInterleaved1F1B(st, n, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = Schedule1F1B if self.cfg.pp_schedule == "1f1b" else ScheduleGPipe
            self._schedule_fn = lambda st, n: cls(st[0], n, loss_fn=loss_fn, scale_grads=False)
        return parts

    def init_weights(self, model: nn.Module, seed: int, full_init: Callable[[], DecoderOnly]) -> None:
        """Materialize on the device and initialize. Small models: `full_init()` (a constructor,
        called on the meta device) gives the whole model, initialized on this device with the run's seed (exactly the single-process weights) and each rank keeps
        its shard. Large ones: `init_weights` on the sharded parameters themselves."""
        model.to_empty(device=self.device)
        n = model.args.num_params() if hasattr(model.args, "num_params") else 0
        if n <= FULL_INIT_MAX_PARAMS:
            torch.manual_seed(seed)
            with torch.device("meta"):
                whole = full_init()
            whole.to_empty(device=self.device)  # the single-process path, draw for draw
            whole.init_weights()
            self.load_full_state_dict(model, whole.state_dict())
            del whole
        else:
            torch.manual_seed(seed + self.pp_rank)  # stages hold different layers: different draws
            model.init_weights()
        model.init_buffers(self.device)

    def _schedule_for(self, inputs: torch.Tensor, grad: bool):
        """The pipeline schedule for micro-batches of this shape. Stages learn their activation
        shapes on first use, so a new batch shape (SPEC §3.4's batch and sequence schedule) gets
        fresh stages and schedule; eval keeps its own (no backward state to share)."""
        key = (tuple(inputs.shape), grad, torch.is_autocast_enabled(self.device.type))
        if getattr(self, "_schedule_key", None) != key:
            self.schedule = self._schedule_fn(self._make_stages(), self.microbatches(inputs.shape[0]))
            self._schedule_key = key
        return self.schedule

    def load_full_state_dict(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Load an unsharded state dict (every rank holds it) into the sharded model: each rank keeps
        the pieces it owns."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        own = model.state_dict()
        missing = sorted(set(own) - set(full))
        if missing:
            raise HerdError(f"state dict lacks {len(missing)} weight(s) of this model, e.g. {missing[0]}")
        with torch.no_grad():
            for name, t in own.items():
                src = full[name]
                if tuple(src.shape) != tuple(t.shape):
                    raise HerdError(f"{name}: shape {tuple(src.shape)} does not fit the model's {tuple(t.shape)}")
                if isinstance(t, DTensor):
                    # The block of the full tensor this rank holds (also right for FSDP over TP, where
                    # torch's distribute_tensor refuses uneven strided shards such as a 258-row vocab).
                    shape, offset = compute_local_shape_and_global_offset(src.shape, t.device_mesh, t.placements)
                    src = src[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
                    t = t.to_local()
                t.copy_(src)

    # ---- reductions ----
    def _all_reduce(self, t: torch.Tensor, dims: Sequence[str]) -> torch.Tensor:
        """Sum over the mesh dims `dims` (one group per dim; their product is the whole set)."""
        if not self.distributed:
            return t
        t = t.to(self.device)
        for name in dims:
            if self.d[name] > 1:
                dist.all_reduce(t, group=self.mesh[name].get_group())
        return t

    def _dp_dims(self) -> tuple[str, ...]:
        return ("dp_replicate", "dp_shard", "cp")

    def share(self, batch):
        """This data-parallel rank's rows of a global batch (every rank reads the same global batch,
        so the loader's position is one number for all layouts and resumes under any of them)."""
        if self.dp_size == 1:
            return batch
        rows = batch.tokens.shape[0] // self.dp_size
        lo = self.dp_rank * rows
        return type(batch)(batch.tokens[lo:lo + rows], batch.doc_ids[lo:lo + rows])

    def train_context(self) -> contextlib.AbstractContextManager:
        if self.d["tp"] > 1 and self.cfg.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    # ---- the step functions the loop calls (train_step's `backward` and `clip_grad_norm`) ----
    def step_hooks(self) -> dict[str, Callable]:
        if not self.distributed:
            return {}
        return {"backward": self.backward, "clip_grad_norm": self.clip_grad_norm}

    def backward(self, model: nn.Module, objective, micro_batches: Sequence[Any],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> tuple[torch.Tensor, int]:
        """Forward and backward over this rank's share of every micro-batch. Each share's summed
        loss is divided by (the step's loss terms over all data-parallel ranks) / (ranks FSDP
        averages over), so the averaged gradient is the single-process gradient of the global batch.
        Returns the global mean loss (the same on every rank) and the global number of terms."""
        from herd.train.loop import accumulate_gradients

        mine = [self.share(b) for b in micro_batches]
        local_terms = sum(objective.num_terms(b) for b in mine)
        # context-parallel ranks share rows: count each row's terms once, over the data-parallel ranks
        total = int(self._all_reduce(torch.tensor(float(local_terms), dtype=torch.float64),
                                     ("dp_replicate", "dp_shard")))
        denom = max(total, 1) / self.grad_ranks
        if self.pipelined:
            loss = self._pipeline_backward(objective, mine, autocast, denom)
        elif self.d["cp"] > 1:
            loss = self._context_parallel_backward(model, objective, mine, autocast, denom)
        else:
            with self.train_context():
                loss, _ = accumulate_gradients(model, _LocalLoss(objective), mine, autocast, denominator=denom)
        # Mean over data-parallel ranks of sum_r/denom = (global sum)/(global terms).
        loss = self._all_reduce(loss.detach().to(torch.float64), self._dp_dims()) / self.grad_ranks
        return loss.float().cpu(), total

    def _context_parallel_backward(self, model, objective, mine, autocast, denom: float) -> torch.Tensor:
        """Each cp rank runs a load-balanced slice of every sequence (PyTorch's context_parallel
        shards tokens, positions and targets in place and turns causal SDPA into ring attention);
        the partial losses add up over the cp ranks. GPU only, causal attention without document
        masking (ring attention takes no arbitrary mask)."""
        if not isinstance(objective, NextTokenLM) or objective.document_masking:
            raise HerdError("context parallel needs plain causal attention: NextTokenLM(document_masking=False)")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in mine:
            inputs = b.inputs.contiguous()
            B, T = inputs.shape
            positions = torch.arange(T, device=inputs.device).expand(B, T).contiguous()
            targets = lm_targets(b).contiguous()
            with self.train_context(), context_parallel_shard(self, [inputs, positions, targets]):
                with autocast():
                    logits = model(inputs, positions=positions)
                    part = _local(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                  ignore_index=IGNORE, reduction="sum"))
                (part / denom).backward()
            loss_sum += part.detach().to(torch.float64)
        return loss_sum / denom  # as accumulate_gradients returns it

    def _pipeline_backward(self, objective, mine, autocast, denom: float) -> torch.Tensor:
        if not isinstance(objective, NextTokenLM):
            raise HerdError("pipeline parallel runs next-token objectives (NextTokenLM) only, for now")
        self._denominator[0] = denom
        has_first = any(f for f, _ in self.stage_infos)
        has_last = any(la for _, la in self.stage_infos)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in mine:
            args, kwargs, targets = _pipeline_inputs(objective, b)
            losses: list[torch.Tensor] = []
            with self.train_context(), autocast():
                self._schedule_for(args[0], True).step(*(args if has_first else ()), target=targets if has_last else None,
                                   losses=losses if has_last else None, return_outputs=False, **kwargs)
            for part in losses:
                loss_sum += _local(part).detach().to(torch.float64)
        # Only the last stage has the loss: a sum over the pipeline puts it on every rank.
        return self._all_reduce(loss_sum, ("pp",))

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm over every shard (DTensor pieces across dp/tp, stages across pp), then
        clip: what the single-process clip_grad_norm_ computes on the whole model. Expert-parallel
        weights live on their own mesh: each mesh's norm is completed over it (every expert counted
        once), and the squares add up."""
        from torch.distributed.tensor import DTensor

        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        norms = []
        for group in by_mesh.values():
            n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        if len(norms) == 1:
            norm = norms[0]
        elif norms:
            norm = (sum(n.to(torch.float64) ** 2 for n in norms) ** 0.5).to(norms[0].dtype)
        else:
            norm = torch.zeros(())
        if self.pipelined:
            sq = norm.to(self.device, torch.float64) ** 2
            norm = (self._all_reduce(sq, ("pp",)) ** 0.5).to(norm.dtype)
        for group in by_mesh.values():  # one foreach per mesh: DTensor ops do not mix meshes
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        return norm

    @torch.no_grad()
    def evaluate(self, model: nn.Module, objective, loader, n_batches: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 device: Any = None) -> float:
        """Mean validation loss over the first `n_batches` batches, each rank evaluating its share."""
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        terms = 0
        for i in range(min(n_batches, loader.batches_per_epoch)):
            b = self.share(loader.batch(i).to(self.device))
            terms += objective.num_terms(b)
            if self.pipelined:
                args, kwargs, targets = _pipeline_inputs(objective, b)
                losses: list[torch.Tensor] = []
                self._denominator[0] = 1.0
                has_first = any(f for f, _ in self.stage_infos)
                has_last = any(la for _, la in self.stage_infos)
                with self.train_context(), autocast():
                    self._schedule_for(args[0], False).eval(*(args if has_first else ()), target=targets if has_last else None,
                                       losses=losses if has_last else None, **kwargs)
                total += sum(float(_local(x)) for x in losses)
            else:
                with self.train_context(), autocast():
                    total += float(_local(objective.loss_sum(model, b)))
        model.train(was_training)
        if self.pipelined:
            total = self._all_reduce(total, ("pp",)).cpu()
        total = self._all_reduce(total, self._dp_dims()).cpu()
        n = self._all_reduce(torch.tensor(float(terms), dtype=torch.float64), self._dp_dims())
        # Context-parallel ranks share rows: their terms and losses are parts of the same rows.
        return float(total / max(float(n), 1.0))

    def shutdown(self) -> None:
        """Leave the process group at the end of a distributed run."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _pipeline_inputs(objective: NextTokenLM, batch) -> tuple[tuple, dict, torch.Tensor]:
    """The stage inputs NextTokenLM.loss_sum would give the whole model: tokens for the first stage,
    positions and (with document masking) the mask for every stage, targets for the last."""
    inputs, ids = batch.inputs, batch.doc_ids[:, :-1]
    if objective.document_masking:
        kwargs = {"positions": document_positions(ids), "mask": document_mask(ids)}
    else:
        B, T = inputs.shape
        kwargs = {"positions": torch.arange(T, device=inputs.device).expand(B, T).contiguous()}
    return (inputs,), kwargs, lm_targets(batch)


def parallelize(model: nn.Module, mesh, cfg: ParallelConfig, *, mixed_precision: bool = False,
                pipelined: bool = False) -> nn.Module:
    """Apply TP/SP (+ the EP hook) → activation checkpointing → per-block compile → FSDP2 to `model`
    (a herd decoder or a pipeline stage of one) in place, from outside (DESIGN principle 2). `mesh`
    is the 5-D mesh of `build_mesh` (None in a single process: only AC and compile apply)."""
    ep = 1
    if mesh is not None:
        size = {n: mesh[n].size() for n in MESH_DIMS}
        ep = mesh["ep"].size() if "ep" in mesh.mesh_dim_names else 1
        if ep > 1 or (size["tp"] > 1 and moe_layers(model)):  # MoE under tp is refused there (not built)
            apply_expert_parallel(model, mesh)
        if size["tp"] > 1:
            apply_tensor_parallel(model, mesh["tp"], cfg.loss_parallel)
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    if mesh is not None and size["dp_replicate"] * size["dp_shard"] * size["cp"] > 1:
        if size["cp"] > 1:
            shard_mesh = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
            dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if size["dp_replicate"] > 1 else shard_mesh
        else:
            dp_mesh = mesh["dp_replicate", "dp_shard"] if size["dp_replicate"] > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, mixed_precision=mixed_precision, pipelined=pipelined,
                   expert_mesh=mesh if ep > 1 else None)
    return model


@contextlib.contextmanager
def context_parallel_shard(parallel: Parallel, buffers: list[torch.Tensor]):
    """Shard `buffers` (tokens, positions, targets; sequence on dim 1) across the cp ranks for one
    forward+backward with PyTorch's context-parallel SDPA (ring attention, load-balanced causal
    chunks). GPU only; it needs the attention to call SDPA with is_causal=True and no explicit mask."""
    if parallel.d["cp"] == 1:
        yield
        return
    from torch.distributed.tensor.experimental import context_parallel

    with context_parallel(parallel.mesh["cp"], buffers=buffers, buffer_seq_dims=[1] * len(buffers)):
        yield
