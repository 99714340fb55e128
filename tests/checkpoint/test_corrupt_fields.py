"""Checkpoints corrupted in one field, read through the `herd` command: each is one error line and
exit status 2, never a traceback, a hang or a model that runs on wrong numbers.

GGUF tensor offsets follow ggml's own reader (gguf_init_from_file: each tensor's data starts where
the previous one ends, padded to the alignment, else "tensor '...' has offset X, expected Y").
"""

from __future__ import annotations

import json
import shutil
import struct
import time

import numpy as np
import pytest
from gguf import GGUFReader

from herd.checkpoint import read_checkpoint, write_checkpoint
from herd.checkpoint.gguf import open_gguf
from herd.errors import HerdError
from herd.models.args import ModelArgs
from tests.cli_errors import run_cli_error
from tests.reference import random_state_dict

TINY = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    sd = random_state_dict(TINY)
    return {fmt: write_checkpoint(root / name, fmt, TINY, sd)
            for fmt, name in (("hf", "hf"), ("meta", "meta"), ("gguf", "m.gguf"))}


def _copy(src, dst):
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# ---- GGUF tensor data offsets ---------------------------------------------------------------------
def _field_offset(data: bytes, name: str) -> int:
    """Byte position of tensor `name`'s data offset (u64) in its tensor info."""
    i = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, i)
    return i + 4 + 8 * n_dims + 4


def test_gguf_offsets_as_written_are_what_ggml_expects(saved):
    """The rule the reader now enforces, checked on gguf-py's own reading of a file gguf-py wrote:
    every tensor starts at the previous one's end rounded up to the alignment."""
    reader = GGUFReader(saved["gguf"])
    expected = reader.data_offset
    for t in reader.tensors:
        assert t.data_offset == expected, t.name
        expected += -(-int(t.n_bytes) // reader.alignment) * reader.alignment
    assert len(open_gguf(saved["gguf"]).tensors) == len(reader.tensors)


@pytest.mark.parametrize("value", [0, 32], ids=["first-tensor's-data", "aligned-but-wrong"])
def test_gguf_tensor_offset_pointing_at_other_data_is_refused(saved, tmp_path, capsys, value):
    """A corrupted offset that stays inside the file read another tensor's bytes as this one's
    weights: the model loaded and generated garbage, exit status 0."""
    data = bytearray(saved["gguf"].read_bytes())
    reader = GGUFReader(saved["gguf"])
    victim = reader.tensors[-1].name
    pos = _field_offset(bytes(data), victim)
    data[pos:pos + 8] = struct.pack("<Q", value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(HerdError, match=rf"tensor '{victim}' has data offset {value}, expected \d+"):
        read_checkpoint(bad)
    line = run_cli_error(["info", str(bad)], capsys)
    assert victim in line and "data offset" in line


def test_gguf_tensor_type_changed_in_place_is_refused(saved, tmp_path):
    """F32 → Q4_0 in a tensor info: the tensor reads fewer bytes, so the next one is not where ggml
    expects it (it was dequantized garbage, loaded without a word)."""
    data = bytearray(saved["gguf"].read_bytes())
    first = GGUFReader(saved["gguf"]).tensors[0].name
    pos = _field_offset(bytes(data), first) - 4
    assert struct.unpack_from("<I", data, pos)[0] == 0  # F32
    data[pos:pos + 4] = struct.pack("<I", 2)  # Q4_0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(HerdError, match="has data offset"):
        read_checkpoint(bad)


# ---- GGUF metadata values -------------------------------------------------------------------------
def _patch_meta(src, dst, key: str, fmt: str, value) -> None:
    data = src.read_bytes()
    i = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key) + 4
    dst.write_bytes(data[:i] + struct.pack(fmt, value) + data[i + struct.calcsize(fmt):])


@pytest.mark.parametrize("key, fmt, value, message", [
    ("llama.attention.head_count", "<I", 0, "head_count (0) must be positive"),  # was ZeroDivisionError
    ("llama.attention.head_count", "<I", 3, "embedding_length (32) is not divisible by llama.attention.head_count (3)"),
    ("llama.rope.freq_base", "<f", float("inf"), "freq_base must be a finite number"),  # was OverflowError
    ("llama.rope.freq_base", "<f", float("nan"), "freq_base must be a finite number"),  # was ValueError
    # an infinite epsilon built a model whose logits were all 0 (exit status 0)
    ("llama.attention.layer_norm_rms_epsilon", "<f", float("inf"), "layer_norm_rms_epsilon must be a finite number"),
])
def test_gguf_metadata_out_of_range_is_one_line(saved, tmp_path, capsys, key, fmt, value, message):
    bad = tmp_path / "bad.gguf"
    _patch_meta(saved["gguf"], bad, key, fmt, value)
    for verb in (["info"], ["generate", "--raw", "--prompt", "x", "--max-new-tokens", "1", "--model"]):
        line = run_cli_error([*verb, str(bad)], capsys)
        assert message in line, line


def test_gguf_metadata_of_the_wrong_type_is_one_line(saved, tmp_path):
    """llama.cpp refuses a key of the wrong type; int("...") of a string was a ValueError traceback."""
    from herd.checkpoint.gguf import args_from_gguf_metadata, read_gguf_metadata

    meta = read_gguf_metadata(saved["gguf"])
    for key, value in (("llama.block_count", "2"), ("llama.embedding_length", 32.0), ("llama.context_length", True)):
        with pytest.raises(HerdError, match=f"metadata {key} must be an integer"):
            args_from_gguf_metadata({**meta, key: value})


# ---- config.json / params.json --------------------------------------------------------------------
@pytest.mark.parametrize("fmt, name", [("hf", "config.json"), ("meta", "params.json")])
def test_config_that_is_not_utf8_is_one_line(saved, tmp_path, capsys, fmt, name):
    d = _copy(saved[fmt], tmp_path / "m")
    (d / name).write_bytes(b"\xff\xfe{\x00")  # UTF-16 with a BOM: a UnicodeDecodeError traceback
    line = run_cli_error(["info", str(d)], capsys)
    assert f"{name}: cannot read" in line and "utf-8" in line


@pytest.mark.parametrize("fmt, name, key", [("hf", "config.json", "rms_norm_eps"), ("meta", "params.json", "norm_eps"),
                                            ("hf", "config.json", "rope_theta")])
@pytest.mark.parametrize("constant", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_config_numbers_are_refused(saved, tmp_path, capsys, fmt, name, key, constant):
    """Python's json reads NaN and Infinity, which JSON does not have; rms_norm_eps = Infinity gave
    a model of all-zero logits with exit status 0."""
    d = _copy(saved[fmt], tmp_path / "m")
    cfg = json.loads((d / name).read_text())
    cfg[key] = "@"
    (d / name).write_text(json.dumps(cfg).replace('"@"', constant))
    line = run_cli_error(["generate", "--model", str(d), "--raw", "--prompt", "x", "--max-new-tokens", "1"], capsys)
    assert f"{name}: cannot read ({constant} is not a JSON number)" in line


@pytest.mark.parametrize("fmt, key, name", [("hf", "num_hidden_layers", "config.json"),
                                            ("meta", "n_layers", "params.json")])
def test_far_more_layers_than_weights_is_a_quick_error(saved, tmp_path, capsys, fmt, key, name):
    """A config of 10**9 layers beside 2 layers of weights listed every expected name first (minutes,
    gigabytes) before naming the first one missing."""
    d = _copy(saved[fmt], tmp_path / "m")
    cfg = json.loads((d / name).read_text())
    cfg[key] = 10 ** 9
    (d / name).write_text(json.dumps(cfg))
    start = time.perf_counter()
    line = run_cli_error(["generate", "--model", str(d), "--raw", "--prompt", "x", "--max-new-tokens", "1"], capsys)
    assert time.perf_counter() - start < 20
    assert "the config says 1000000000 layers but the weights hold 2" in line


def test_missing_index_json_that_is_a_directory_is_one_line(saved, tmp_path):
    d = _copy(saved["hf"], tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").mkdir()
    with pytest.raises(HerdError, match="model.safetensors.index.json: malformed index"):
        read_checkpoint(d)
    (d / "model.safetensors.index.json").rmdir()
    (d / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"a": "\xff"}}')
    with pytest.raises(HerdError, match="malformed index"):
        read_checkpoint(d)


def test_every_readable_gguf_still_reads(saved):
    """The offset rule holds for herd's own output in every type it writes."""
    sd = random_state_dict(TINY)
    for dtype in ("float32", "float16", "bfloat16", "q8_0"):
        path = write_checkpoint(saved["gguf"].parent / f"{dtype}.gguf", "gguf", TINY, sd, dtype=dtype)
        got = read_checkpoint(path).state_dict
        err = max(float((got[k] - v).abs().max()) for k, v in sd.items() if k in got)
        assert np.isfinite(err) and err < 0.05, (dtype, err)


def test_llama4_config_of_far_more_layers_is_a_quick_error(tmp_path, capsys):
    """Llama 4's config reading listed a RoPE flag per layer, and its weight check every expected name:
    10**9 layers in config.json beside 4 layers of weights did not finish."""
    import torch

    from herd.models.llama4 import LLAMA4_PRESETS, Transformer

    args = LLAMA4_PRESETS["llama4-debug"]
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    d = write_checkpoint(tmp_path / "l4", "hf", args, model.state_dict())
    cfg = json.loads((d / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text["num_hidden_layers"] = 10 ** 9
    text.pop("no_rope_layers", None)
    text.pop("layer_types", None)
    (d / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    line = run_cli_error(["generate", "--model", str(d), "--raw", "--prompt", "x", "--max-new-tokens", "1"], capsys)
    assert time.perf_counter() - start < 30
    assert f"the config says 1000000000 layers but the weights hold {args.n_layers}" in line
