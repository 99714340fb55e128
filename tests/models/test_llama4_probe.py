"""Llama 4 text configs the other Llama 4 tests do not cover, against transformers' Llama4ForCausalLM
(models transformers built, randomized and saved; `herd.load` of the directory): top-k > 1 up to
every expert, one expert, MoE every 3rd layer given as an explicit list, NoPE every layer / no
layer, chunks smaller than the prompt, temperature tuning from position 0 on, head_dim unlike
hidden/heads, MQA and GQA, unaligned expert widths, tied embeddings, llama3 RoPE scaling and odd
rope_theta values — logits at lengths around the chunk and past floor_scale, greedy ids over 40+
tokens through the KV cache (and the fixed-shape cache), and herd's HF and Meta round trips.

Then the config.json spellings herd used to read unlike transformers (each a regression test):
`"attn_temperature_tuning": 4` (the released Scout/Maverick configs), absent head_dim and
num_key_value_heads, an empty moe_layers list, and a model without NoPE layers whose HF round trip
changed its args; and a float64 model, whose MoE layers crashed in torch._grouped_mm."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

import herd
from herd.checkpoint import build_model, read_args, read_checkpoint, write_checkpoint
from herd.errors import HerdError
from herd.inference.generate import generate_batch
from herd.models.llama4 import Llama4Args, Transformer

_BASE = dict(max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    # top-2 of 5 experts, MoE on layer 2 only (an explicit list: step 3), NoPE every 2nd layer (explicit
    # list), chunk 5, no QK-norm, tuning from position 1 (floor_scale 2) and strong; head_dim 12 with
    # 48 = 6 heads · 8; GQA 3; expert width 22 (not 16-byte aligned: the per-expert matmul path);
    # llama3 RoPE scaling with a real interpolation band.
    "top2-moe-list-step3": dict(
        vocab_size=128, hidden_size=48, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=2,
        head_dim=12, intermediate_size=22, intermediate_size_mlp=40, num_local_experts=5, num_experts_per_tok=2,
        moe_layers=[2], no_rope_layers=[1, 0, 1, 0, 1], attention_chunk_size=5, use_qk_norm=False,
        attn_temperature_tuning=True, floor_scale=2, attn_scale=1.0,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # every expert chosen (top-3 of 3), MoE every 2nd layer, MQA, head_dim 16 with 32 = 4 · 8, tied
    # embeddings, chunk 4, QK-norm, tuning from position 0 (floor_scale 1), rope_theta 100.
    "top-all-tied-mqa": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=16, intermediate_size_mlp=24, num_local_experts=3, num_experts_per_tok=3,
        interleave_moe_layer_step=2, no_rope_layer_interval=3, attention_chunk_size=4, use_qk_norm=True,
        tie_word_embeddings=True, floor_scale=1, attn_scale=2.0,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    # no NoPE layer (so no tuning), no chunking, one expert, Scout's degenerate llama3 band
    # (low_freq_factor = high_freq_factor), a large rms_norm_eps.
    "all-rope-one-expert": dict(
        vocab_size=97, hidden_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        head_dim=10, intermediate_size=24, intermediate_size_mlp=20, num_local_experts=1, no_rope_layers=[1, 1, 1],
        attention_chunk_size=None, rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 32}),
    # every layer NoPE: a chunk size is set but no layer is chunked (layer_types all full_attention);
    # QK-norm on, which applies to RoPE layers only; top-2 of 4 in every layer.
    "all-nope": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=16, intermediate_size_mlp=24, num_local_experts=4, num_experts_per_tok=2,
        no_rope_layer_interval=1, attention_chunk_size=6, use_qk_norm=True, floor_scale=4, attn_scale=0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# Weight seeds whose greedy continuations are not one token repeated (random tiny models often loop,
# which would let a wrong cache or mask pass unnoticed).
SEEDS = {"top-all-tied-mqa": 2, "all-nope": 1}


def hf_model(kw: dict, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**{**_BASE, **kw}))
    with torch.no_grad():  # transformers zero-initializes the experts: randomize everything, sharply
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3)
    return model.eval()


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer files
        return herd.load(path)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            ref = hf_model(CONFIGS[name], SEEDS.get(name, 0))
            path = tmp_path_factory.mktemp(name) / "hf"
            ref.save_pretrained(path)
            cache[name] = ref, path, load(path)
        return cache[name]

    return get


def _hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _chunk(ref) -> int:
    return ref.config.attention_chunk_size or 8


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_around_chunks_and_floor_scale(saved, name):
    ref, _, model = saved(name)
    C, fs = _chunk(ref), int(ref.config.floor_scale)
    g = torch.Generator().manual_seed(1)
    for n in sorted({1, C - 1, C, C + 1, 3 * C + 2, 3 * fs + 1, 40} - {0}):
        tokens = torch.randint(1, ref.config.vocab_size, (2, n), generator=g)
        with torch.no_grad():
            assert (model(tokens) - ref(tokens).logits).abs().max().item() <= 1e-4, n


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_ids_equal_transformers(saved, name):
    ref, _, model = saved(name)
    C = _chunk(ref)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, ref.config.vocab_size, (n,), generator=g).tolist() for n in (3, C, 2 * C + 1)]
    n = 42
    want = [_hf_greedy(ref, p, n) for p in prompts]
    assert [generate_batch(model, [p], max_new_tokens=n)[0].ids for p in prompts] == want
    assert all(len(set(ids)) > 3 for ids in want)  # not a degenerate repeat any model would give
    # the fixed-shape cache under torch.compile (skipped where herd.load packed some linears)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert generate_batch(model, prompts[-1:], max_new_tokens=n, compile=True)[0].ids == want[-1]
    # left-padded together equals alone
    assert [c.ids for c in generate_batch(model, prompts, max_new_tokens=n)] == want


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_and_meta_round_trips_keep_args_and_logits(saved, name, tmp_path):
    ref, path, _ = saved(name)
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.args, dict(ckpt.state_dict))
    tokens = torch.randint(1, ref.config.vocab_size, (2, 3 * _chunk(ref) + 3))
    with torch.no_grad():
        want = model(tokens)
    mp = 2 if all(v % 2 == 0 for v in (ckpt.args.n_heads, ckpt.args.kv_heads, ckpt.args.moe_ffn_dim,
                                       ckpt.args.ffn_hidden_dim, ckpt.args.vocab_size)) else 1
    for fmt, kw in (("hf", {}), ("meta", {}), ("meta", {"model_parallel": mp})):
        out = tmp_path / f"{fmt}{kw.get('model_parallel', '')}"
        write_checkpoint(out, fmt, ckpt.args, ckpt.state_dict, **kw)
        assert read_args(out) == ckpt.args, (fmt, kw)
        back = read_checkpoint(out)
        # The round trip is exact in the weights, bit for bit. The logits agree to rounding only:
        # the HF mapping hands over views (experts split from gate_up_proj, the router transposed)
        # and the Meta files contiguous tensors, and MKL's AVX2 kernels accumulate a product in an
        # order that depends on its operands' strides.
        assert back.state_dict.keys() == ckpt.state_dict.keys(), (fmt, kw)
        assert all(torch.equal(back.state_dict[k], v) for k, v in ckpt.state_dict.items()), (fmt, kw)
        with torch.no_grad():
            torch.testing.assert_close(build_model(back.args, back.state_dict)(tokens), want,
                                       rtol=0, atol=1e-5, msg=lambda m, at=(fmt, kw): f"{at}: {m}")
    # transformers reads herd's HF directory as the model it saved
    again = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(tokens).logits - ref(tokens).logits).abs().max().item() <= 1e-4


# ---- config.json spellings transformers reads and herd read differently ------------------------------
_SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, intermediate_size=16, intermediate_size_mlp=24, num_local_experts=3,
              attention_chunk_size=6, floor_scale=2, attn_scale=1.0)


def _edited(tmp_path, kw: dict, edit) -> tuple[Llama4ForCausalLM, object]:
    ref = hf_model({**_SMALL, **kw})
    path = tmp_path / "hf"
    ref.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return ref, path


def _same_logits(model, ref, n=30):
    tokens = torch.randint(1, ref.config.vocab_size, (2, n))
    with torch.no_grad():
        return (model(tokens) - ref(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("value, on", [(4, True), (0, False)])
def test_integer_attn_temperature_tuning_reads_as_transformers_did(tmp_path, value, on):
    """The released Scout/Maverick config.json say `"attn_temperature_tuning": 4` (transformers 4.51's
    default); transformers' attention tests its truthiness. herd refused the int, i.e. every released
    Llama 4 checkpoint and its text-only fine-tunes."""
    ref, path = _edited(tmp_path, dict(attn_temperature_tuning=on), lambda c: c.update(attn_temperature_tuning=value))
    model = load(path)
    assert model.args.attn_temperature_tuning is on
    assert _same_logits(model, ref)


def test_released_format_config_loads(tmp_path):
    """A config.json in the released checkpoints' (transformers 4.51) spelling: the int
    attn_temperature_tuning, a legacy top-level rope_scaling and rope_theta, full moe_layers and
    no_rope_layers lists, no layer_types; equal to transformers reading the same model with `true`."""
    ref, path = _edited(tmp_path, dict(num_hidden_layers=8, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
        "original_max_position_embeddings": 16}), lambda c: c.clear())
    released = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "attention_bias": False,
                "attention_chunk_size": 6, "attn_scale": 1.0, "attn_temperature_tuning": 4, "floor_scale": 2,
                "cache_implementation": "hybrid", "for_llm_compressor": False, "head_dim": 8, "hidden_act": "silu",
                "hidden_size": 32, "interleave_moe_layer_step": 1, "intermediate_size": 16,
                "intermediate_size_mlp": 24, "max_position_embeddings": 256, "moe_layers": list(range(8)),
                "no_rope_layers": [1, 1, 1, 0] * 2, "num_attention_heads": 4, "num_experts_per_tok": 1,
                "num_hidden_layers": 8, "num_key_value_heads": 2, "num_local_experts": 3, "rms_norm_eps": 1e-05,
                "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 16, "rope_type": "llama3"},
                "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_qk_norm": True,
                "vocab_size": 97, "transformers_version": "4.51.0"}
    (path / "config.json").write_text(json.dumps(released))
    model = load(path)
    assert model.args.attn_temperature_tuning and model.args.nope_every == 4 and model.args.moe_every == 1
    assert _same_logits(model, ref, n=40)


def test_non_boolean_attn_temperature_tuning_is_one_line_error(tmp_path):
    _, path = _edited(tmp_path, {}, lambda c: c.update(attn_temperature_tuning="yes"))
    with pytest.raises(HerdError, match="attn_temperature_tuning") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_absent_head_dim_and_kv_heads_take_transformers_defaults(tmp_path):
    """transformers' Llama4TextConfig defaults an absent head_dim to 128 and num_key_value_heads to 8
    (not hidden/heads and heads, which only a null gets): herd refused such a directory with a shape
    mismatch against weights transformers loads."""
    kw = dict(num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    ref, path = _edited(tmp_path, kw, lambda c: (c.pop("head_dim"), c.pop("num_key_value_heads")))
    theirs = Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert (theirs.config.head_dim, theirs.config.num_key_value_heads) == (128, 8)
    model = load(path)
    assert (model.args.hd, model.args.kv_heads) == (128, 8)
    assert _same_logits(model, theirs)
    # null: derived, as before (hidden_size // heads; heads)
    ref, path = _edited(tmp_path / "null", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
                        lambda c: c.update(head_dim=None, num_key_value_heads=None))
    model = load(path)
    assert (model.args.hd, model.args.kv_heads) == (8, 4)
    assert _same_logits(model, ref)


def test_empty_moe_layers_is_all_dense(tmp_path):
    """`moe_layers: []` makes every layer dense in transformers whatever interleave_moe_layer_step says;
    herd refused it as 'not every n-th layer'."""
    ref = hf_model({**_SMALL, "moe_layers": []})
    assert not any(layer.is_moe_layer for layer in ref.model.layers)
    ref.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    assert model.args.n_moe_layers == 0
    assert _same_logits(model, ref)
    out = write_checkpoint(tmp_path / "again", "hf", model.args, read_checkpoint(tmp_path / "hf").state_dict)
    theirs = Llama4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert theirs.config.moe_layers == []
    assert _same_logits(model, theirs)


def test_hf_round_trip_of_a_model_without_nope_layers_keeps_its_args(tmp_path):
    """nope_every=None was written as no_rope_layer_interval n_layers + 1 (transformers wants an int)
    and read back as that number: equal logits, unequal args."""
    args = Llama4Args(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=97, n_experts=2,
                      moe_ffn_dim=16, ffn_hidden_dim=24, nope_every=None, attention_chunk_size=4, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(std=0.3)
    model.eval()
    write_checkpoint(tmp_path / "hf", "hf", args, model.state_dict())
    assert read_args(tmp_path / "hf") == args
    theirs = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert list(theirs.config.no_rope_layers) == [1, 1, 1]
    assert _same_logits(model, theirs)


def test_float64_model_runs_its_moe_layers():
    """torch._grouped_mm takes fp32/bf16/fp16 only: a float64 model crashed in its first MoE layer."""
    args = Llama4Args(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=97, n_experts=4,
                      top_k=2, moe_ffn_dim=16, ffn_hidden_dim=24, attention_chunk_size=4, floor_scale=2.0)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(std=0.3)
    model.eval()
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        want = model(tokens)
        got = model.double()(tokens)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw, match", [
    (dict(no_rope_layers=[1, 0, 0, 1]), "no_rope_layers"),  # NoPE on layers 1 and 2: not periodic
    (dict(moe_layers=[0, 3]), "moe_layers"),
])
def test_irregular_layer_lists_are_refused_in_one_line(tmp_path, kw, match):
    hf_model({**_SMALL, **kw}).save_pretrained(tmp_path / "hf")
    with pytest.raises(HerdError, match=match) as e:
        load(tmp_path / "hf")
    assert "\n" not in str(e.value)


def test_top_k_above_expert_count_is_one_line_error(tmp_path):
    _, path = _edited(tmp_path, {}, lambda c: c.update(num_experts_per_tok=5))
    with pytest.raises(HerdError, match="top_k") as e:
        load(path)
    assert "\n" not in str(e.value)
