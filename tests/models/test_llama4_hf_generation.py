"""Llama 4 generation on models transformers itself built and saved (`save_pretrained` → `herd.load`),
on the config variants the released models and their fine-tunes use: greedy ids through the
ChunkedKVCache equal `Llama4ForCausalLM.generate(do_sample=False)` for prompts shorter than, equal
to and several times the attention chunk, with generations crossing chunk boundaries; a
left-padded batch, and the serving engine (prefix sharing, chunked prefill, requests joining
mid-flight), equal one prompt at a time; `herd convert` hf → meta → hf keeps transformers' logits.
Configs nobody wrote by hand: transformers' own defaults fill everything not named here."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

import herd
from herd.cli import main
from herd.errors import HerdError
from herd.inference.engine import Engine
from herd.inference.generate import generate_batch

VOCAB = 160
# 4 layers, dim 32; chunk 8; temperature tuning from position 3 (floor_scale 4), strong (attn_scale 0.5).
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, intermediate_size_mlp=40, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, attention_chunk_size=8,
             floor_scale=4, attn_scale=0.5, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
             pad_token_id=0)
CONFIGS = {
    # Scout's pattern: NoPE every 4th layer, MoE every layer, top-1, QK-norm, temperature tuning
    "scout": {},
    # Maverick's: NoPE every 2nd layer, MoE every 2nd layer (dense in between), no QK-norm; top-2
    "maverick-top2": dict(no_rope_layer_interval=2, interleave_moe_layer_step=2, use_qk_norm=False,
                          num_experts_per_tok=2),
    # tuning from the first position on (floor_scale 1), and a milder one from position 2
    "tuning-fs1": dict(floor_scale=1, attn_scale=1.0, attention_chunk_size=12),
    "tuning-fs3": dict(floor_scale=3, attn_scale=0.2, no_rope_layer_interval=2),
    "no-tuning": dict(attn_temperature_tuning=False, attention_chunk_size=16),
    # tied embeddings, MQA (one KV head), head_dim wider than hidden_size / heads
    "tied-mqa": dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=16),
    # explicit per-layer lists (what transformers writes into every saved config.json)
    "lists-3-layers": dict(num_hidden_layers=3, no_rope_layers=[1, 0, 1], moe_layers=[1], num_experts_per_tok=2),
}


def hf_model(kw: dict, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**{**_BASE, **kw}))
    with torch.no_grad():  # large weights: sharp logits, so greedy ties cannot hide a wrong cache or mask
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (transformers' model, its save_pretrained directory, herd.load of it), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            ref = hf_model(CONFIGS[name])
            path = tmp_path_factory.mktemp(name) / "hf"
            ref.save_pretrained(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # no tokenizer files: ids in, ids out
                model, _ = herd.load(path)
            cache[name] = ref, path, model
        return cache[name]

    return get


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompts, n):
    return [generate_batch(model, [p], max_new_tokens=n)[0].ids for p in prompts]


def _hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_ids_equal_transformers_and_batching_changes_nothing(saved, name):
    ref, _, model = saved(name)
    C = ref.config.attention_chunk_size
    # shorter than, equal to, and several times the chunk; every generation crosses a chunk boundary
    prompts = _prompts((3, C, 3 * C + 2))
    n = C + 3
    alone = _alone(model, prompts, n)
    assert alone == [_hf_greedy(ref, p, n) for p in prompts]
    assert all(len(set(ids)) > 2 for ids in alone)  # not a degenerate repeat that any model would give
    # left-padded together (padding of up to 3C - 1 slots) equals each alone
    assert [c.ids for c in generate_batch(model, prompts + [[7]], max_new_tokens=n)] == alone + _alone(model, [[7]], n)


@pytest.mark.parametrize("name", ["scout", "maverick-top2"])
def test_engine_equals_generate_across_chunks(saved, name):
    ref, _, model = saved(name)
    C = ref.config.attention_chunk_size
    prompts = _prompts((3, C, 2 * C + 3, 1, 3 * C + 5), seed=2)
    n = C + 4
    alone = _alone(model, prompts, n)
    for config in (dict(),  # one prefill step, then batched decode
                   dict(num_blocks=40, max_batch=3, max_prefill_tokens=7, block_size=4),  # chunked prefill, queueing
                   dict(block_size=3, prefix_sharing=False)):
        engine = Engine(model, **config)
        assert [o[0].token_ids for o in engine.generate(prompts, max_tokens=n)] == alone, config
        assert engine.blocks.num_free == engine.blocks.num_blocks

    # prefix sharing: a "system prompt" of 2C + 1 tokens; later requests start mid-chunk from its blocks
    system = _prompts((2 * C + 1,), seed=3)[0]
    shared = [system + p for p in prompts[:3]]
    engine = Engine(model, block_size=C // 2)
    got = engine.generate(shared[:1], max_tokens=n) + engine.generate(shared[1:], max_tokens=n)
    assert [o[0].token_ids for o in got] == _alone(model, shared, n)
    assert engine.stats["prefix_hit_tokens"] >= 2 * 2 * C

    # requests joining while others decode: steps mix prefill chunks and decodes
    engine = Engine(model, max_batch=3, block_size=4, max_prefill_tokens=C + 1)
    out: dict[int, list[int]] = {}
    ids = []
    for p in prompts + shared:
        ids.append(engine.submit(p, max_tokens=n, listener=lambda ev: out.setdefault(ev.request_id, []).extend(
            ev.token_ids)))
        for _ in range(2):
            engine.step()
    while engine.step():
        pass
    assert [out[i] for i in ids] == alone + _alone(model, shared, n)


@pytest.mark.parametrize("name", ["scout", "maverick-top2", "tied-mqa", "lists-3-layers"])
def test_convert_hf_meta_hf_keeps_transformers_logits(saved, name, tmp_path, capsys):
    ref, path, _ = saved(name)
    assert main(["convert", str(path), str(tmp_path / "meta"), "--to", "meta"]) == 0
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    capsys.readouterr()
    tokens = torch.randint(1, VOCAB, (2, 3 * ref.config.attention_chunk_size + 5))
    with torch.no_grad():
        want = ref(tokens).logits
        back = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert (back(tokens).logits - want).abs().max().item() <= 1e-4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for d in (tmp_path / "meta", tmp_path / "hf"):
                model, _ = herd.load(d)
                assert (model(tokens) - want).abs().max().item() <= 1e-4, d


@pytest.mark.parametrize("key,value,match", [
    ("floor_scale", 0, "floor_scale"),  # transformers takes it and computes NaN logits
    ("no_rope_layer_interval", 0, "nope_every"),  # was read as the default 4
    ("interleave_moe_layer_step", 0, "moe_every"),  # was read as the default 1
])
def test_bad_config_values_are_one_line_errors(saved, tmp_path, key, value, match):
    _, path, _ = saved("scout")
    cfg = json.loads((path / "config.json").read_text())
    for k in ("no_rope_layers", "moe_layers", "layer_types"):  # derived lists: let the interval speak
        cfg.pop(k, None)
    cfg[key] = value
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(HerdError, match=match) as e:
        herd.load(bad)
    assert "\n" not in str(e.value)
