"""Broken checkpoints give one clear HerdError line, never a traceback or a silently wrong model
(DESIGN principle 12) — and a pickle that asks to run code is refused without running it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from herd.checkpoint import convert, detect_format, read_checkpoint, write_checkpoint
from herd.checkpoint.gguf import write_gguf
from herd.errors import HerdError
from herd.models.args import PRESETS
from tests.reference import random_state_dict

ARGS = PRESETS["debug"]


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(ARGS)


def _truncate(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# ---- finding the checkpoint ----------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(HerdError, match="no such file or directory") as e:
        read_checkpoint(tmp_path / "nope")
    _one_line(e)


def test_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(HerdError, match="no config.json or params.json"):
        detect_format(tmp_path)


def test_file_that_is_no_checkpoint(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(HerdError, match="not a GGUF file"):
        detect_format(tmp_path / "x.gguf")
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(HerdError, match="not a checkpoint"):
        detect_format(tmp_path / "w.bin")


# ---- truncated files -----------------------------------------------------------------------------
def test_truncated_safetensors(tmp_path, state_dict):
    write_checkpoint(tmp_path / "hf", "hf", ARGS, state_dict)
    _truncate(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(HerdError, match="truncated safetensors") as e:
        read_checkpoint(tmp_path / "hf")
    _one_line(e)


def test_truncated_pth(tmp_path, state_dict):
    write_checkpoint(tmp_path / "meta", "meta", ARGS, state_dict)
    _truncate(tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(HerdError, match="unreadable or truncated .pth") as e:
        read_checkpoint(tmp_path / "meta")
    _one_line(e)


@pytest.mark.parametrize("keep", [0.999, 0.6, 0.01])
def test_truncated_gguf(tmp_path, state_dict, keep):
    write_checkpoint(tmp_path / "m.gguf", "gguf", ARGS, state_dict)
    _truncate(tmp_path / "m.gguf", keep)
    with pytest.raises(HerdError, match="truncated") as e:
        read_checkpoint(tmp_path / "m.gguf")
    _one_line(e)


def test_missing_shard_and_missing_weights(tmp_path, state_dict):
    write_checkpoint(tmp_path / "meta", "meta", ARGS, state_dict)
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    with pytest.raises(HerdError, match="no consolidated"):
        read_checkpoint(tmp_path / "meta")
    partial = {k: v for k, v in state_dict.items() if not k.startswith("layers.1.feed_forward.")}
    torch.save(partial, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(HerdError, match=r"missing 3 weight\(s\), first 'layers.1.feed_forward.w1"):
        read_checkpoint(tmp_path / "meta")
    # a whole layer missing is said in layers
    partial = {k: v for k, v in state_dict.items() if not k.startswith("layers.1.")}
    torch.save(partial, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(HerdError, match=r"the config says 2 layers but the weights hold 1 "):
        read_checkpoint(tmp_path / "meta")


# ---- code in a pickle ----------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_callable_is_refused_not_run(tmp_path, state_dict):
    write_checkpoint(tmp_path / "meta", "meta", ARGS, state_dict)
    marker = tmp_path / "pwned"
    evil = dict(state_dict)
    evil["norm.weight"] = _RunsCode(marker)
    torch.save(evil, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(HerdError, match=r"refusing to load.*(posix|os|nt)\.system") as e:
        read_checkpoint(tmp_path / "meta")
    _one_line(e)
    assert not marker.exists()


# ---- config and weights disagree -----------------------------------------------------------------
def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_config_weight_shape_mismatch(tmp_path, state_dict):
    write_checkpoint(tmp_path / "hf", "hf", ARGS, state_dict)
    _edit_json(tmp_path / "hf" / "config.json", intermediate_size=ARGS.ffn_dim * 2)
    with pytest.raises(HerdError, match="shape mismatch for layers.0.feed_forward.w1.weight"):
        read_checkpoint(tmp_path / "hf")
    write_checkpoint(tmp_path / "meta", "meta", ARGS, state_dict)
    _edit_json(tmp_path / "meta" / "params.json", n_kv_heads=4)
    with pytest.raises(HerdError, match="shape mismatch for layers.0.attention.wk.weight"):
        read_checkpoint(tmp_path / "meta")


def test_vocab_mismatch(tmp_path, state_dict):
    write_checkpoint(tmp_path / "hf", "hf", ARGS, state_dict)
    _edit_json(tmp_path / "hf" / "config.json", vocab_size=ARGS.vocab_size + 64)
    with pytest.raises(HerdError, match="vocabulary mismatch: tok_embeddings.weight has 512 rows, config says vocab_size=576"):
        read_checkpoint(tmp_path / "hf")
    # GGUF: the tokenizer written through the callback has more tokens than the embedding has rows
    # (fewer are padded to the model's vocabulary: test_foreign_dirs.py).
    def tokenizer_writer(w: GGUFWriter):
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(ARGS.vocab_size + 1)])

    write_gguf(tmp_path / "v.gguf", ARGS, state_dict, tokenizer_writer=tokenizer_writer)
    with pytest.raises(HerdError, match="vocabulary mismatch: tokenizer has 513 tokens, model 512"):
        read_checkpoint(tmp_path / "v.gguf")


# ---- GGUF files herd does not handle -------------------------------------------------------------
def _raw_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_vocab_size(64)
    for name, (arr, raw) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_non_llama_architecture(tmp_path):
    _raw_gguf(tmp_path / "q.gguf", "qwen2", {"token_embd.weight": (np.zeros((64, 32), np.float32), None)})
    with pytest.raises(HerdError, match="architecture 'qwen2' is not supported"):
        read_checkpoint(tmp_path / "q.gguf")


def test_unsupported_quant_type(tmp_path):
    # IQ4_NL: 32 weights in 18 bytes; llama.cpp-only grids we do not read.
    raw = np.zeros((64, 32 // 32 * 18), np.uint8)
    _raw_gguf(tmp_path / "iq.gguf", "llama", {"token_embd.weight": (raw, GGMLQuantizationType.IQ4_NL)})
    with pytest.raises(HerdError, match="quantization type IQ4_NL, which herd cannot read"):
        read_checkpoint(tmp_path / "iq.gguf")


def test_unexpected_tensor(tmp_path):
    # a q norm (Qwen3/OLMo style), which Llama does not have (its optional biases are read:
    # tests/checkpoint/test_bias.py)
    _raw_gguf(tmp_path / "b.gguf", "llama", {"blk.0.attn_q_norm.weight": (np.zeros(8, np.float32), None)})
    with pytest.raises(HerdError, match="unexpected tensor 'blk.0.attn_q_norm.weight'"):
        read_checkpoint(tmp_path / "b.gguf")


# ---- asking for what cannot be written -----------------------------------------------------------
def test_unwritable_requests(tmp_path, state_dict):
    with pytest.raises(HerdError, match="GGUF output type 'q4_k' is not supported"):
        write_checkpoint(tmp_path / "m.gguf", "gguf", ARGS, state_dict, dtype="q4_k")
    with pytest.raises(HerdError, match="quantized types are GGUF-only"):
        write_checkpoint(tmp_path / "hf", "hf", ARGS, state_dict, dtype="q8_0")
    with pytest.raises(HerdError, match="unknown checkpoint format 'onnx'"):
        convert(tmp_path / "m.gguf", tmp_path / "x", "onnx")
    with pytest.raises(HerdError, match="cannot split into 3 model-parallel shards"):
        write_checkpoint(tmp_path / "meta", "meta", ARGS, state_dict, model_parallel=3)
    assert not (tmp_path / "meta").exists() and not (tmp_path / "m.gguf").exists()  # nothing half-written
