"""Distributed training checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes
its own shards in parallel, and a checkpoint saved under one layout (FSDP over 4 ranks, say) resumes
under any other (TP×FSDP, pipeline stages, or one process): DCP stores each tensor by its full
parameter name with its global shape and reshards on load. The paper's 16K-GPU run had 466 job
interruptions in 54 days (SPEC §3); restarting fast from the last checkpoint is what kept >90% of
the time effective.

A distributed checkpoint is a directory `ckpt-NNNNNNNN/` in the run directory, like the
single-process ones of herd/train/checkpoint.py (same naming, same atomic publish, same
`complete.json` written last), holding
    dcp/            {"model": ..., "optimizer": ...} as DCP shards + .metadata
    train_state.pt  step, tokens, data-loader position, RNG state, config (rank 0's)
    model/          for models up to 1B parameters, also the whole weights in Meta layout with the
                    run's tokenizer, so `herd generate`, `herd average` and `train.init_from` take the
                    checkpoint directly (gathered by rank 0 from the shards just written)
All ranks must see the same filesystem (a cluster's shared storage). `export` turns one into an
HF or Meta checkpoint (herd.checkpoint) in one process:

    herd export runs/llama3-8b/ckpt-00001000 out-hf --to hf
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from herd.data.shards import publish_dir
from herd.errors import HerdError, HerdWarning
from herd.train import checkpoint as ckpt

DCP_DIR = "dcp"


def model_class(args) -> type:
    """The herd decoder class for these args (Llama 4 MoE or dense Llama 3)."""
    from herd.models.llama3 import Transformer
    from herd.models.llama4 import Llama4Args
    from herd.models.llama4 import Transformer as Llama4Transformer

    return Llama4Transformer if isinstance(args, Llama4Args) else Transformer


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").exists()


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name (sharded as this run shards them)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save(trainer) -> Path:
    """Write the trainer's checkpoint for its current step from every rank (a collective call)."""
    import torch.distributed.checkpoint as dcp

    par, run_dir = trainer.parallel, trainer.run_dir
    dest = run_dir / ckpt.checkpoint_name(trainer.step)
    tmp = run_dir / f".{dest.name}.tmp-dcp"  # one name for all ranks; remove_partial cleans it up
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    dcp.save(_state_dicts(trainer.model, trainer.optimizer), checkpoint_id=tmp / DCP_DIR,
             no_dist=not par.distributed)
    if par.is_main:
        from herd.train.parallel import FULL_INIT_MAX_PARAMS

        files = [DCP_DIR, "train_state.pt"]
        if trainer.args.num_params() <= FULL_INIT_MAX_PARAMS:
            # the byte-level tokenizer too: without it a distributed debug run's checkpoint had none
            ckpt.write_model_dir(tmp / "model", trainer.args, _load_full(tmp / DCP_DIR, trainer.args),
                                 getattr(trainer, "tokenizer_files", []), getattr(trainer, "checkpoint_tokenizer", None))
            files.append("model")
        state = trainer._train_state()
        state.pop("optimizer")  # in dcp/, sharded
        state["layout"] = dict(par.d)
        torch.save(state, tmp / "train_state.pt")
        (tmp / "complete.json").write_text(json.dumps({"step": trainer.step, "format": "dcp", "files": files}))
        publish_dir(tmp, dest)
        keep = trainer.cfg.checkpoint.keep
        if keep > 0:
            for old in ckpt.list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    return dest


def restore(trainer, path: Path) -> None:
    """Continue the trainer from checkpoint `path`, whatever layout wrote it: a DCP checkpoint
    (resharded onto this run's layout, or gathered into one process), or a single-process one
    loaded into a distributed run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not ckpt.is_complete(path):
        raise HerdError(f"{path}: incomplete checkpoint (no complete.json); refusing to load it")
    par = trainer.parallel
    try:
        if is_distributed_checkpoint(path):
            states = _state_dicts(trainer.model, trainer.optimizer)
            with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(states, checkpoint_id=path / DCP_DIR, no_dist=not par.distributed)
            set_state_dict(trainer.model, trainer.optimizer, model_state_dict=states["model"],
                           optim_state_dict=states["optimizer"])
            state = ckpt.read_train_state(path)
        else:
            sd, state = ckpt.load_train_state(path)
            _load_single_process(trainer, sd, state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise HerdError(f"{path}: checkpoint does not fit this run's model/optimizer, or is damaged "
                        f"({(str(e).strip().splitlines() or [''])[0]})") from None
    except (OSError, AssertionError, EOFError, CheckpointException) as e:  # a missing shard, garbage .metadata
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise HerdError(f"{path}: corrupt or incomplete checkpoint ({type(e).__name__}: {first})") from None
    trainer._resume_position(state)
    was = state.get("layout")
    where = " × ".join(f"{k}={v}" for k, v in was.items() if v > 1) if was else "single process"
    trainer.log(f"resumed from {path} at step {trainer.step} (saved as {where or 'single process'}, "
                f"now {par.describe()})")


def _load_single_process(trainer, sd: dict[str, torch.Tensor], optim_state: dict) -> None:
    """A single-process checkpoint (Meta weights + AdamW state keyed by position) into a distributed
    run: the positions are mapped to parameter names in the order build_optimizer used on the whole
    model, then each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if trainer.args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    trainer.parallel.load_full_state_dict(trainer.model, sd)
    with torch.device("meta"):
        whole = model_class(trainer.args)(trainer.args)
    seen, decay, no_decay = set(), [], []
    for name, p in whole.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(name)
    order = decay + no_decay
    own = {n for n, _ in trainer.model.named_parameters()}
    groups = []
    for g in optim_state["param_groups"]:
        groups.append({**g, "params": [order[i] for i in g["params"] if order[i] in own]})
    full = {"state": {order[i]: s for i, s in optim_state["state"].items() if order[i] in own},
            "param_groups": groups}
    if not trainer.parallel.distributed:
        raise HerdError("a single-process checkpoint resumes in one process through herd.train.checkpoint")
    set_optimizer_state_dict(trainer.model, trainer.optimizer, full,
                             options=StateDictOptions(full_state_dict=True))


# ---- export -------------------------------------------------------------------------------------
def consolidate(path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(ModelArgs, full canonical state dict) of a DCP training checkpoint, gathered in this one
    process (no process group needed)."""
    from herd.train.config import load_config

    path = Path(path)
    if not is_distributed_checkpoint(path):
        hint = f"; it holds a model: herd convert {path / 'model'} OUT --to hf" if (path / "model").is_dir() else ""
        raise HerdError(f"{path}: not a distributed (DCP) training checkpoint (no {DCP_DIR}/.metadata){hint}")
    if not (path / "complete.json").exists():
        raise HerdError(f"{path}: incomplete checkpoint (no complete.json)")
    state = ckpt.read_train_state(path)
    if not isinstance(state.get("config"), dict):
        raise HerdError(f"{path / 'train_state.pt'}: holds no run config")
    args = load_config(data=state["config"]).model.args()
    return args, _load_full(path / DCP_DIR, args)


def _load_full(dcp_dir: Path, args) -> dict[str, torch.Tensor]:
    """The whole model's weights from DCP shards, in this process (canonical names)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    with torch.device("meta"):
        model = model_class(args)(args)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load({"model": sd}, checkpoint_id=dcp_dir, no_dist=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - truncated shards, a missing file, garbage .metadata
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise HerdError(f"{dcp_dir}: corrupt or incomplete distributed checkpoint ({type(e).__name__}: "
                            f"{first})") from None
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    return {k: v.detach() for k, v in sd.items()}


def export(path: str | Path, out: str | Path, fmt: str = "hf", dtype: str | None = None) -> Path:
    """Write a DCP training checkpoint as an HF or Meta (or GGUF) model checkpoint."""
    from herd.checkpoint import write_checkpoint

    args, sd = consolidate(path)
    return write_checkpoint(out, fmt, args, sd, dtype=dtype, tokenizer=_run_tokenizer(Path(path)))


def _run_tokenizer(path: Path):
    """The tokenizer the run trained with, so the export is a model `herd generate` and
    transformers' AutoTokenizer can use (it went out weights-only before): the one in the
    checkpoint's model/ when it has one, else the run config's data.tokenizer. None, with a
    warning, when neither can be read (a tokenizer file moved since the run, say)."""
    from herd.tokenizer import load_tokenizer

    model_dir = path / "model"
    spec = (ckpt.read_train_state(path).get("config") or {}).get("data", {}).get("tokenizer")
    try:
        if model_dir.is_dir() and any((model_dir / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            tok = load_tokenizer(model_dir)
        elif spec:
            tok = load_tokenizer(spec)
        else:
            return None
    except HerdError as e:
        warnings.warn(f"{path}: the run's tokenizer could not be read ({e}); exporting the weights only", HerdWarning, stacklevel=3)
        return None
    return tok  # as `herd convert ckpt-N/model` carries it for a single-process run


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a distributed (DCP) training checkpoint as an HF/Meta/GGUF model",
                              description="Gather a distributed training checkpoint (ckpt-N/ with dcp/) in one "
                                          "process and write it as a model checkpoint.")
    p.add_argument("checkpoint", help="a ckpt-NNNNNNNN directory written by a distributed run")
    p.add_argument("out", help="output directory (hf, meta) or .gguf file")
    p.add_argument("--to", default="hf", choices=["hf", "meta", "gguf"], help="output format (default: hf)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weight type to write (default: float32)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(a) -> None:
    print(f"wrote {export(a.checkpoint, a.out, a.to, a.dtype)}")
