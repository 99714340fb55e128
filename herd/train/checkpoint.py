"""Training checkpoints: everything a run needs to continue exactly (DESIGN principle 12).

A checkpoint is a directory `ckpt-NNNNNNNN/` in the run directory holding
    model/          the weights as a Meta-layout checkpoint (params.json + consolidated.00.pth),
                    readable by herd.checkpoint, `herd generate --model` and `herd average`
    train_state.pt  optimizer, scheduler step, data-loader position, all RNG states, metrics so far
    complete.json   written last: step and the names of the files above
It is built under a hidden temporary name, fsynced, then renamed, so a kill mid-write leaves either
no `ckpt-*` directory or a complete one; `latest_checkpoint` also refuses any directory without
`complete.json`, and nothing else is ever loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.checkpoint.common import MODEL_INFO
from herd.checkpoint.meta import write_meta
from herd.data.shards import publish_dir
from herd.errors import HerdError
from herd.models.args import ModelArgs

_NAME = re.compile(r"^ckpt-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, step: int, args: ModelArgs,
                    model_state: dict[str, torch.Tensor], train_state: dict[str, Any], keep: int = 0,
                    model_files: Sequence[Path] = (), tokenizer: Any = None) -> Path:
    """Write checkpoint `ckpt-<step>` atomically. `model_files` (the run's tokenizer files) are copied
    into `model/` so the checkpoint is a complete model directory for `herd generate`, marked as a
    base model (no chat format: pre-training does not teach one). `tokenizer` (post-training: a loaded
    herd tokenizer, chat format included) is written there instead, as `herd sft/dpo/reward` export it,
    so `herd eval` or `herd generate --model run/ckpt-N/model` works on any checkpoint."""
    run_dir = Path(run_dir)
    dest = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sd = {k: v.detach().to("cpu", copy=True) for k, v in model_state.items()}
        if args.tie_embeddings:
            sd.pop("output.weight", None)
        write_model_dir(tmp / "model", args, sd, model_files, tokenizer)
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "complete.json").write_text(json.dumps({"step": step, "files": ["model", "train_state.pt"]}))
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def write_model_dir(dest: Path, args: ModelArgs, sd: dict[str, torch.Tensor], model_files: Sequence[Path] = (),
                    tokenizer: Any = None) -> None:
    """A checkpoint's model/ (this module's and the DCP layout's, herd/train/dist_checkpoint.py):
    Meta-layout weights, the run's tokenizer files copied or `tokenizer` written, and a base-model
    marker unless the tokenizer brings a chat format (post-training's does)."""
    write_meta(dest, args, sd)
    for f in model_files:
        shutil.copyfile(f, dest / Path(f).name)
    if tokenizer is not None:
        tokenizer.save(dest, "meta")
    if model_files or (tokenizer is not None and tokenizer.chat is None):
        (dest / MODEL_INFO).write_text(json.dumps({"chat_format": False}) + "\n")


def is_complete(path: Path) -> bool:
    try:
        info = json.loads((path / "complete.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all((path / f).exists() for f in info.get("files", [])) and _NAME.match(path.name) is not None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (hidden temporary directories never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _NAME.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def remove_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint directories that a killed writer left behind; returns them.
    (One process writes a run directory at a time.)"""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.glob(".ckpt-*.tmp-*") if p.is_dir()] if run_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# What a herd run directory holds besides its checkpoints (ckpt-N/) and hidden temporaries: the run's
# config and metrics (herd/train/loop.py, metrics.py), a staged run's recipe, post-training exports
# (model/, lora/) and an annealing stage's Polyak average (averaged/, herd/train/recipe.py).
RUN_DIR_ENTRIES = frozenset({"config.json", "metrics.jsonl", "loss.png", "tensorboard", "recipe.toml", "model",
                             "lora", "averaged"})


def check_run_dir(run_dir: Path) -> None:
    """Refuse (one line) a run directory holding what a run did not write: a run writes config.json,
    metrics.jsonl, loss.png and exports over their namesakes, so `--out` pointed at a model checkpoint
    or a folder of the user's would lose them. Checked before any training."""
    from herd.checkpoint.common import check_output_path

    if not run_dir.is_dir():
        return
    for entry in sorted(run_dir.iterdir()):
        if not (entry.name.startswith(".") or _NAME.match(entry.name) or entry.name in RUN_DIR_ENTRIES):
            raise HerdError(f"{run_dir} holds {entry.name!r}, which a herd run does not write; it would be mixed "
                            "with (or lost to) this run's files: choose a new or empty run directory (--out)")
    config = run_dir / "config.json"
    if config.exists():
        try:
            ours = {"model", "train"} <= set(json.loads(config.read_text()))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise HerdError(f"{config} is not a herd run's config (a model checkpoint's?); it would be "
                            "overwritten: choose a new or empty run directory (--out)")
    for export in ("model", "lora", "averaged"):
        check_output_path(run_dir / export, directory=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_train_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, train state) of a complete checkpoint."""
    from herd.checkpoint.meta import read_meta

    if not is_complete(path):
        raise HerdError(f"{path}: incomplete checkpoint (no complete.json); refusing to load it")
    try:
        _, sd, _ = read_meta(path / "model")
    except (OSError, RuntimeError, EOFError) as e:
        raise HerdError(f"{path}: corrupt checkpoint ({e})") from None
    return sd, read_train_state(path)


def read_train_state(path: Path) -> dict[str, Any]:
    """`path/train_state.pt` (any checkpoint layout), or one line saying it is damaged."""
    f = path / "train_state.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises almost any type
        raise HerdError(f"{f}: corrupt ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise HerdError(f"{f}: not a herd training state (no step)")
    return state
