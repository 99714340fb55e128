"""The Llama 4 text model against transformers' Llama4ForCausalLM (fp32, random weights), its HF
checkpoint mapping, and the published model sizes (SPEC §1, issue 6)."""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

from herd.checkpoint.hf_llama4 import (
    from_hf_llama4_state_dict,
    hf_config_from_llama4_args,
    read_hf_llama4,
    to_hf_llama4_state_dict,
    write_hf_llama4,
)
from herd.errors import HerdError
from herd.inference.generate import generate_batch
from herd.inference.kv_cache import KVCache
from herd.models.llama4 import LLAMA4_PRESETS, Llama4Args, Transformer, grouped_mm

_TINY = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=320, n_experts=4, moe_ffn_dim=32,
             ffn_hidden_dim=48, max_seq_len=256)
CONFIGS = {
    # Scout-like: MoE every layer, QK-norm, NoPE at layer 3, chunk 8, temperature tuning from pos 3
    "scout-like": Llama4Args(**_TINY, n_layers=4, moe_every=1, attention_chunk_size=8, floor_scale=4.0),
    # Maverick-like: dense/MoE interleaved, no QK-norm, NoPE every 2nd layer, top-2 routing
    "maverick-like": Llama4Args(**_TINY, n_layers=4, moe_every=2, qk_norm=False, nope_every=2, top_k=2,
                                attention_chunk_size=8, floor_scale=3.0, attn_scale=0.5),
    # no chunking, no temperature tuning, GQA 1, tied embeddings
    "plain": Llama4Args(**{**_TINY, "n_kv_heads": 4}, n_layers=3, moe_every=1, attention_chunk_size=None,
                        attn_temperature_tuning=False, tie_embeddings=True, nope_every=3),
}


def herd_and_hf(args: Llama4Args, seed: int = 0, std: float = 0.3):
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=std)
    ref = Llama4ForCausalLM(Llama4TextConfig(**hf_config_from_llama4_args(args)))
    ref.config._attn_implementation = "eager"
    missing, unexpected = ref.load_state_dict(to_hf_llama4_state_dict(model.state_dict(), args), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if args.tie_embeddings:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    return model.eval(), ref.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    args = CONFIGS[name]
    model, ref = herd_and_hf(args)
    tokens = torch.randint(0, args.vocab_size, (2, 37))  # several chunks of 8, past floor_scale
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert ours.shape == (2, 37, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_features_change_the_output():
    """Each feature under test is live: turning it off changes the logits (else the comparison
    above could pass with the feature missing on both sides)."""
    args = CONFIGS["scout-like"]
    tokens = torch.randint(0, args.vocab_size, (1, 30))
    torch.manual_seed(0)
    base, _ = herd_and_hf(args)
    with torch.no_grad():
        ref = base(tokens)
        for change in (dict(attention_chunk_size=None), dict(qk_norm=False), dict(attn_temperature_tuning=False),
                       dict(nope_every=None)):
            other = Transformer(args.replace(**change)).eval()
            other.load_state_dict(base.state_dict())
            assert (other(tokens) - ref).abs().max().item() > 1e-3, change


@pytest.mark.parametrize("name", ["scout-like", "maverick-like"])
def test_kv_cache_decoding_equals_full_forward(name):
    args = CONFIGS[name]
    model, _ = herd_and_hf(args)
    tokens = torch.randint(0, args.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(args, batch_size=2, max_len=32)
        pieces = [model(tokens[:, :11], cache=cache)]  # prefill across a chunk boundary
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(11, 30)]
    assert cache.offset == 30
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers():
    args = CONFIGS["scout-like"]
    model, ref = herd_and_hf(args)
    prompts = [[5, 17, 99, 3, 250, 1, 7, 64, 12, 200], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    ours = generate_batch(model, prompts, max_new_tokens=6)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompts), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                              pad_token_id=0, eos_token_id=None)
    assert [c.ids for c in ours] == theirs[:, len(prompts[0]):].tolist()


def test_left_padded_rows_match_running_alone():
    args = CONFIGS["scout-like"]
    model, _ = herd_and_hf(args)
    prompts = [[5, 17, 99, 3, 250, 1, 7, 64, 12, 200, 33, 4], [8, 9, 10]]
    together = [c.ids for c in generate_batch(model, prompts, max_new_tokens=8)]
    alone = [generate_batch(model, [p], max_new_tokens=8)[0].ids for p in prompts]
    assert together == alone


def test_grouped_mm_equals_per_expert_loop():
    x, w = torch.randn(10, 16), torch.randn(3, 16, 8)
    counts = torch.tensor([4, 0, 6])
    ref = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
    assert torch.allclose(grouped_mm(x, w, counts), ref, atol=1e-5)
    with torch.enable_grad():  # the per-expert loop path
        assert torch.allclose(grouped_mm(x, w, counts), ref, atol=1e-5)


def test_hf_round_trip_keeps_logits(tmp_path):
    args = CONFIGS["maverick-like"]
    model, _ = herd_and_hf(args)
    write_hf_llama4(tmp_path / "hf", args, model.state_dict(), max_shard_bytes=200_000)  # sharded
    ref = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    args2, sd, _ = read_hf_llama4(tmp_path / "hf")
    assert args2 == args
    back = Transformer(args2).eval()
    back.load_state_dict(sd)
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        ours, theirs, again = model(tokens), ref(tokens).logits, back(tokens)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours, again)


def test_expert_count_mismatch_is_one_line_error():
    args = CONFIGS["scout-like"]
    model, _ = herd_and_hf(args)
    hf = to_hf_llama4_state_dict(model.state_dict(), args)
    with pytest.raises(HerdError, match="expert count mismatch") as e:
        from_hf_llama4_state_dict(hf, args.replace(n_experts=8))
    assert "\n" not in str(e.value)


def test_published_sizes():
    scout, maverick = LLAMA4_PRESETS["llama4-scout-17b-16e"], LLAMA4_PRESETS["llama4-maverick-17b-128e"]
    # Published (Meta model cards): Scout 109B total / 17B active, Maverick 400B / 17B; totals
    # include the vision encoder. Rounded to the published precision.
    assert round(scout.num_params(include_vision=True) / 1e9) == 109
    assert round(maverick.num_params(include_vision=True) / 1e9, -1) == 400
    assert round(scout.active_params() / 1e9) == 17
    assert round(maverick.active_params() / 1e9) == 17
    behemoth = LLAMA4_PRESETS["llama4-behemoth-shaped"]  # 288B active, ~2T total
    assert abs(behemoth.active_params() / 288e9 - 1) < 0.05
    assert abs(behemoth.num_params() / 2e12 - 1) < 0.05


def test_text_param_counts_equal_transformers():
    for name, args in LLAMA4_PRESETS.items():
        if name == "llama4-behemoth-shaped":
            continue
        with torch.device("meta"):
            ref = Llama4ForCausalLM(Llama4TextConfig(**hf_config_from_llama4_args(args)))
            ours = Transformer(args)
        assert args.num_params() == sum(p.numel() for p in ref.parameters()) == sum(
            p.numel() for p in ours.parameters())


def test_checkpoint_api_dispatches_llama4(tmp_path):
    """herd.checkpoint's format-agnostic entry points read and write Llama 4 HF directories."""
    from herd.checkpoint import build_model, read_args, read_checkpoint, write_checkpoint

    args = CONFIGS["scout-like"]
    model, ref = herd_and_hf(args)
    write_checkpoint(tmp_path / "a", "hf", args, model.state_dict())
    assert read_args(tmp_path / "a") == args
    ckpt = read_checkpoint(tmp_path / "a")
    loaded = build_model(ckpt.args, ckpt.state_dict)
    assert isinstance(loaded, Transformer)
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        assert (loaded(tokens) - ref(tokens).logits).abs().max().item() <= 1e-4


def test_cli_info_llama4(capsys):
    import json

    from herd.cli import main

    assert main(["info", "llama4-maverick-17b-128e", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["experts"] == 128 and info["moe_layers"] == 24
    assert round(info["active_params"] / 1e9) == 17


def test_moe_layer_count_is_arithmetic(tmp_path, capsys):
    """n_moe_layers looped over every layer: `herd info` on a config.json with 10**9 layers hung."""
    import json
    import time

    from herd.cli import main

    for n_layers in range(1, 13):
        for every in range(1, 6):
            args = CONFIGS["maverick-like"].replace(n_layers=n_layers, moe_every=every)
            assert args.n_moe_layers == sum(args.is_moe_layer(i) for i in range(n_layers))
    config = hf_config_from_llama4_args(CONFIGS["maverick-like"].replace(n_layers=10**9, moe_every=3))
    (tmp_path / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert time.perf_counter() - start < 5
    assert json.loads(capsys.readouterr().out)["moe_layers"] == 10**9 // 3
