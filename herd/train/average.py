"""Checkpoint averaging (SPEC §3.4.3: the final model is the Polyak average of the annealing
checkpoints; §4 also averages across runs).

`average_checkpoints` takes training checkpoints (`ckpt-N/`, whose `model/` is read) or any model
checkpoint herd.checkpoint reads, checks they share one architecture, and writes the uniform
(or weighted) average of their weights as a Meta-layout checkpoint, atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from herd.checkpoint import read_checkpoint, write_checkpoint
from herd.checkpoint.common import check_output_path, copy_model_extras, model_dir_of
from herd.errors import HerdError


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One finite weight > 0 per checkpoint (uniform when None). A zero or negative weight is
    refused rather than taken: with a negative one the result is no longer an average of the
    checkpoints (it extrapolates), and a zero one means the checkpoint should not be given."""
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise HerdError(f"{len(weights)} averaging weight(s) for {n} checkpoint(s): give one per checkpoint")
    out = []
    for i, w in enumerate(weights):
        try:
            x = float(w)
        except (TypeError, ValueError):
            x = math.nan
        if not (math.isfinite(x) and x > 0):
            raise HerdError(f"averaging weight {i + 1} is {w}: every weight must be a finite number > 0")
        out.append(x)
    return out


def _checkpoint_root(path: str | os.PathLike) -> Path:
    """What averaging reads for `path`: the training checkpoint `ckpt-N/` (or a run directory's
    newest one), else the model directory or file itself."""
    model = Path(model_dir_of(path))
    if model.name == "model" and (model.parent / "complete.json").exists():
        return model.parent
    return model


def check_out_apart(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """`out` is replaced by the average, so it may not be an input or hold one (a slip of `runs/c`
    for `runs/c/averaged` would take the run with it), nor lie inside a checkpoint read (it would
    change it). A run directory given as input stands for its newest checkpoint: a new directory
    beside its checkpoints (`runs/c/averaged`) is fine."""
    dest = Path(out).resolve()
    for p in paths:
        root = _checkpoint_root(p).resolve()
        for src in (Path(p).resolve(), root):
            if dest == src:
                how = "is"
            elif dest in src.parents:
                how = "contains"
            elif src == root and src in dest.parents:
                how = "lies inside"
            else:
                continue
            raise HerdError(f"output directory {out} {how} the checkpoint {p} being averaged; write the average "
                            "to a directory of its own (e.g. next to the checkpoints)")


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts with identical keys and shapes, accumulated in fp64."""
    if not state_dicts:
        raise HerdError("nothing to average")
    weights = check_weights(weights, len(state_dicts))
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
            acc += sd[k].double() * w
        # Divided once at the end, not each term by the total: with uniform weights the fp64 sum of
        # fp32 weights is exact, so this is the mean rounded once. Adding x·(1/3) terms put each
        # exact tie between two fp32 values a hair to one side: 0.16% of a 3-checkpoint average's
        # weights came out 1 ulp from the mean that torch.mean in fp64 (or any reference) gives.
        out[k] = (acc / total).to(ref.dtype)
    return out


def average_checkpoints(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                        weights: Sequence[float] | None = None) -> Path:
    if not paths:
        raise HerdError("give at least one checkpoint to average")
    # Everything that can be refused is checked before the (possibly large) checkpoints are read.
    # An empty path is Path("") == ".": "output directory  contains the checkpoint" named neither.
    if any(not str(p).strip() for p in paths):
        raise HerdError("a checkpoint path is empty; give the checkpoint directories to average")
    if not str(out).strip():
        raise HerdError("the output directory (--out) is empty; give a directory")
    check_weights(weights, len(paths))
    check_out_apart(paths, out)
    check_output_path(out, directory=True)
    ckpts = [read_checkpoint(model_dir_of(p)) for p in paths]
    args = ckpts[0].args
    for p, c in zip(paths, ckpts, strict=True):
        if c.args != args:
            raise HerdError(f"{p}: different model configuration from {paths[0]}; cannot average")
    sd = average_state_dicts([c.state_dict for c in ckpts], weights)
    out = write_checkpoint(out, "meta", args, sd)
    copy_model_extras(model_dir_of(paths[0]), out)  # the tokenizer travels with the weights
    return out
