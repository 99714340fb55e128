"""Every GGUF tensor type herd reads — K-quants, legacy quants, BF16, F16 — comes out equal to the
`gguf` package's dequantizer, in the right shape and place, and transformers computes the same
logits from the same file. (gguf-py cannot *make* K-quants, so the blocks are random bytes.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

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
