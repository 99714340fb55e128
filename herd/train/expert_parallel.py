"""Expert parallelism (EP) for Llama 4's MoE layers (issue 6), applied from outside the model
(DESIGN principle 2), after torchtitan's `expert_parallel.py`.

Mesh. EP borrows its ranks from FSDP's data-parallel dim, as torchtitan does: with `parallel.ep=P`
the dp_shard dim of size D is built as two dims, dp_shard_mod_ep (D/P, outer) × ep (P, inner), and
the two are flattened back into "dp_shard" (`build_mesh`). So data loading, the loss
normalization and FSDP of every non-expert weight see exactly the D data-parallel ranks they see
without EP; only the experts use the split:

    6-D mesh [pp, dp_replicate, dp_shard_mod_ep, ep, cp, tp];  dp_shard = flatten(dp_shard_mod_ep, ep)

A 2-process run with ep=2 has dp_shard=2 (each rank reads half of the batch), dp_shard_mod_ep=1
and ep=2 (each rank holds half of the experts). EP combines with FSDP and HSDP only: tp, cp and pp
are refused with it (MoE tensor parallel is not built; pipeline stages are dense-only).

Weights. Each MoE layer's `experts` module is swapped for `ExpertParallelExperts`, whose w1, w2, w3
keep their names and global shapes (E, ·, ·) as DTensors sharded Shard(0) over "ep" — rank i holds
the contiguous block `llama4.local_experts(E, i, P)`. FSDP then shards those local blocks over
dp_shard_mod_ep (and replicates over dp_replicate) only: expert weights are never all-gathered over
the ep dim. Because they are DTensors, the distributed checkpoint stores them with their full
shapes and canonical names, and it reshards onto any other layout (one process included).

Tokens. MoE.forward routes and sorts its (token, expert) rows by expert and calls
`experts(rows, counts)`. Here every rank exchanges its per-expert counts (all_to_all_single), then
the rows themselves (an autograd all-to-all: rows for expert block i go to ep rank i), runs its
local experts' grouped matmuls over the rows of all ranks, and sends the outputs back in the
original order; MoE.forward then adds them with the router weights as in one process.

Gradients. The all-to-all's backward returns each row's gradient to the rank that owns the token,
and brings every rank's tokens' contribution to the owner of each expert: a local expert's
gradient already sums over the whole ep group of P ranks. Scaled by 1/P in backward, then averaged
by FSDP over dp_shard_mod_ep (and dp_replicate), it is divided by every data-parallel rank, as the
non-expert gradients are, so both equal the single-process gradient of the global batch. (FSDP's
own `set_gradient_divide_factor` would say the same, but its one-rank path divided twice in torch
2.13 with the sum-then-divide gloo needs, and that path differs between releases; FSDP's default
average is what every other weight already relies on.)
`clip_grad_norm` adds the squared norms of the expert DTensors (each expert counted once, on its
own mesh) and of the other weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.models.llama4 import Experts, MoE, grouped_mm, local_experts, shard_experts


def check_expert_parallel(ep: int, args) -> None:
    """Refuse an EP degree this model cannot be sharded by (a one-line HerdError)."""
    if ep == 1:
        return
    n = getattr(args, "n_experts", 0)
    if not n:
        raise HerdError(f"parallel.ep={ep} needs a mixture-of-experts model (a Llama 4 preset); this model is dense")
    if n % ep:
        raise HerdError(f"parallel.ep={ep} does not divide the model's {n} experts")


class ExpertParallelExperts(nn.Module):
    """Drop-in for `MoE.experts` (rows sorted by expert, `counts` (E,) → one output row per input
    row) holding only this rank's block of experts; the tokens of the whole ep group travel to the
    rank that holds their expert and back (module docstring)."""

    def __init__(self, experts: Experts, ep_mesh):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        self.ep_mesh = ep_mesh
        self.n_experts = experts.w1.shape[0]
        rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
        local = shard_experts(experts, rank, size)  # the model's own hook: this rank's block of dim 0
        for name in ("w1", "w2", "w3"):
            full, part = getattr(experts, name), getattr(local, name)
            # Shard(0) over ep is exactly local_experts' contiguous blocks (E is a multiple of P).
            dt = DTensor.from_local(part.detach(), ep_mesh, [Shard(0)], run_check=False,
                                    shape=full.shape, stride=full.stride())
            setattr(self, name, nn.Parameter(dt, requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        from torch.distributed.tensor import DTensor

        group = self.ep_mesh.get_group()
        P = self.ep_mesh.size()
        mine = local_experts(self.n_experts, self.ep_mesh.get_local_rank(), P)
        E_local = len(mine)
        # 1. Counts: row s of `received` is what rank s sends each of this rank's experts.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=group)
        received = received.view(P, E_local)
        send_splits = counts.view(P, E_local).sum(1).tolist()  # rows are sorted by expert: contiguous
        recv_splits = received.sum(1).tolist()
        # 2. The rows, grouped (source rank, local expert) on arrival; regroup by local expert.
        rows = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)
        expert_of_row = torch.arange(E_local, device=x.device).repeat(P).repeat_interleave(received.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        local_counts = received.sum(0)
        # The local weights' gradient sums the whole ep group's tokens; FSDP then averages it over
        # the other grad_ranks / P data-parallel ranks only, so 1/P makes it an average over all.
        w1, w2, w3 = (_ScaleGrad.apply(w.to_local() if isinstance(w, DTensor) else w, 1.0 / P)
                      for w in (self.w1, self.w2, self.w3))
        h = rows[order]
        # Experts.forward on the local block: SwiGLU through grouped matmuls over each expert's rows.
        out = grouped_mm(F.silu(grouped_mm(h, w1, local_counts)) * grouped_mm(h, w3, local_counts), w2, local_counts)
        # 3. Back to arrival order, then to the ranks the rows came from.
        back = torch.empty_like(out).index_copy(0, order, out)
        return all_to_all_single_autograd(back, send_splits, recv_splits, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def apply_expert_parallel(model: nn.Module, mesh) -> None:
    """Swap every MoE layer's experts for their expert-parallel shard over `mesh["ep"]` (in place,
    parameter names unchanged). Any other mesh (no ep dim, or tp > 1) is refused."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise HerdError("parallel.ep > 1 needs a mixture-of-experts model (a Llama 4 preset); this model is dense")
    names = () if mesh is None else mesh.mesh_dim_names
    tp = mesh["tp"].size() if "tp" in names else 1
    if "ep" not in names or tp > 1:
        why = "parallel.tp > 1" if tp > 1 else "no 'ep' mesh dim"
        raise HerdError(f"tensor/expert parallelism for Llama 4 MoE layers is not implemented on this mesh ({why}); "
                        "shard the experts with parallel.ep over the dp_shard ranks, without tp")
    for m in moes:
        if not isinstance(m.experts, ExpertParallelExperts):
            m.experts = ExpertParallelExperts(m.experts, mesh["ep"])


def expert_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def shard_experts_fsdp(model: nn.Module, mesh, kw: dict, reshard: bool) -> None:
    """FSDP2 over the expert weights' own data-parallel dims (dp_shard_mod_ep, and dp_replicate
    under HSDP), before the blocks are wrapped so the blocks' FSDP leaves them out. FSDP's default
    average over this smaller mesh, after the 1/P of the forward, divides the expert gradients by
    all data-parallel ranks, as the other gradients are (module docstring)."""
    from torch.distributed.fsdp import fully_shard

    dims = ("dp_replicate", "dp_shard_mod_ep") if mesh["dp_replicate"].size() > 1 else ("dp_shard_mod_ep",)
    for m in expert_modules(model):
        fully_shard(m, reshard_after_forward=reshard, **{**kw, "mesh": mesh[dims]})
