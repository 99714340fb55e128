"""Pieces every checkpoint format shares: atomic file writes, the canonical state-dict contract,
and checks that turn a mismatched checkpoint into one clear error."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from herd.errors import HerdError
from herd.models.args import ModelArgs

# What herd's directory outputs (model checkpoints in every layout, with their tokenizer and notes;
# LoRA adapters) consist of. Replacing a directory that holds only such files loses nothing the
# output does not bring back (re-running `herd convert X out/` into its own earlier output); any
# other file in it is something the user made, and replacing the directory would delete it.
_OUTPUT_NAMES = frozenset({
    "config.json", "generation_config.json", "params.json", "model.safetensors.index.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "herd_model.json", "adapter.json", "adapter_config.json"})
_OUTPUT_PATTERNS = ("*.safetensors", "consolidated.*.pth")


def _foreign_entry(directory: Path) -> Path | None:
    """The first entry of `directory` that is not part of a model output (a subdirectory always is
    foreign: no directory output has one), or None."""
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            return entry
        if entry.name not in _OUTPUT_NAMES and not any(entry.match(p) for p in _OUTPUT_PATTERNS):
            return entry
    return None


def check_output_path(dest: str | os.PathLike, *, directory: bool | None = None) -> None:
    """Refuse (HerdError, one line) to write an output at `dest` when that would destroy something:
    an existing directory holding files that are not a model output's, the `model/` of a training
    checkpoint, a file where a directory goes or a directory where a file goes. `directory`: whether
    the output is a directory (None: not known yet; only what is wrong either way is refused).
    An existing file where a file output goes is fine: it is replaced, as asked."""
    dest = Path(dest)
    parent = next((d for d in dest.parents if d.exists()), None)
    if parent is not None and not parent.is_dir():
        raise HerdError(f"{parent} is a file, not a folder; {dest} cannot be written inside it")
    if dest.is_symlink():
        if directory:  # a directory cannot be renamed onto a link; writing through it would replace its target
            raise HerdError(f"{dest} is a symbolic link; give the output a new path (or the link's target)")
        return
    if dest.is_dir():
        if directory is False:
            raise HerdError(f"{dest} is a directory; this output is a file: give a file path")
        if (dest.parent / "complete.json").exists():
            raise HerdError(f"{dest} is part of the training checkpoint {dest.parent}; replacing it would "
                            "change the checkpoint: write the output to a new directory")
        foreign = _foreign_entry(dest)
        if foreign is not None:
            raise HerdError(f"{dest} holds {foreign.name!r}, which is not part of a model output and would be "
                            "lost when the directory is replaced: choose a new or empty directory")
    elif dest.exists() and directory:
        raise HerdError(f"{dest} is a file; this output is a directory: give a directory path")


@contextmanager
def atomic_path(dest: str | os.PathLike, *, directory: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds, so a
    crash never leaves a half-written file (or directory) under the final name.

    An existing `dest` is replaced only where check_output_path allows it, checked before the block
    (so a refused output costs no work) and again once the block has shown whether it wrote a file
    or a directory. `directory`: whether the block writes a directory, when the caller knows."""
    dest = Path(dest)
    check_output_path(dest, directory=directory)
    # Renames work on the absolute, normalized path: "out/.." or "." has no usable name of its own.
    full = Path(os.path.abspath(dest))
    try:
        full.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{full.name}.", dir=full.parent)) / full.name
    except OSError as e:  # no permission, a read-only disk, ...
        raise HerdError(f"{dest}: cannot create the output's folder ({e.strerror or e})") from None
    try:
        yield tmp
        is_dir = tmp.is_dir()
        check_output_path(dest, directory=is_dir)
        if is_dir and full.is_dir():
            # Moved aside into the fresh temporary folder (no leftover of an earlier run can hold
            # the name), which the cleanup below removes with it; a failed rename puts it back.
            old = tmp.parent / ".old"
            full.rename(old)
            try:
                tmp.rename(full)
            except OSError:
                old.rename(full)
                raise
        else:
            os.replace(tmp, full)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The canonical (Meta-named) state dict of a dense model, name → shape."""
    d, hd, f = args.dim, args.hd, args.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
        # transformers' attention_bias / mlp_bias: one bias per projection, the weight's output rows
        if args.attention_bias:
            shapes.update({p + "attention.wq.bias": (args.n_heads * hd,), p + "attention.wk.bias": (args.kv_heads * hd,),
                           p + "attention.wv.bias": (args.kv_heads * hd,), p + "attention.wo.bias": (d,)})
        if args.mlp_bias:
            shapes.update({p + "feed_forward.w1.bias": (f,), p + "feed_forward.w2.bias": (d,),
                           p + "feed_forward.w3.bias": (f,)})
    return shapes


def check_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, source: str) -> dict[str, torch.Tensor]:
    """Verify names and shapes against `args`; return the dict with tied `output.weight` dropped.
    Raises HerdError naming the first problem (vocab mismatch called out, as it is the usual one)."""
    sd = dict(sd)
    if args.tie_embeddings:
        out = sd.pop("output.weight", None)
        if out is not None and "tok_embeddings.weight" in sd and not torch.equal(out, sd["tok_embeddings.weight"]):
            raise HerdError(f"{source}: config ties embeddings but output.weight differs from tok_embeddings.weight")
    def vocab_hint(k: str, got: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
        if k in ("tok_embeddings.weight", "output.weight") and got[1:] == shape[1:]:
            return f"vocabulary mismatch: {k} has {got[0]} rows, config says vocab_size={shape[0]}"
        return None

    check_layer_count(sd, args.n_layers, source)
    want = expected_shapes(args)
    stray = next((k for k in sd if k not in want and k.endswith(".bias")), None)
    if stray is not None:  # name the flag: the weights have biases the config does not ask for
        flag = "attention_bias" if ".attention." in stray else "mlp_bias"
        raise HerdError(f"{source}: unexpected bias {stray!r}: the config says {flag}=false "
                        "(dropping it would compute a different model)")
    return check_shapes(sd, want, source, f"a {args.n_layers}-layer dense model", vocab_hint)


_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def check_layer_count(sd: dict, n_layers: int, source: str) -> None:
    """The config may not ask for more layers than the weights hold. Checked before the expected
    names are listed: a config.json of 10**9 layers beside 2 layers of weights built a dict of
    billions of names for minutes before it named the first one missing."""
    present = 1 + max((int(m.group(1)) for k in sd if (m := _LAYER_INDEX.match(k))), default=-1)
    if n_layers > present:
        raise HerdError(f"{source}: the config says {n_layers} layers but the weights hold {present} "
                        "(truncated checkpoint or config/weights mismatch?)")


def check_shapes(sd: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], source: str, model: str,
                 hint=None) -> dict[str, torch.Tensor]:
    """`sd` must hold exactly the names of `want`, with those shapes; else a one-line HerdError
    naming the first problem. `hint(name, got, expected)` may name a mismatch more precisely."""
    missing = [k for k in want if k not in sd]
    if missing:
        raise HerdError(f"{source}: missing {len(missing)} weight(s), first {missing[0]!r} "
                        "(truncated checkpoint or config/weights mismatch?)")
    extra = [k for k in sd if k not in want]
    if extra:
        raise HerdError(f"{source}: unexpected weight {extra[0]!r} for {model}")
    for k, shape in want.items():
        got = tuple(sd[k].shape)
        if got != shape:
            raise HerdError(f"{source}: " + ((hint and hint(k, got, shape))
                                             or f"shape mismatch for {k}: checkpoint {got}, config expects {shape}"))
    return sd


# ---- HF-style directories: config.json + safetensors (sharded with an index) ---------------------
def refuse_nonfinite(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def read_json_config(path: Path, name: str = "config.json") -> dict:
    # UTF-8 as JSON requires (not the locale's encoding); a file of other bytes is the one error line,
    # not a UnicodeDecodeError traceback. NaN and Infinity, which Python's json accepts beyond the
    # standard, are refused: rms_norm_eps=Infinity built a model that answered zeros without a word.
    try:
        cfg = json.loads((path / name).read_text(encoding="utf-8"), parse_constant=refuse_nonfinite)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HerdError(f"{path / name}: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise HerdError(f"{path / name}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def config_int(cfg: dict, key: str, default: int | None = None) -> int:
    """cfg[key] as a whole number (a JSON integer, or a float like 48.0): int() truncated a
    fractional 48.5 to 48, took true for 1 and "72" for 72, where transformers' config refuses all
    three. KeyError when missing without a default."""
    value = cfg[key] if default is None else cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    return int(value)


def config_bool(cfg: dict, key: str, default: bool) -> bool:
    """cfg[key] as a JSON boolean: bool("false") is True, so a quoted flag meant its opposite."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r}")
    return value


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `path`'s safetensors files, chosen as transformers chooses them:
    model.safetensors alone when it exists, else the index's shards, else (herd's own leniency)
    every *.safetensors; without any, of its PyTorch `pytorch_model*.bin` files (older transformers
    exports), read with `weights_only=True` so a pickle cannot run code. A tensor name stored in two
    of the files read is refused: which copy won depended on the files' names."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        # Only this one: another *.safetensors beside it (an adapter, a stray copy, the shards of
        # an older save) replaced the model's tensors of the same name, while transformers reads
        # model.safetensors alone.
        files = ["model.safetensors"]
    elif index.exists():
        files = _index_files(index)
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        return _read_torch_bin_dir(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            loaded = load_file(path / f)
        except FileNotFoundError:
            raise HerdError(f"{path / f}: shard listed in the index is missing") from None
        except (SafetensorError, OSError) as e:
            raise HerdError(f"{path / f}: unreadable or truncated safetensors file ({e})") from None
        _merge_unique(tensors, loaded, path, f)
    return tensors


def _merge_unique(tensors: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], path: Path, f: str) -> None:
    twice = sorted(loaded.keys() & tensors.keys())
    if twice:
        raise HerdError(f"{path / f}: tensor {twice[0]!r} is also stored in another weights file of {path} "
                        "(which copy is the model's?)")
    tensors.update(loaded)


def _index_files(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HerdError(f"{index}: malformed index ({type(e).__name__}: {e})") from None


def _read_torch_bin_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "pytorch_model.bin.index.json"
    if (path / "pytorch_model.bin").is_file():  # as transformers reads it (see read_safetensors_dir)
        files = ["pytorch_model.bin"]
    elif index.exists():
        files = _index_files(index)
    else:
        files = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if not files:
        raise HerdError(f"{path}: no *.safetensors (or pytorch_model*.bin) weights next to config.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            try:  # memory-mapped: a large shard is not read into memory twice
                loaded = torch.load(path / f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # mmap needs the zip format; files from torch < 1.6 are not
                loaded = torch.load(path / f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise HerdError(f"{path / f}: shard listed in the index is missing") from None
        except Exception as e:  # truncated zip, a pickle of something other than tensors, ...
            raise HerdError(f"{path / f}: unreadable PyTorch weights file ({type(e).__name__}: {e})") from None
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise HerdError(f"{path / f}: expected a dict of tensors (a state dict), got {type(loaded).__name__}")
        _merge_unique(tensors, loaded, path, f)
    return tensors


def write_safetensors_dir(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], *,
                          max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, str] | None = None) -> None:
    """Write config.json and the tensors atomically, in shards of at most `max_shard_bytes` with a
    model.safetensors.index.json when there is more than one (transformers' layout)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)


# ---- what travels with the weights ---------------------------------------------------------------
# A model directory may hold herd's own note on how to use the model. {"chat_format": false} marks a
# base (pre-trained) model: text prompts are completed as they are, not wrapped in the tokenizer's
# chat format, since pre-training does not teach one (herd/api.py reads it; herd/train writes it).
MODEL_INFO = "herd_model.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_model_info(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / MODEL_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError too
        raise HerdError(f"{path}: corrupt ({e})") from None
    return info if isinstance(info, dict) else {}


def copy_model_extras(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files and MODEL_INFO of one model directory into another (averaging or
    converting a trained checkpoint keeps its tokenizer). Returns the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    for name in (*TOKENIZER_FILES, MODEL_INFO):
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def model_dir_of(path: str | os.PathLike) -> Path:
    """A training checkpoint (`ckpt-N/` with `model/` and `complete.json`, herd/train/checkpoint.py)
    stands for its `model/` directory, a training run directory (with `metrics.jsonl`) for its
    newest complete checkpoint's; any other path for itself."""
    path = Path(path)
    if (path / "model").is_dir() and (path / "complete.json").exists():
        return path / "model"
    if path.is_dir() and (path / "metrics.jsonl").exists():
        ckpts = sorted(p for p in path.glob("ckpt-[0-9]*") if (p / "complete.json").exists() and (p / "model").is_dir())
        if ckpts:  # names are zero-padded steps: the last is the newest
            return ckpts[-1] / "model"
    return path
