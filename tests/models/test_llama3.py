"""The dense Transformer against transformers' LlamaForCausalLM (fp32, random weights) and the
paper's model sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from herd.checkpoint.hf import hf_config_from_args
from herd.errors import HerdError
from herd.inference.kv_cache import KVCache
from herd.models.args import PRESETS, ModelArgs, RopeScaling
from herd.models.llama3 import Transformer
from herd.models.rope import rope_frequencies
from tests.reference import herd_and_hf

CONFIGS = {
    # GQA ratio 4, llama3 RoPE scaling with a 32-token original context (tested at 200+ positions)
    "gqa4-scaled": PRESETS["debug"],
    # GQA ratio 3 (SmolLM2's 9/3 shape in miniature), tied embeddings
    "gqa3-tied": ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=160,
                           rope_theta=10000.0, max_seq_len=512, tie_embeddings=True),
    # multi-head (ratio 1), untied, ffn_dim_multiplier sizing, Llama 3.2-style factor-32 scaling
    "mha-untied": ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=256, multiple_of=16,
                            ffn_dim_multiplier=1.3, max_seq_len=512, norm_eps=1e-6,
                            rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=64)),
    # explicit head_dim differing from dim / n_heads
    "headdim": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=128,
                         ffn_hidden_dim=96, max_seq_len=256),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    args = CONFIGS[name]
    model, ref = herd_and_hf(args)
    tokens = torch.randint(0, args.vocab_size, (2, 240))
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 240, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for preset in ("llama3.1-8b", "llama3.2-1b"):
        args = PRESETS[preset]
        cfg = LlamaConfig(**hf_config_from_args(args))
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        ours = rope_frequencies(args.hd, args.rope_theta, args.rope_scaling)
        assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)
        # Scaling must actually change the low frequencies (else this test could not fail).
        assert not torch.allclose(ours, rope_frequencies(args.hd, args.rope_theta, None))


@pytest.mark.parametrize("name", ["gqa4-scaled", "gqa3-tied"])
def test_kv_cache_decoding_equals_full_forward(name):
    args = CONFIGS[name]
    model, _ = herd_and_hf(args)
    tokens = torch.randint(0, args.vocab_size, (2, 60))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(args, batch_size=2, max_len=64)
        pieces = [model(tokens[:, :17], cache=cache)]  # prefill
        pieces += [model(tokens[:, 17:30], cache=cache)]  # a chunk on top of a filled cache
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(30, 60)]  # decode
    assert cache.offset == 60
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


def test_kv_cache_overflow_is_a_clear_error():
    args = CONFIGS["gqa3-tied"]
    model, _ = herd_and_hf(args)
    cache = KVCache(args, batch_size=1, max_len=8)
    with pytest.raises(HerdError, match="KV cache full"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_paper_model_sizes():
    # Paper Table 3 / SPEC §1: FFN widths and 8.03B, 70.6B and 405.9B parameters.
    expect = {"llama3-8b": (14336, 8.03), "llama3-70b": (28672, 70.6), "llama3-405b": (53248, 405.9)}
    for name, (ffn, billions) in expect.items():
        args = PRESETS[name]
        assert args.ffn_dim == ffn
        assert round(args.num_params() / 1e9, 2 if billions < 10 else 1) == pytest.approx(billions, abs=0.051)
        # and the count equals what the module actually allocates (on the meta device)
        with torch.device("meta"):
            model = Transformer(args.replace(n_layers=2))
        assert sum(p.numel() for p in model.parameters()) == args.replace(n_layers=2).num_params()
    assert PRESETS["llama3.2-1b"].ffn_dim == 8192 and PRESETS["llama3.2-3b"].ffn_dim == 8192


def test_training_flops_match_paper_budget():
    # §3.2.1: the 405B flagship used 3.8e25 FLOPs on 15.6T tokens → ~2.4e12 FLOPs/token at 8K.
    per_token = PRESETS["llama3-405b"].flops_per_token(8192, training=True)
    assert 3.8e25 / 15.6e12 == pytest.approx(per_token, rel=0.05)


def test_bad_configs_are_clear_errors():
    with pytest.raises(HerdError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(HerdError, match="unknown model option"):
        PRESETS["debug"].replace(n_layer=3)
    with pytest.raises(HerdError, match="known presets: llama3-8b"):
        from herd.models.args import get_preset

        get_preset("llama5-1t")


@pytest.mark.parametrize("name", ["norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf"), 0.0, -1e-5, "1e-5", True])
def test_norm_eps_and_rope_theta_must_be_positive_finite(name, value):
    """ModelArgs(norm_eps=float("inf")) built a model whose every logit is 0 (RMSNorm divides by
    sqrt(inf)); rope_theta=inf left all but the first rotary pair unrotated. Llama 4 too."""
    from herd.models.llama4 import LLAMA4_PRESETS

    for base in (PRESETS["debug"], LLAMA4_PRESETS["llama4-scout-17b-16e"]):
        with pytest.raises(HerdError, match=f"^invalid (Llama 4|model) config: {name} must be positive and finite "
                                            f"\\(got") as e:
            base.replace(**{name: value})
        assert "\n" not in str(e.value)
    import numpy as np

    assert PRESETS["debug"].replace(**{name: np.float32(0.5)})  # a GGUF reader's numpy scalar is a number
