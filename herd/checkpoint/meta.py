"""Meta's own layout: `params.json` + `consolidated.NN.pth` (one file per model-parallel rank).

This is what `llama model download` and llama-models' `Llama3.build` read. Each `.pth` holds a
flat dict of Meta-named tensors (already our canonical names and RoPE layout), so the work here is
the config and the model-parallel shards:

* column-parallel weights (wq, wk, wv, w1, w3, output) are split on dim 0, row-parallel ones
  (wo, w2) on dim 1, norms replicated (fairscale's Column/RowParallelLinear); the biases of an
  `attention_bias` / `mlp_bias` model follow fairscale too: a column-parallel bias is split with
  its weight's rows, a row-parallel one (added once, after the reduce) replicated;
* `tok_embeddings` is split on dim 0 (the vocabulary) in Llama 3, whose model uses fairscale's
  `VocabParallelEmbedding`, and on dim 1 in Llama 1/2 (`ParallelEmbedding`); we tell them apart
  by shape, as transformers' `convert_llama_weights_to_hf.py` does by version;
* when there are more ranks than KV heads (405B on 16 GPUs), each rank holds a copy of its KV
  head, so consecutive wk/wv shards repeat (llama-models' `reshard_mp`, `repeat_qk_qv`).

params.json cannot say everything a foreign model needs (an explicit FFN width, a head dim other
than dim/n_heads, tied embeddings, the RoPE scaling constants, the context length, biases), so we also write
a nested `"herd": {...}` object. Meta's readers ignore unknown keys (`ModelArgs.__init__` only sets
attributes it has), and a top-level `max_seq_len` would even break `Llama3.build`, which passes its
own `max_seq_len=` next to `**params`.

Files are read with `torch.load(weights_only=True, mmap=True)`: tensors only, nothing executed.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from herd.checkpoint.common import atomic_path, check_state_dict, config_bool, config_int, refuse_nonfinite
from herd.checkpoint.meta_llama4 import (
    is_llama4_params,
    llama4_args_from_params,
    read_meta_llama4,
    write_meta_llama4,
)
from herd.errors import HerdError
from herd.models.args import DynamicNtkRopeScaling, LinearRopeScaling, ModelArgs, RopeScaling, YarnRopeScaling
from herd.models.llama4 import Llama4Args

PARAMS = "params.json"

# Which dim each weight is split on across model-parallel ranks (None: replicated).
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight",
                    "attention.wq.bias", "attention.wk.bias", "attention.wv.bias",
                    "feed_forward.w1.bias", "feed_forward.w3.bias")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
# KV projections: each rank holds whole KV heads (copies when there are more ranks than heads)
_KV = ("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")
# Derived buffers some Meta checkpoints carry (Llama 1/2 stored `rope.freqs`); never weights.
_DERIVED = ("rope.freqs", "freqs_cis")

# Meta's reference `apply_scaling` hard-codes these; only the factor differs between releases.
_META_LOW_FREQ, _META_HIGH_FREQ, _META_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def _split_dim(name: str) -> int | None:
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


# ---- config --------------------------------------------------------------------------------------
def args_from_params(params: dict, *, tied: bool = False, vocab_size: int | None = None,
                     source: str = PARAMS) -> ModelArgs:
    """ModelArgs from a params.json dict.

    `tied` and `vocab_size` come from the weights when params.json cannot say: Llama 2 files have
    `vocab_size: -1`, and Llama 3.2 1B/3B (the tied ones) mean RoPE factor 32 by `use_scaled_rope`
    where 3.1 means 8 — transformers' converter decides by release, we decide by the weights.
    """
    params = params.get("model", params)  # some exports nest the model args
    extra = params.get("herd") or {}
    if not isinstance(extra, dict):
        raise HerdError(f"{source}: 'herd' must be an object")
    try:
        tied = config_bool(extra, "tie_embeddings", tied)
        scaling = None
        if "rope_scaling" in extra:
            if extra["rope_scaling"] is not None:
                s = dict(extra["rope_scaling"])
                kind = s.pop("rope_type", "llama3")  # written by herd since linear/yarn; llama3 before
                if kind == "linear":
                    scaling = LinearRopeScaling(factor=float(s["factor"]))
                elif kind == "dynamic":
                    scaling = DynamicNtkRopeScaling(factor=float(s["factor"]))
                elif kind == "yarn":
                    scaling = YarnRopeScaling(**s)
                elif kind == "llama3":
                    scaling = RopeScaling(factor=float(s["factor"]), low_freq_factor=float(s["low_freq_factor"]),
                                          high_freq_factor=float(s["high_freq_factor"]),
                                          original_max_position_embeddings=int(s["original_max_position_embeddings"]))
                else:
                    raise HerdError(f"{source}: herd.rope_scaling type {kind!r} is not supported "
                                    "(llama3, linear, yarn, dynamic)")
        elif params.get("use_scaled_rope"):
            # Llama 4's params.json names the factor; Llama 3's reference hard-codes 8 (3.1) and the
            # 3.2 text models were trained with 32 (HF configs and transformers' converter agree).
            factor = params.get("rope_scaling_factor") or (32.0 if tied else 8.0)
            scaling = RopeScaling(factor=float(factor),
                                  low_freq_factor=_META_LOW_FREQ,
                                  high_freq_factor=float(params.get("rope_high_freq_factor") or _META_HIGH_FREQ),
                                  original_max_position_embeddings=_META_ORIGINAL_CONTEXT)
        n_heads = config_int(params, "n_heads")
        vocab = config_int(params, "vocab_size", -1)
        if vocab <= 0:
            if vocab_size is None:
                raise HerdError(f"{source}: vocab_size is {vocab} and no embedding to infer it from")
            vocab = vocab_size
        ffn_mult = params.get("ffn_dim_multiplier")
        default_ctx = 131072 if scaling is not None else 8192
        return ModelArgs(
            dim=config_int(params, "dim"), n_layers=config_int(params, "n_layers"), n_heads=n_heads,
            n_kv_heads=config_int(params, "n_kv_heads") if params.get("n_kv_heads") else n_heads, vocab_size=vocab,
            multiple_of=config_int(params, "multiple_of", 256),
            ffn_dim_multiplier=None if ffn_mult is None else float(ffn_mult),
            ffn_hidden_dim=None if extra.get("ffn_hidden_dim") is None else config_int(extra, "ffn_hidden_dim"),
            head_dim=None if extra.get("head_dim") is None else config_int(extra, "head_dim"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            # Llama 1/2 params.json have no rope_theta: their code used 10000.
            rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
            max_seq_len=config_int(extra, "max_seq_len", default_ctx), tie_embeddings=tied,
            attention_bias=config_bool(extra, "attention_bias", False), mlp_bias=config_bool(extra, "mlp_bias", False),
        )
    except KeyError as e:
        raise HerdError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HerdError(f"{source}: malformed value ({e})") from None


def params_from_args(args: ModelArgs) -> dict:
    """params.json for `args`: Meta's keys, chosen so Meta's sizing rule gives our FFN width, plus
    the `herd` object for what Meta's keys cannot express."""
    multiple_of, ffn_mult = args.multiple_of, args.ffn_dim_multiplier
    if args.ffn_hidden_dim is not None and args.replace(ffn_hidden_dim=None).ffn_dim != args.ffn_hidden_dim:
        # A foreign width (SmolLM2's 1536 for dim 576): with multiple_of = width and a multiplier
        # that lands at or just under it, Meta's round-up rule reproduces it exactly.
        multiple_of = args.ffn_hidden_dim
        ffn_mult = args.ffn_hidden_dim / int(2 * (4 * args.dim) / 3)
    s = args.rope_scaling
    llama3 = isinstance(s, RopeScaling)
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_mult,
        "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        # Meta's flag means llama3 scaling only. Linear/YaRN/dynamic NTK have no Meta key: they live
        # in the `herd` object (what herd reads back; training checkpoints are this layout, so refusing
        # would stop fine-tuning such a model), and Meta's reference code would run them as plain
        # RoPE (for dynamic NTK that is right within the context; herd keeps it for an HF export).
        "use_scaled_rope": llama3,
    }
    if llama3 and s.factor != 8.0:
        params["rope_scaling_factor"] = s.factor  # Llama 4's key for the same thing
    herd: dict = {"tie_embeddings": args.tie_embeddings, "max_seq_len": args.max_seq_len,
                  "rope_scaling": None if s is None else {"rope_type": s.kind, **dataclasses.asdict(s)}}
    if args.ffn_hidden_dim is not None:
        herd["ffn_hidden_dim"] = args.ffn_hidden_dim
    if args.head_dim is not None and args.head_dim != args.dim // args.n_heads:
        herd["head_dim"] = args.head_dim  # Meta's Llama 3 code cannot run this; Llama 4's reads it
    for key in ("attention_bias", "mlp_bias"):  # nor these (its linears have no bias)
        if getattr(args, key):
            herd[key] = True
    params["herd"] = herd
    return params


# ---- reading -------------------------------------------------------------------------------------
def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from one .pth, refusing anything but plain tensor data."""
    if not path.is_file():
        raise HerdError(f"{path}: no such file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) .pth
    except pickle.UnpicklingError as e:
        # weights_only's unpickler stops at the first global that is not a tensor type, before
        # anything is called; name it rather than print torch's page of advice.
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        what = f"the global {found.group(1)}" if found else "an object that is not a tensor"
        raise HerdError(f"{path}: refusing to load: the pickle references {what} (code, not weights); "
                        "only plain tensor checkpoints are read") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        # First sentence only: torch appends a paragraph of advice to its zip errors.
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise HerdError(f"{path}: unreadable or truncated .pth file ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # training checkpoints nest the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HerdError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if not k.endswith(_DERIVED)}


def shard_paths(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        files = sorted(path.glob("*.pth"))  # llama-models itself globs *.pth
    if not files:
        raise HerdError(f"{path}: params.json but no consolidated.*.pth weights")
    return files


def merge_shards(shards: list[dict[str, torch.Tensor]], args_dim: int, n_kv_heads: int,
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Undo model parallelism: one canonical dict from the per-rank dicts (see module docstring)."""
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))[0]
            raise HerdError(f"{source}: model-parallel shard {i} and shard 0 disagree on weight {diff!r}")
    n = len(shards)
    out = {}
    for name in names:
        parts = [s[name] for s in shards]
        if name == "tok_embeddings.weight":
            dim = 0 if parts[0].shape[1] == args_dim else 1
        else:
            dim = _split_dim(name)
        if dim is None:
            if any(not torch.equal(p, parts[0]) for p in parts[1:]):
                raise HerdError(f"{source}: replicated weight {name!r} differs between model-parallel shards")
            out[name] = parts[0]
            continue
        if name.endswith(_KV) and n > n_kv_heads and n % n_kv_heads == 0:
            parts = parts[:: n // n_kv_heads]  # one copy of each replicated KV head
        out[name] = torch.cat(parts, dim=dim)
    return out


def _read_params(path: Path) -> dict:
    try:
        params = json.loads((path / PARAMS).read_text(encoding="utf-8"), parse_constant=refuse_nonfinite)
    except (OSError, ValueError) as e:  # as read_json_config: UTF-8, no NaN or Infinity
        raise HerdError(f"{path / PARAMS}: cannot read ({e})") from None
    if not isinstance(params, dict):
        raise HerdError(f"{path / PARAMS}: expected a JSON object")
    inner = params.get("model", params)
    for key in ("dim", "n_heads", "n_layers"):
        if key not in inner:
            raise HerdError(f"{path / PARAMS}: missing key {key!r}")
    return params


def _read_weights(path: Path, params: dict) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    inner = params.get("model", params)
    n_kv = int(inner.get("n_kv_heads") or inner["n_heads"])
    shards = [load_pth(f) for f in shard_paths(path)]  # memory-mapped: nothing read yet
    sd = merge_shards(shards, int(inner["dim"]), n_kv, str(path))
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    tied = emb is not None and (out is None or (out.shape == emb.shape and torch.equal(out, emb)))
    args = args_from_params(params, tied=tied, vocab_size=None if emb is None else emb.shape[0],
                            source=str(path / PARAMS))
    return args, sd


def read_meta(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], dict]:
    """→ (args, canonical state dict in the stored dtype, the raw params.json)."""
    path = Path(path)
    params = _read_params(path)
    if is_llama4_params(params):  # MoE/iRoPE/vision: its own names and shards (meta_llama4.py)
        return read_meta_llama4(path, params)
    args, sd = _read_weights(path, params)
    return args, check_state_dict(sd, args, str(path)), params


def read_meta_args(path: str | Path) -> ModelArgs:
    """Just the config. params.json alone cannot say whether embeddings are tied (which also decides
    the RoPE factor of `use_scaled_rope`), so unless our `herd` block says, the weights are opened
    memory-mapped to look."""
    path = Path(path)
    params = _read_params(path)
    if is_llama4_params(params):
        return llama4_args_from_params(params, str(path / PARAMS))
    if "tie_embeddings" in (params.get("model", params).get("herd") or {}):
        return args_from_params(params, source=str(path / PARAMS))
    return _read_weights(path, params)[0]


# ---- writing -------------------------------------------------------------------------------------
def split_shards(sd: dict[str, torch.Tensor], args: ModelArgs, n: int) -> list[dict[str, torch.Tensor]]:
    """Cut a canonical dict into `n` model-parallel ranks as Meta's code lays them out."""
    sizes = {"n_heads": args.n_heads, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
    if bad or (args.kv_heads % n and n % args.kv_heads):
        raise HerdError(f"cannot split into {n} model-parallel shards: "
                        f"{', '.join(bad) or f'n_kv_heads={args.kv_heads}'} not divisible")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in sd.items():
        dim = 0 if name == "tok_embeddings.weight" else _split_dim(name)
        if dim is None:
            pieces = [t] * n
        elif name.endswith(_KV) and n > args.kv_heads:
            heads = t.chunk(args.kv_heads, dim=0)
            pieces = [heads[i * args.kv_heads // n] for i in range(n)]
        else:
            pieces = list(t.chunk(n, dim=dim))
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece
    return shards


def write_meta(path: str | Path, args: ModelArgs, sd: dict[str, torch.Tensor], *,
               model_parallel: int = 1, dtype: torch.dtype | None = None,
               extra_files: dict[str, str] | None = None) -> None:
    """Write params.json + consolidated.00.pth (… .NN with `model_parallel` > 1) atomically.

    The .pth always carries `output.weight`, even for tied models, because Meta's Transformer has a
    separate output layer and loads strictly."""
    if isinstance(args, Llama4Args):  # Llama 4's published names and expert layout (meta_llama4.py)
        write_meta_llama4(path, args, sd, model_parallel=model_parallel, dtype=dtype, extra_files=extra_files)
        return
    sd = check_state_dict(sd, args, "model")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    shards = split_shards(sd, args, model_parallel) if model_parallel > 1 else [sd]
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / PARAMS).write_text(json.dumps(params_from_args(args), indent=2))
        for i, shard in enumerate(shards):
            torch.save({k: _own_storage(v) for k, v in shard.items()}, tmp / f"consolidated.{i:02d}.pth")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole base storage; copy views so each file holds only its data.
    (A tensor saved under two names, like tied embeddings, is still written once.)"""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / PARAMS).exists()
