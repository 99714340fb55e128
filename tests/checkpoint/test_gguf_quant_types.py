"""Every GGUF tensor type herd reads — K-quants, legacy quants, BF16, F16 — comes out equal to the
`gguf` package's dequantizer, in the right shape and place, and transformers computes the same
logits from the same file. (gguf-py cannot *make* K-quants, so the blocks are random bytes.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from herd.checkpoint import build_model, read_checkpoint, write_checkpoint
from herd.checkpoint.gguf import copy_fields, from_gguf_name, open_gguf, read_gguf_metadata
from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer

# K-quant rows are 256-weight super-blocks, so every matrix dimension here is a multiple of 256.
ARGS = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=256,
                 rope_theta=10000.0, max_seq_len=64)
TYPES = {"blk.0.attn_q.weight": Q.Q2_K, "blk.0.attn_k.weight": Q.Q3_K, "blk.0.attn_v.weight": Q.Q4_K,
         "blk.0.attn_output.weight": Q.Q5_K, "blk.0.ffn_gate.weight": Q.Q6_K, "blk.0.ffn_up.weight": Q.Q4_0,
         "blk.0.ffn_down.weight": Q.Q5_1, "token_embd.weight": Q.BF16, "output.weight": Q.Q5_0}


def test_every_readable_type(tmp_path):
    write_checkpoint(tmp_path / "f32.gguf", "gguf", ARGS, Transformer(ARGS).state_dict())
    src = open_gguf(tmp_path / "f32.gguf")
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    copy_fields(writer, read_gguf_metadata(src), ("llama.", "general.name"))
    expected = {}
    for t in src.tensors:
        qtype = TYPES.get(t.name)
        if qtype is None:  # norms
            expected[t.name] = np.asarray(t.data).copy()
            writer.add_tensor(t.name, expected[t.name])
            continue
        rows, cols = reversed(t.shape.tolist())
        block, nbytes = GGML_QUANT_SIZES[qtype]
        # Bytes below 0x3C keep every fp16/bf16 scale field finite and < 1.
        raw = rng.integers(0, 0x3C, size=(rows, cols // block * nbytes), dtype=np.uint8)
        writer.add_tensor(t.name, raw, raw_dtype=qtype)
        expected[t.name] = dequantize(raw, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    types = {t.name: t.tensor_type for t in open_gguf(tmp_path / "mixed.gguf").tensors}
    assert all(types[k] == v for k, v in TYPES.items())
    ckpt = read_checkpoint(tmp_path / "mixed.gguf")
    for name, want in expected.items():
        got = ckpt.state_dict[from_gguf_name(name)]
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want.reshape(got.shape)), name

    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mixed.gguf",
                                                            dtype=torch.float32).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(build_model(ckpt.args, ckpt.state_dict)(tokens), ref(tokens).logits,
                                   rtol=0, atol=1e-4)


def _write(path, tensors, meta_from=None):
    writer = GGUFWriter(str(path), "llama")
    if meta_from is not None:
        copy_fields(writer, read_gguf_metadata(meta_from), ("llama.", "general.name"))
    for name, (arr, qtype) in tensors.items():
        writer.add_tensor(name, arr, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_any_bytes_dequantize_bit_exactly_as_gguf(tmp_path):
    """Every readable type on unrestricted random bytes — negative, huge, inf and NaN f16/bf16 scale
    fields — and odd row counts and row lengths of 1, 3 and 7 blocks (768 for K-quants: a multiple
    of 256, not of 512): herd's values equal gguf.quants.dequantize bit for bit (NaNs included)."""
    from herd.checkpoint.gguf import READABLE, dequantize_tensor

    rng = np.random.default_rng(1)
    tensors, expected = {}, {}
    for qtype in READABLE:
        block, nbytes = GGML_QUANT_SIZES[qtype]
        for rows, blocks in ((3, 1), (5, 3), (1, 7)):
            raw = rng.integers(0, 256, size=(rows, blocks * nbytes), dtype=np.uint8)
            plain = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype)
            arr = raw.view(plain) if plain else raw
            name = f"{qtype.name}.{rows}x{blocks}"
            tensors[name] = (arr, None if plain else qtype)
            expected[name] = arr.astype(np.float32) if plain else dequantize(raw, qtype)
    src = open_gguf(_write(tmp_path / "any.gguf", tensors))
    nonfinite = 0
    for t in src.tensors:
        got = dequantize_tensor(t).numpy()
        want = np.asarray(expected[t.name], dtype=np.float32).reshape(got.shape)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name
        nonfinite += not np.isfinite(got).all()
    assert nonfinite  # the bytes did reach inf/NaN scales


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0, Q.IQ4_NL])
def test_unreadable_type_is_one_line_naming_type_and_tensor(tmp_path, qtype):
    from herd.errors import HerdError

    write_checkpoint(tmp_path / "f32.gguf", "gguf", ARGS, Transformer(ARGS).state_dict())
    src = open_gguf(tmp_path / "f32.gguf")
    block, nbytes = GGML_QUANT_SIZES[qtype]
    tensors = {t.name: (np.asarray(t.data).copy(), None) for t in src.tensors}
    name = "blk.0.attn_q.weight"
    tensors[name] = (np.zeros((ARGS.dim, ARGS.dim // block * nbytes), np.uint8), qtype)
    path = _write(tmp_path / "odd.gguf", tensors, meta_from=src)
    with pytest.raises(HerdError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and qtype.name in msg and name in msg and "cannot read" in msg


def test_inf_or_nan_scales_are_refused_in_one_line(tmp_path):
    """A Q8_0 block whose f16 scale is NaN (0x7E00) or inf (0x7C00) used to load as NaN/inf
    weights and NaN logits; now one line names the tensor."""
    from herd.errors import HerdError

    write_checkpoint(tmp_path / "f32.gguf", "gguf", ARGS, Transformer(ARGS).state_dict())
    src = open_gguf(tmp_path / "f32.gguf")
    for scale in (b"\x00\x7e", b"\x00\x7c"):
        tensors = {t.name: (np.asarray(t.data).copy(), None) for t in src.tensors}
        name = "blk.0.ffn_up.weight"
        q = quantize(tensors[name][0], Q.Q8_0).copy()
        q[1, 34:36] = np.frombuffer(scale, np.uint8)  # row 1, second block's scale
        tensors[name] = (q, Q.Q8_0)
        path = _write(tmp_path / "nan.gguf", tensors, meta_from=src)
        with pytest.raises(HerdError, match=r"'blk\.0\.ffn_up\.weight' \(Q8_0\) holds 32 inf/NaN") as e:
            read_checkpoint(path)
        assert "\n" not in str(e.value)
