"""RoPE scalings other than llama3 that Llama-architecture HF configs carry (linear, yarn): a tiny
`LlamaForCausalLM` saved by transformers must load in herd with transformers' logits past the
original context, generate the same greedy tokens through herd's KV cache, and survive every
conversion herd writes (hf→hf, hf→gguf→hf, meta) with the scaling intact. Dynamic NTK is plain RoPE
up to max_position_embeddings, where herd's context ends: equal to transformers there. Types herd
cannot compute exactly (longrope) stop with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from herd.checkpoint import build_model, convert, read_args, read_checkpoint, write_checkpoint
from herd.cli import main
from herd.errors import HerdError
from herd.inference.generate import generate_ids
from herd.models.args import DynamicNtkRopeScaling, LinearRopeScaling, YarnRopeScaling

ORIGINAL = 16  # original_max_position_embeddings: every test runs past it
_DENSE = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=128)
SCALINGS = {
    "linear": dict(rope_type="linear", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=ORIGINAL),
    # every optional yarn field off its default: another ramp, mscale ratio, untruncated bounds
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=ORIGINAL, beta_fast=16.0,
                        beta_slow=2.0, mscale=0.8, mscale_all_dim=0.5, truncate=False),
    "yarn-attention-factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL,
                                  attention_factor=1.3),
}


@pytest.fixture(params=list(SCALINGS), ids=list(SCALINGS))
def saved(request, tmp_path) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**_DENSE, rope_scaling=dict(SCALINGS[request.param]))).eval()
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


def _tokens(seq: int = 3 * ORIGINAL) -> torch.Tensor:
    return torch.randint(0, _DENSE["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1))


def _assert_same_logits(ref: LlamaForCausalLM, model) -> None:
    tokens = _tokens()
    with torch.no_grad():
        diff = (model(tokens) - ref(tokens).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff


def test_logits_equal_transformers_past_original_context(saved):
    ref, path = saved
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt.args.rope_scaling, (LinearRopeScaling, YarnRopeScaling))
    model = build_model(ckpt.args, ckpt.state_dict)
    # the same frequencies and cos/sin temperature, not merely close logits
    torch.testing.assert_close(model.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert model.rope_scale == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)
    _assert_same_logits(ref, model)


def test_greedy_generation_with_kv_cache_equals_transformers(saved):
    ref, path = saved
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.args, ckpt.state_dict)
    prompt = _tokens(ORIGINAL + 4)[0].tolist()  # the prompt alone is past the original context
    new = 2 * ORIGINAL
    ours = [step[0] for step in generate_ids(model, [prompt], max_new_tokens=new)]
    ref.generation_config.eos_token_id = None  # herd's loop has no stop id here; neither may transformers'
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert ours == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("route", [("hf",), ("gguf", "hf"), ("meta", "hf")], ids=["hf-hf", "hf-gguf-hf", "hf-meta-hf"])
def test_conversions_keep_the_scaling(saved, tmp_path, route):
    ref, path = saved
    args = read_args(path)
    src = path
    for i, fmt in enumerate(route):
        dst = tmp_path / f"{i}-{fmt}" / ("model.gguf" if fmt == "gguf" else "")
        dst.parent.mkdir(exist_ok=True)
        convert(src, dst, fmt, tokenizer=False)
        assert read_args(dst).rope_scaling == args.rope_scaling, fmt
        src = dst
    # transformers reads herd's HF output as the model it saved
    _assert_same_logits(ref, lambda t: LlamaForCausalLM.from_pretrained(src).eval()(t).logits)
    # herd info states the scheme
    assert main(["info", str(src), "--json"]) == 0


def test_gguf_uses_llama_cpp_keys(saved, tmp_path):
    from herd.checkpoint.gguf import read_gguf_metadata

    _, path = saved
    s = read_args(path).rope_scaling
    convert(path, tmp_path / "m.gguf", "gguf", tokenizer=False)
    meta = read_gguf_metadata(tmp_path / "m.gguf")
    assert meta["llama.rope.scaling.type"] == s.kind
    assert meta["llama.rope.scaling.factor"] == s.factor
    if s.kind == "yarn":
        assert meta["llama.rope.scaling.original_context_length"] == ORIGINAL
        assert meta["llama.rope.scaling.yarn_beta_fast"] == s.beta_fast


def test_meta_params_do_not_claim_llama3_scaling(saved, tmp_path):
    """Meta's `use_scaled_rope` means llama3 scaling; the scheme lives in herd's own object."""
    _, path = saved
    ckpt = read_checkpoint(path)
    write_checkpoint(tmp_path / "meta", "meta", ckpt.args, ckpt.state_dict)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is False and "rope_scaling_factor" not in params
    assert params["herd"]["rope_scaling"]["rope_type"] == ckpt.args.rope_scaling.kind


def test_top_level_original_context_wins_like_transformers(tmp_path):
    """transformers' standardize_rope_params lets a top-level original_max_position_embeddings
    (Phi-3 style) override the one inside the yarn parameters."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_DENSE, rope_scaling=dict(SCALINGS["yarn"]))).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["original_max_position_embeddings"] = 2 * ORIGINAL
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ref = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert read_args(tmp_path).rope_scaling.original_max_position_embeddings == 2 * ORIGINAL
    ckpt = read_checkpoint(tmp_path)
    _assert_same_logits(ref, build_model(ckpt.args, ckpt.state_dict))


@pytest.mark.parametrize("rope", [
    dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=16),
    dict(type="su", factor=2.0),
], ids=["longrope", "unknown"])
def test_unsupported_scaling_is_one_line(tmp_path, rope):
    cfg = {"model_type": "llama", **_DENSE, "rope_scaling": rope}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HerdError) as e:
        read_args(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "RoPE scaling type" in message and "yarn" in message  # names what works
    assert repr(rope.get("rope_type", rope.get("type"))) in message


def test_dynamic_ntk_equals_transformers_up_to_the_context_limit(tmp_path):
    """rope_type "dynamic" was refused. transformers' dynamic NTK changes the frequencies only once a
    forward reaches past max_position_embeddings; herd's context ends there, so up to it herd's
    logits and greedy ids (through the KV cache) are transformers', and a longer prompt is refused."""
    limit = _DENSE["max_position_embeddings"]
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**_DENSE, rope_scaling=dict(rope_type="dynamic", factor=2.0))).eval()
    ref.save_pretrained(tmp_path / "hf")
    ckpt = read_checkpoint(tmp_path / "hf")
    assert ckpt.args.max_seq_len == limit and ckpt.args.rope_scaling == DynamicNtkRopeScaling(2.0)
    model = build_model(ckpt.args, ckpt.state_dict)
    tokens = _tokens(limit)
    with torch.no_grad():
        diff = (model(tokens) - ref(tokens).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = tokens[0, :limit - 40].tolist()
    ours = [step[0] for step in generate_ids(model, [prompt], max_new_tokens=40)]  # to the last position
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert len(ours) == 40 and ours == theirs[0, len(prompt):].tolist()
    with pytest.raises(HerdError, match="does not fit the model's context"):
        list(generate_ids(model, [tokens[0].tolist()], max_new_tokens=1))
    with pytest.raises(HerdError, match="missing key 'factor'"):  # transformers needs it too
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        scaling = cfg.get("rope_scaling") or cfg["rope_parameters"]
        scaling.pop("factor")
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        read_args(tmp_path / "hf")


def test_llama4_refuses_other_scalings_in_one_line():
    """Llama 4's mappings (HF and Meta) write llama3's fields only: a yarn Llama 4 would be written
    back without its scaling, so it is refused on the way in."""
    from transformers import Llama4TextConfig

    from herd.checkpoint.hf import args_from_hf_config

    cfg = Llama4TextConfig(vocab_size=97, hidden_size=48, intermediate_size=40, intermediate_size_mlp=72,
                           num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=256, num_local_experts=3,
                           rope_scaling=dict(SCALINGS["yarn"])).to_dict()
    with pytest.raises(HerdError, match="RoPE scaling type 'yarn' is not supported for Llama 4") as e:
        args_from_hf_config(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("keys, refused", [
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, None),
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, None),  # original context: context_length
    ({"rope.scaling.type": "longrope", "rope.scaling.factor": 4.0}, r"RoPE scaling type 'longrope' is not supported \(llama3, linear, yarn"),
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.yarn_log_multiplier": 0.1},
     "yarn_log_multiplier"),  # DeepSeek's extra temperature: not what transformers' Llama computes
], ids=["linear", "yarn", "longrope", "yarn-log-multiplier"])
def test_gguf_scaling_keys_from_llama_cpp(keys, refused):
    from herd.checkpoint.gguf import args_from_gguf_metadata

    meta = {"general.architecture": "llama", "llama.embedding_length": 48, "llama.attention.head_count": 6,
            "llama.block_count": 2, "llama.feed_forward_length": 72, "llama.vocab_size": 97,
            "llama.context_length": 64, **{f"llama.{k}": v for k, v in keys.items()}}
    if refused is None:
        s = args_from_gguf_metadata(meta).rope_scaling
        assert (s.kind, s.factor) == (keys["rope.scaling.type"], 4.0)
        assert s.kind == "linear" or s.original_max_position_embeddings == 64
        return
    with pytest.raises(HerdError, match=refused) as e:
        args_from_gguf_metadata(meta)
    assert "\n" not in str(e.value)
