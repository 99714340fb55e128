"""Checkpoints that transformers itself saved (`save_pretrained`), on config variants herd's own
writer never produces: loaded by herd, their logits must equal transformers' (fp32), or the load
must stop with one HerdError line naming what herd cannot compute — never a silent difference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Llama4ForCausalLM, Llama4TextConfig, LlamaConfig, LlamaForCausalLM

from herd.checkpoint import build_model, read_args, read_checkpoint
from herd.errors import HerdError

_DENSE = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256)
_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)


def _save_dense(tmp_path: Path, **overrides) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**{**_DENSE, **overrides})).eval()
    ref.save_pretrained(tmp_path)
    return ref, tmp_path


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _assert_same_logits(ref, path: Path, seq: int = 40) -> None:
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.args, ckpt.state_dict)
    tokens = torch.randint(0, ckpt.args.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - ref(tokens).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff
    # herd info's parameter count is the transformers model's
    assert read_args(path).num_params() == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-3),  # MQA, own head_dim
    dict(num_attention_heads=6, num_key_value_heads=6, rope_theta=12345.0),  # MHA, another theta
    dict(rope_scaling=_LLAMA3_ROPE),  # saved by transformers 5 as rope_parameters
], ids=["mqa-headdim-tied", "mha-theta", "llama3-rope"])
def test_dense_variants_match_transformers(tmp_path, overrides):
    ref, path = _save_dense(tmp_path, **overrides)
    _assert_same_logits(ref, path)


def test_rope_theta_inside_rope_parameters_wins(tmp_path):
    """transformers 5 reads θ from rope_parameters when a config also has a stale top-level
    rope_theta (standardize_rope_params uses setdefault); herd took the top-level one."""
    ref, path = _save_dense(tmp_path, rope_scaling=_LLAMA3_ROPE)
    _edit_config(path, lambda c: c.update(rope_theta=777.0))
    _assert_same_logits(LlamaForCausalLM.from_pretrained(path).eval(), path)


def test_llama3_rope_without_original_context_uses_max_positions(tmp_path):
    """transformers falls back to max_position_embeddings; herd raised 'missing key'."""
    _, path = _save_dense(tmp_path, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=64)
    _edit_config(path, lambda c: c["rope_parameters"].pop("original_max_position_embeddings"))
    _assert_same_logits(LlamaForCausalLM.from_pretrained(path).eval(), path, seq=100)


def test_pytorch_bin_checkpoint_loads(tmp_path):
    """Older exports hold pytorch_model.bin instead of safetensors."""
    ref, path = _save_dense(tmp_path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    _assert_same_logits(ref, path)


def test_corrupt_pytorch_bin_is_one_line_error(tmp_path):
    _, path = _save_dense(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(HerdError, match="pytorch_model.bin: unreadable"):
        read_checkpoint(path)


@pytest.mark.parametrize("rope", [  # linear and yarn are computed: tests/checkpoint/test_rope_scaling.py
    dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=64),
], ids=lambda r: r["rope_type"])
def test_unsupported_rope_scaling_is_refused_by_name(tmp_path, rope):
    _, path = _save_dense(tmp_path, rope_scaling=rope)
    with pytest.raises(HerdError, match=f"RoPE scaling type '{rope['rope_type']}' is not supported"):
        read_checkpoint(path)


def test_dynamic_ntk_checkpoint_matches_transformers_over_the_whole_context(tmp_path):
    """rope_type "dynamic" was refused; transformers rescales only past max_position_embeddings,
    where herd's context ends, so the whole context (256 positions) computes as transformers does."""
    ref, path = _save_dense(tmp_path, rope_scaling=dict(rope_type="dynamic", factor=4.0))
    assert read_args(path).max_seq_len == _DENSE["max_position_embeddings"]
    _assert_same_logits(ref, path, seq=_DENSE["max_position_embeddings"])


def test_llama4_dynamic_ntk_matches_transformers(tmp_path):
    ref, path = _save_llama4(tmp_path, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    _assert_same_logits(ref, path, seq=_LLAMA4["max_position_embeddings"])


def test_partial_rotary_factor_is_refused(tmp_path):
    _, path = _save_dense(tmp_path)
    _edit_config(path, lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5))
    with pytest.raises(HerdError, match="partial_rotary_factor 0.5"):
        read_checkpoint(path)


# ---- Llama 4 text ---------------------------------------------------------------------------------
_LLAMA4 = dict(vocab_size=97, hidden_size=48, intermediate_size=40, intermediate_size_mlp=72, num_hidden_layers=4,
               num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
               num_local_experts=3, attention_chunk_size=16, no_rope_layer_interval=2, floor_scale=8)


def _save_llama4(tmp_path: Path, **overrides) -> tuple[Llama4ForCausalLM, Path]:
    torch.manual_seed(0)
    ref = Llama4ForCausalLM(Llama4TextConfig(**{**_LLAMA4, **overrides})).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and experts at 0: nothing to tell apart
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.ndim == 3:
                p.normal_(0, 0.05)
    ref.save_pretrained(tmp_path)
    return ref, tmp_path


@pytest.mark.parametrize("overrides", [
    # every layer full attention although a chunk size is set: transformers follows layer_types
    dict(layer_types=["full_attention"] * 4),
    # no NoPE layer at all (an explicit no_rope_layers list wins over the interval)
    dict(no_rope_layers=[1, 1, 1, 1]),
    # MoE on layers 1 and 3 given as a list (interleave step left at 1)
    dict(moe_layers=[1, 3], num_experts_per_tok=2),
], ids=["layer-types-full", "no-nope-layers", "moe-layers-list"])
def test_llama4_layer_lists_match_transformers(tmp_path, overrides):
    ref, path = _save_llama4(tmp_path, **overrides)
    _assert_same_logits(ref, path, seq=50)  # > 3 chunks of 16


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_types=["chunked_attention"] * 4), "layer_types"),
    (dict(moe_layers=[0, 2]), "moe_layers"),
    (dict(attention_bias=True), "attention_bias=true"),
])
def test_llama4_unsupported_layouts_are_refused(tmp_path, overrides, message):
    _, path = _save_llama4(tmp_path, **overrides)
    with pytest.raises(HerdError, match=message):
        read_checkpoint(path)
