"""Checkpoints in every format, one canonical model (DESIGN principles 3 and 4).

`read_checkpoint` turns a Hugging Face directory, a Meta directory or a GGUF file into a
`Checkpoint` (ModelArgs + a Meta-named state dict); `write_checkpoint` writes any of them back;
`build_model` puts a state dict into a `Transformer` without materializing random weights first;
`convert` chains the two, carrying the tokenizer along when herd.tokenizer can load it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from herd.checkpoint.common import atomic_path, check_output_path, check_state_dict, read_json_config
from herd.checkpoint.gguf import read_gguf, read_gguf_args, write_gguf
from herd.checkpoint.hf import args_from_hf_config, read_hf, write_hf
from herd.checkpoint.meta import read_meta, read_meta_args, write_meta
from herd.errors import HerdError, HerdWarning
from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer
from herd.models.llama4 import Llama4Args
from herd.models.llama4 import Transformer as Llama4Transformer

Format = Literal["hf", "meta", "gguf"]
FORMATS: tuple[str, ...] = ("hf", "meta", "gguf")
_GGUF_MAGIC = b"GGUF"

__all__ = ["FORMATS", "Checkpoint", "build_model", "convert", "detect_format", "load_weights", "read_args",
           "read_checkpoint", "write_checkpoint"]


@dataclass
class Checkpoint:
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]  # canonical names; tied models omit output.weight
    format: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)  # config.json / params.json / GGUF fields


def _is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def detect_format(path: str | Path) -> str:
    """"hf" (directory with config.json), "meta" (directory with params.json) or "gguf" (a file
    starting with the GGUF magic, or a directory holding exactly one .gguf)."""
    path = Path(path)
    if not path.exists():
        raise HerdError(f"{path}: no such file or directory")
    if path.is_file():
        if _is_gguf_file(path):
            return "gguf"
        if path.suffix == ".gguf":
            raise HerdError(f"{path}: not a GGUF file (no GGUF magic bytes; truncated or corrupt?)")
        if path.suffix in (".pth", ".safetensors", ".json"):
            raise HerdError(f"{path}: give the directory holding it; a checkpoint is a directory with "
                            "config.json (Hugging Face) or params.json (Meta)")
        raise HerdError(f"{path}: not a checkpoint (expected a .gguf file or a directory with "
                        "config.json or params.json)")
    hf, meta = (path / "config.json").exists(), (path / "params.json").exists()
    if hf and meta:  # which one? the one with weights; refused when both have them
        hf_weights = next(path.glob("*.safetensors"), None) or next(path.glob("pytorch_model*.bin"), None)
        meta_weights = next(path.glob("*.pth"), None)
        if hf_weights is not None and meta_weights is not None:
            raise HerdError(f"{path}: holds two checkpoints, Hugging Face (config.json, {hf_weights.name}) and "
                            f"Meta (params.json, {meta_weights.name}): move one to its own directory")
        return "meta" if meta_weights is not None else "hf"
    if hf:
        return "hf"
    if meta:
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    hint = f"; it holds {len(ggufs)} .gguf files, name one" if ggufs else ""
    raise HerdError(f"{path}: not a checkpoint directory (no config.json or params.json){hint}")


def _resolve(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf" and path.is_dir():
        path = next(path.glob("*.gguf"))
    return path, fmt


def read_checkpoint(path: str | Path) -> Checkpoint:
    path, fmt = _resolve(path)
    reader = {"hf": read_hf, "meta": read_meta, "gguf": read_gguf}[fmt]
    args, sd, metadata = reader(path)
    return Checkpoint(args=args, state_dict=sd, format=fmt, path=path, metadata=metadata)


def read_args(path: str | Path) -> ModelArgs:
    """The ModelArgs of a checkpoint without loading (or dequantizing) its weights."""
    path, fmt = _resolve(path)
    if fmt == "hf":  # read_json_config: a config.json holding a list or a string is one line too
        return args_from_hf_config(read_json_config(path), str(path / "config.json"))
    return read_meta_args(path) if fmt == "meta" else read_gguf_args(path)


_TORCH_DTYPES = {"f32": torch.float32, "float32": torch.float32, "fp32": torch.float32,
                 "f16": torch.float16, "float16": torch.float16, "fp16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _torch_dtype(dtype: str | torch.dtype | None, fmt: str) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _TORCH_DTYPES[dtype.lower()]
    except KeyError:
        raise HerdError(f"dtype {dtype!r} is not supported for {fmt} output "
                        "(float32, float16 or bfloat16; quantized types are GGUF-only)") from None


# The files of the other directory layout: replacing a directory that holds them with an `fmt`
# checkpoint deletes a checkpoint (`herd convert model/ model/ --to meta` would delete its input).
_OTHER_LAYOUT = {"hf": ("params.json", "consolidated.*.pth"), "meta": ("config.json", "*.safetensors")}


def check_replaceable(path: Path, fmt: str) -> None:
    """Refuse an output that would replace a checkpoint of another format or a file that is not a
    GGUF: atomic_path replaces model-output files, and these are model outputs too, just not ones
    this write brings back."""
    if fmt == "gguf":
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise HerdError(f"{path} exists and is not a GGUF file; writing the model there would replace "
                                    "it: give a new file name")
        return
    if path.is_dir():
        for pattern in _OTHER_LAYOUT[fmt]:
            found = sorted(path.glob(pattern))
            if found:
                raise HerdError(f"{path} holds a checkpoint in another layout ({found[0].name}); writing a {fmt} "
                                "checkpoint there would delete it: choose a new or empty directory")


def hf_generation_fields(tokenizer: Any) -> tuple[dict, dict]:
    """(config.json's special-token ids, generation_config.json) for an HF export, so that
    transformers' `generate` stops and suppresses as herd's does. Without them transformers falls
    back to LlamaConfig's defaults (bos 1, eos 2): it stopped on whatever token 2 is in the run's
    vocabulary and ran on past the real end of text, end of turn and end of message. herd never
    samples a reserved special token (herd.api.reserved_ids); `suppress_tokens` says the same to
    transformers, else its greedy choice of one (likely in an under-trained model) diverged."""
    if tokenizer is None or getattr(tokenizer, "eos_id", None) is None:
        return {}, {}
    from herd.api import reserved_ids

    eos = [tokenizer.eos_id, *sorted(set(tokenizer.stop_ids) - {tokenizer.eos_id})]
    special: dict[str, Any] = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    if tokenizer.bos_id is not None:
        special["bos_token_id"] = tokenizer.bos_id
    if tokenizer.pad_id is not None:
        special["pad_token_id"] = tokenizer.pad_id
    generation = dict(special)
    if suppress := reserved_ids(tokenizer):
        generation["suppress_tokens"] = list(suppress)
    return special, generation


def write_checkpoint(path: str | Path, fmt: str, args: ModelArgs, state_dict: dict[str, torch.Tensor], *,
                     dtype: str | torch.dtype | None = None, tokenizer: Any = None,
                     source_metadata: dict | None = None, model_parallel: int = 1) -> Path:
    """Write `state_dict` as `fmt` at `path` (a directory for hf/meta, a file for gguf), atomically.

    dtype: hf/meta take float32/float16/bfloat16 (default: as given); gguf takes F32 (default),
    F16, BF16 or Q8_0. tokenizer: an object with `.save(dir, layout)` and `.write_gguf(writer)`
    (herd.tokenizer), or None. source_metadata: the metadata of the checkpoint being converted;
    a GGUF source's tokenizer and general.* fields are copied into a GGUF output when no tokenizer
    is given. model_parallel: number of consolidated.NN.pth shards for meta output."""
    path = Path(path)
    if fmt not in FORMATS:
        raise HerdError(f"unknown checkpoint format {fmt!r} (choose {', '.join(FORMATS)})")
    check_output_path(path, directory=fmt != "gguf")  # a user's files, a training checkpoint's model/
    check_replaceable(path, fmt)
    if fmt == "gguf":
        if isinstance(args, Llama4Args):
            raise HerdError("GGUF output is not supported for Llama 4 (mixture-of-experts) models; use hf or meta")
        if isinstance(dtype, torch.dtype):
            dtype = _DTYPE_NAMES.get(dtype, str(dtype))
        gguf_meta = source_metadata if source_metadata and "general.architecture" in source_metadata else None
        write_gguf(path, args, state_dict, dtype=dtype,
                   tokenizer_writer=None if tokenizer is None else tokenizer.write_gguf,
                   source_metadata=gguf_meta)
        return path
    torch_dtype = _torch_dtype(dtype, fmt)
    with atomic_path(path, directory=True) as tmp:  # refused before the work when it cannot be written
        if fmt == "hf":
            sd = state_dict if torch_dtype is None else {k: v.to(torch_dtype) for k, v in state_dict.items()}
            stored = torch_dtype or next((v.dtype for v in state_dict.values()), torch.float32)
            special, generation = hf_generation_fields(tokenizer)
            write_hf(tmp, args, sd, config_extra={"torch_dtype": _DTYPE_NAMES.get(stored, "float32"), **special})
            if generation:
                (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        else:
            write_meta(tmp, args, state_dict, dtype=torch_dtype, model_parallel=model_parallel)
        if tokenizer is not None:
            tokenizer.save(tmp, fmt)
    return path


def load_weights(model: Transformer, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """Load a canonical state dict into `model` by assignment (no copy into pre-made tensors), tying
    the output to the embeddings when the model's args say so."""
    args = model.args
    if isinstance(args, Llama4Args):  # Llama 4: its own names and shapes (hf_llama4.py)
        from herd.checkpoint.hf_llama4 import check_llama4_state_dict

        check = check_llama4_state_dict
    else:
        check = check_state_dict
    sd = check(state_dict, args, "state dict")
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True replaced both; share again
    return model


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """A `Transformer` holding `state_dict`, built on the meta device so no random weights are ever
    allocated (DESIGN principle 3), in eval mode. Tensors already of `dtype` on `device` become the
    parameters as they are (shared with `state_dict`, not copied)."""
    with torch.device("meta"):
        if isinstance(args, Llama4Args):
            from herd.models.vision import Llama4Multimodal  # the text model plus the image encoder

            model = Llama4Transformer(args) if args.vision is None else Llama4Multimodal(args)
        else:
            model = Transformer(args)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    load_weights(model, sd)
    model.init_buffers(device)
    return model.eval()


def _load_source_tokenizer(ckpt: Checkpoint):
    """The source's tokenizer via herd.tokenizer, or None (with a warning) when there is none."""
    try:
        from herd.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata
    except ImportError:
        warnings.warn("herd.tokenizer is not available: converting weights only", HerdWarning, stacklevel=3)
        return None
    try:
        if ckpt.format == "gguf":  # already parsed; re-reading the file would take seconds
            tok = tokenizer_from_gguf_metadata(ckpt.metadata)
        else:
            tok = load_tokenizer(ckpt.path)
    except HerdError as e:
        warnings.warn(f"no tokenizer carried over ({e}); converting weights only", HerdWarning, stacklevel=3)
        return None
    if tok is None:
        warnings.warn(f"{ckpt.path}: no tokenizer in the source; converting weights only", HerdWarning, stacklevel=3)
    elif tok.vocab_size > ckpt.args.vocab_size:
        raise HerdError(f"{ckpt.path}: vocabulary mismatch: tokenizer has {tok.vocab_size} tokens, "
                        f"model {ckpt.args.vocab_size}")
    return tok


def convert(src: str | Path, dst: str | Path, to: str, *, dtype: str | torch.dtype | None = None,
            model_parallel: int = 1, tokenizer: bool = True) -> Checkpoint:
    """Read the checkpoint at `src` (any format) and write it as `to` at `dst`; returns what was read.
    The tokenizer travels with it when herd.tokenizer can load one from `src`."""
    if to not in FORMATS:
        raise HerdError(f"unknown checkpoint format {to!r} (choose {', '.join(FORMATS)})")
    ckpt = read_checkpoint(src)
    tok = None
    # GGUF → GGUF copies the tokenizer fields verbatim (write_gguf's source_metadata path).
    if tokenizer and not (ckpt.format == "gguf" and to == "gguf"):
        tok = _load_source_tokenizer(ckpt)
    write_checkpoint(dst, to, ckpt.args, ckpt.state_dict, dtype=dtype, tokenizer=tok,
                     source_metadata=ckpt.metadata if ckpt.format == "gguf" else None,
                     model_parallel=model_parallel)
    return ckpt
