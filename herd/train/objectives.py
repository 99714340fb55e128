"""Training objectives: what a batch is and how it becomes a loss (DESIGN principle 7).

The loop knows nothing of batches beyond what `Objective` offers: how many loss terms a batch holds
(so gradient accumulation can normalize by the tokens of the whole optimizer step, not per
micro-batch — torchtune issue #2307) and their summed loss. Next-token LM on packed documents is
here now; SFT, reward-model and DPO objectives plug into the same protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from herd.data.shards import PackedBatch

IGNORE = -100


class Objective(Protocol):
    def num_terms(self, batch: Any) -> int:
        """How many loss terms (e.g. predicted tokens) `batch` contributes."""
        ...

    def loss_sum(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The summed (not averaged) loss over those terms, a scalar tensor."""
        ...


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) → boolean (B, 1, T, T): query t may attend key s iff s <= t and both lie in the
    same document (SPEC §3.4: attention is masked between documents packed into one sequence)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) → RoPE positions (B, T) that restart at 0 at each document start, so a packed
    document sees the same positions as when it is run alone."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class _CrossEntropySum(torch.autograd.Function):
    """F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") in fewer passes over
    the (tokens × vocabulary) logits, for the CPU's eager step. torch's own backward writes a zero
    gradient for nll_loss, scatters into it, then reads it and the saved log-probabilities again in
    log_softmax's backward; here the log-probabilities become the gradient in place — exp (the
    softmax), minus one at each target, times the row's weight. At the `tiny` preset's shapes (2048
    tokens, vocabulary 8192) the loss's forward and backward fell from ~65 to ~32 ms a step on
    2 cores (bench/train_step.py); a compiled step keeps torch's, which Inductor fuses further."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, -1)
        keep = targets != IGNORE
        at = torch.where(keep, targets, 0)
        picked = logp.gather(1, at[:, None])[:, 0]
        ctx.save_for_backward(logp, at, keep)
        return -torch.where(keep, picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, at, keep = ctx.saved_tensors
        # the saved buffer is consumed: this graph cannot be run backward twice (nor is it)
        g = logp.exp_()
        g[torch.arange(len(at), device=at.device), at] -= 1
        g.mul_(torch.where(keep, grad, 0.0)[:, None].to(g.dtype))  # ignored rows: no gradient
        return g, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of logits (N, V) against targets (N,), IGNORE ignored."""
    # plain tensors only: a tensor-parallel run's logits are DTensors (loss parallel), which
    # torch's cross_entropy knows how to reduce across the vocabulary's shards
    if (type(logits) is torch.Tensor and logits.device.type == "cpu" and logits.requires_grad
            and not torch.compiler.is_compiling()):
        return _CrossEntropySum.apply(logits, targets)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def lm_targets(batch: PackedBatch) -> torch.Tensor:
    """Next-token targets (B, T); a target in a different document from its input is ignored (the
    last token of one document does not predict the first of the next)."""
    targets = batch.tokens[:, 1:].clone()
    targets[batch.doc_ids[:, 1:] != batch.doc_ids[:, :-1]] = IGNORE
    return targets


class NextTokenLM:
    """Next-token cross-entropy on packed documents with document-masked attention."""

    def __init__(self, document_masking: bool = True):
        self.document_masking = document_masking

    def num_terms(self, batch: PackedBatch) -> int:
        return int((batch.doc_ids[:, 1:] == batch.doc_ids[:, :-1]).sum())

    def loss_sum(self, model: nn.Module, batch: PackedBatch) -> torch.Tensor:
        inputs, ids = batch.inputs, batch.doc_ids[:, :-1]
        if self.document_masking:
            logits = model(inputs, positions=document_positions(ids), mask=document_mask(ids))
        else:
            logits = model(inputs)
        return cross_entropy_sum(logits.flatten(0, 1).float(), lm_targets(batch).flatten())


class Compiled:
    """An objective whose training loss (model forward + loss) runs as one torch.compile graph:
    the elementwise work between the matmuls (RMSNorm, RoPE, SwiGLU, residuals, the loss's softmax)
    fuses into a few kernels instead of a pass over memory each. Evaluation (no gradients) stays
    eager: a second graph would cost another compilation for a few batches."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self._loss = torch.compile(objective.loss_sum)

    def num_terms(self, batch: Any) -> int:
        return self.objective.num_terms(batch)

    def loss_sum(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._loss(model, batch)
        return self.objective.loss_sum(model, batch)

    def __getattr__(self, name: str) -> Any:  # the wrapped objective's own fields and helpers
        return getattr(self.objective, name)
