"""Checkpoint averaging (SPEC §3.4.3: the final model is the Polyak average of the annealing
checkpoints; §4 also averages across runs).

`average_checkpoints` takes training checkpoints (`ckpt-N/`, whose `model/` is read) or any model
checkpoint herd.checkpoint reads, checks they share one architecture, and writes the uniform
(or weighted) average of their weights as a Meta-layout checkpoint, atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from herd.checkpoint import read_checkpoint, write_checkpoint
from herd.checkpoint.common import copy_model_extras, model_dir_of
from herd.errors import HerdError


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts with identical keys and shapes, accumulated in fp64."""
    if not state_dicts:
        raise HerdError("nothing to average")
    weights = list(weights) if weights is not None else [1.0] * len(state_dicts)
    if len(weights) != len(state_dicts) or sum(weights) <= 0:
        raise HerdError("averaging weights must be one positive number per checkpoint")
    keys = set(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != keys:
            raise HerdError(f"checkpoint {i} has different weights from checkpoint 0 (e.g. "
                            f"{sorted(set(sd) ^ keys)[0]!r})")
    total = float(sum(weights))
    out = {}
    for k, ref in state_dicts[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for sd, w in zip(state_dicts, weights, strict=True):
            if sd[k].shape != ref.shape:
                raise HerdError(f"shape mismatch for {k}: {tuple(sd[k].shape)} vs {tuple(ref.shape)}")
            acc += sd[k].double() * (w / total)
        out[k] = acc.to(ref.dtype)
    return out


def average_checkpoints(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                        weights: Sequence[float] | None = None) -> Path:
    if not paths:
        raise HerdError("give at least one checkpoint to average")
    ckpts = [read_checkpoint(model_dir_of(p)) for p in paths]
    args = ckpts[0].args
    for p, c in zip(paths, ckpts, strict=True):
        if c.args != args:
            raise HerdError(f"{p}: different model configuration from {paths[0]}; cannot average")
    sd = average_state_dicts([c.state_dict for c in ckpts], weights)
    out = write_checkpoint(out, "meta", args, sd)
    copy_model_extras(model_dir_of(paths[0]), out)  # the tokenizer travels with the weights
    return out
