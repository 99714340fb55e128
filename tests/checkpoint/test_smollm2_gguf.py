"""The real SmolLM2-135M-Instruct Q4_1 GGUF against transformers' own GGUF loader (the reference):
dequantized weights, the RoPE row layout, logits, and a GGUF → HF → Meta → GGUF round trip whose
HF directory transformers loads."""

from __future__ import annotations

import contextlib

import pytest
import torch

from herd.checkpoint import build_model, convert, read_checkpoint, write_checkpoint
from herd.checkpoint.gguf import open_gguf
from herd.checkpoint.hf import to_hf_state_dict

# A few fixed sequences of token ids (no tokenizer needed): BOS-led, mid-vocab, the last id.
SEQUENCES = [
    [1, 504, 3458, 30, 1083, 253, 1234, 42, 9, 100, 2000, 49151],
    [2, 17, 17, 17, 8000, 31000, 45000, 5, 6, 7],
    list(range(300, 348)),
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return read_checkpoint(smollm2_gguf)


@pytest.fixture(scope="module")
def herd_smollm2(smollm2):
    return build_model(smollm2.args, smollm2.state_dict)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out if isinstance(out, torch.Tensor) else out.logits


def test_args_from_gguf_metadata(smollm2):
    a = smollm2.args
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.ffn_dim, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.tie_embeddings and a.rope_scaling is None and a.rope_theta == 100000.0 and a.norm_eps == 1e-5
    assert smollm2.format == "gguf" and smollm2.metadata["tokenizer.ggml.model"] == "gpt2"


def test_dequantized_weights_equal_transformers(smollm2, smollm2_gguf, hf_smollm2):
    types = {t.name: t.tensor_type.name for t in open_gguf(smollm2_gguf).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    ours = to_hf_state_dict(smollm2.state_dict, smollm2.args)  # Meta layout → HF names and q/k rows
    theirs = hf_smollm2.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied
    # Q8_0 embedding, Q4_1 projections (q/k also prove GGUF rows are Meta's adjacent-pair layout:
    # permuted to HF's they equal what transformers un-permutes from llama.cpp's), F32 norms.
    for name, t in ours.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, theirs[name]), name


def test_logits_equal_transformers(herd_smollm2, hf_smollm2):
    for ids in SEQUENCES:
        ours, theirs = _logits(herd_smollm2, ids), _logits(hf_smollm2, ids)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_round_trip_gguf_hf_meta_gguf(smollm2, smollm2_gguf, herd_smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = SEQUENCES[0]
    expected = _logits(herd_smollm2, ids)

    with pytest.warns(UserWarning, match="tokenizer") if _no_tokenizer_api() else contextlib.nullcontext():
        convert(smollm2_gguf, tmp_path / "hf", "hf")
    assert _no_tokenizer_api() or (tmp_path / "hf" / "tokenizer.json").exists()
    hf = read_checkpoint(tmp_path / "hf")
    assert hf.format == "hf" and all(torch.equal(hf.state_dict[k], v) for k, v in smollm2.state_dict.items())

    write_checkpoint(tmp_path / "meta", "meta", hf.args, hf.state_dict)
    meta = read_checkpoint(tmp_path / "meta")
    write_checkpoint(tmp_path / "back.gguf", "gguf", meta.args, meta.state_dict,
                     source_metadata=smollm2.metadata)
    back = read_checkpoint(tmp_path / "back.gguf")
    for ckpt in (hf, meta, back):
        assert ckpt.args.ffn_dim == 1536 and ckpt.args.tie_embeddings
        assert torch.equal(_logits(build_model(ckpt.args, ckpt.state_dict), ids), expected), ckpt.format
    # The tokenizer and descriptive fields of the source travelled into the final GGUF, types kept.
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "general.name"):
        assert back.metadata[key] == smollm2.metadata[key]
        assert back.metadata.types[key] == smollm2.metadata.types[key]

    # transformers reads the exported HF directory as a plain LlamaForCausalLM.
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(ref, ids), expected, rtol=0, atol=1e-4)


def _no_tokenizer_api() -> bool:
    try:
        from herd.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata  # noqa: F401
    except ImportError:
        return True
    return False
