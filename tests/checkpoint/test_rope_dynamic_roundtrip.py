"""Dynamic NTK RoPE ({"rope_type": "dynamic", "factor": F}) survives herd's load → save round trip.

herd computes it as plain RoPE (transformers changes the frequencies only past
max_position_embeddings, where herd's context ends), but it used to drop the scaling on the way
out: transformers then ran the re-saved model differently past max_position_embeddings. Here a
tiny `LlamaForCausalLM` saved by transformers goes through every format herd writes and comes back
with transformers' logits unchanged on a sequence longer than max_position_embeddings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Llama4TextConfig, LlamaConfig, LlamaForCausalLM

from herd.checkpoint import build_model, convert, read_args, read_checkpoint
from herd.cli import main
from herd.errors import HerdError
from herd.models.args import DynamicNtkRopeScaling, ModelArgs
from tests.checkpoint.test_rope_scaling import _DENSE, _tokens
from tests.checkpoint.test_transformers_saved import _LLAMA4, _save_llama4

FACTOR = 2.0
LIMIT = _DENSE["max_position_embeddings"]
PAST = LIMIT + 64  # where transformers' dynamic NTK raises the RoPE base


@pytest.fixture
def saved(tmp_path) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**_DENSE, rope_scaling=dict(rope_type="dynamic", factor=FACTOR))).eval()
    with torch.no_grad():  # std 0.02 leaves attention near uniform: RoPE's base would hardly show
        for p in ref.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


def _hf_scaling(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return cfg.get("rope_scaling") or cfg["rope_parameters"]


def _hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """A fresh transformers model per call: its dynamic RoPE caches the frequencies of the longest
    forward so far."""
    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(path).eval()(tokens).logits.float()


def test_reading_keeps_the_factor(saved):
    _, path = saved
    assert read_args(path).rope_scaling == DynamicNtkRopeScaling(FACTOR)


@pytest.mark.parametrize("route", [("hf",), ("meta", "hf"), ("gguf", "hf")], ids=["hf-hf", "hf-meta-hf", "hf-gguf-hf"])
def test_round_trip_keeps_transformers_logits_past_the_context(saved, tmp_path, route):
    _, path = saved
    src = path
    for i, fmt in enumerate(route):
        dst = tmp_path / f"{i}-{fmt}" / ("model.gguf" if fmt == "gguf" else "")
        dst.parent.mkdir(exist_ok=True)
        convert(src, dst, fmt, tokenizer=False)
        assert read_args(dst).rope_scaling == DynamicNtkRopeScaling(FACTOR), fmt
        src = dst
    scaling = _hf_scaling(src)
    assert (scaling.get("rope_type", scaling.get("type")), scaling["factor"]) == ("dynamic", FACTOR)
    assert json.loads((src / "config.json").read_text())["max_position_embeddings"] == LIMIT

    tokens = _tokens(PAST)
    original = _hf_logits(path, tokens)
    torch.testing.assert_close(_hf_logits(src, tokens), original, rtol=0, atol=1e-5)
    # The comparison can fail: the same weights as plain RoPE (what herd wrote before) compute
    # otherwise once a forward reaches past max_position_embeddings (transformers then raises the
    # base for every position of it), and the same up to it.
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_scaling", None), cfg.pop("rope_parameters", None)
    (src / "config.json").write_text(json.dumps(cfg))
    plain = _hf_logits(src, tokens)
    assert (plain - original).abs().max() > 1e-2
    short = tokens[:, :LIMIT]
    torch.testing.assert_close(_hf_logits(src, short), _hf_logits(path, short), rtol=0, atol=1e-5)


def test_herd_computes_plain_rope_equal_to_transformers_within_the_context(saved, tmp_path):
    ref, path = saved
    convert(path, tmp_path / "meta", "meta", tokenizer=False)  # also after herd's own format
    for src in (path, tmp_path / "meta"):
        ckpt = read_checkpoint(src)
        model = build_model(ckpt.args, ckpt.state_dict)
        # transformers' frequencies below max_position_embeddings, bit for bit, and no cos/sin scale
        torch.testing.assert_close(model.inv_freq, ref.model.rotary_emb.original_inv_freq, rtol=0, atol=0)
        assert model.rope_scale == 1.0 == ref.model.rotary_emb.attention_scaling
        tokens = _tokens(LIMIT)
        with torch.no_grad():
            diff = (model(tokens) - ref(tokens).logits.float()).abs().max().item()
        assert diff <= 1e-4, (src, diff)


def test_herd_formats_record_it(saved, tmp_path):
    """params.json: not Meta's llama3 flag, herd's own object; GGUF: no llama.cpp scaling (it has no
    dynamic NTK; plain RoPE is right within context_length), herd's key for the factor."""
    from gguf import GGUFReader

    from herd.checkpoint.gguf import ROPE_FREQS, read_gguf_metadata

    _, path = saved
    convert(path, tmp_path / "meta", "meta", tokenizer=False)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is False and "rope_scaling_factor" not in params
    assert params["herd"]["rope_scaling"] == {"rope_type": "dynamic", "factor": FACTOR}

    convert(path, tmp_path / "m.gguf", "gguf", tokenizer=False)
    meta = read_gguf_metadata(tmp_path / "m.gguf")
    assert not any(k.startswith("llama.rope.scaling") for k in meta)
    assert meta["herd.rope.scaling.dynamic_factor"] == FACTOR
    assert meta["llama.context_length"] == LIMIT
    assert ROPE_FREQS not in [t.name for t in GGUFReader(tmp_path / "m.gguf").tensors]  # llama3's tensor


def test_herd_info_names_it(saved, capsys):
    _, path = saved
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["rope_scaling_type"], info["rope_scaling"]) == ("dynamic", FACTOR)


@pytest.mark.parametrize("factor", [0.0, -2.0, math.inf, math.nan])
def test_bad_factor_is_one_line(saved, factor):
    """A zero, negative or non-finite factor gives transformers a zero, negative, infinite or NaN
    RoPE base past the context; herd read it as plain RoPE without a word."""
    from herd.checkpoint.hf import args_from_hf_config

    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (cfg.get("rope_scaling") or cfg["rope_parameters"])["factor"] = factor
    # (herd's config.json reader refuses Infinity and NaN before this; a library caller's dict does not)
    with pytest.raises(HerdError, match="rope_scaling factor must be positive and finite") as e:
        args_from_hf_config(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(HerdError, match="positive and finite"):
        ModelArgs(dim=48, n_layers=1, n_heads=6, vocab_size=97, rope_scaling=DynamicNtkRopeScaling(factor))


def test_llama4_round_trip_keeps_it(tmp_path):
    """Llama 4's mappings took dynamic NTK as plain RoPE and wrote it back without it."""
    from transformers import Llama4ForCausalLM

    from herd.checkpoint.meta_llama4 import llama4_args_from_params, params_from_llama4_args

    ref, path = _save_llama4(tmp_path / "hf", rope_scaling=dict(rope_type="dynamic", factor=FACTOR))
    args = read_args(path)
    assert args.rope_scaling == DynamicNtkRopeScaling(FACTOR)
    params = params_from_llama4_args(args)
    assert params["use_scaled_rope"] is False and "rope_scaling_factor" not in params
    assert llama4_args_from_params(params).rope_scaling == args.rope_scaling

    convert(path, tmp_path / "out", "hf", tokenizer=False)
    scaling = _hf_scaling(tmp_path / "out")
    assert (scaling["rope_type"], scaling["factor"]) == ("dynamic", FACTOR)
    assert Llama4TextConfig.from_pretrained(tmp_path / "out").rope_parameters["rope_type"] == "dynamic"
    tokens = torch.randint(0, _LLAMA4["vocab_size"], (1, _LLAMA4["max_position_embeddings"] + 32),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = Llama4ForCausalLM.from_pretrained(tmp_path / "out").eval()(tokens).logits
        torch.testing.assert_close(theirs, ref(tokens).logits, rtol=0, atol=1e-5)
