"""Llama models with transformers' `attention_bias` / `mlp_bias` (biases on q/k/v/o and on
gate/up/down): loaded from what transformers saves, their logits equal transformers' (fp32); herd's
HF, Meta (also model-parallel) and GGUF outputs read back exactly and load in transformers; a
bias the config does not ask for, or one it asks for and the weights lack, is one HerdError line.
Quantized and pre-packed linears add the bias; LoRA trains on top of a biased base.

Biases are drawn with randn: transformers initializes them to zero, where a dropped or misplaced
bias (a q/k bias left in HF's RoPE layout) would not show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from herd.checkpoint import build_model, read_args, read_checkpoint, write_checkpoint
from herd.errors import HerdError
from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer

_BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=256)
FLAGS = [(True, False), (False, True), (True, True)]
POSITIONS = torch.arange(30, 70)  # past position 0: a q/k bias in the wrong RoPE layout shows


def _hf_model(attention_bias: bool, mlp_bias: bool, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**{**_BASE, "attention_bias": attention_bias, "mlp_bias": mlp_bias,
                                          **overrides})).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return ref


def _save(tmp_path: Path, attention_bias: bool, mlp_bias: bool, **overrides) -> tuple[LlamaForCausalLM, Path]:
    ref = _hf_model(attention_bias, mlp_bias, **overrides)
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


def _tokens(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, len(POSITIONS)), generator=torch.Generator().manual_seed(1))


def _herd_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, positions=POSITIONS.expand_as(tokens))


def _hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, position_ids=POSITIONS.expand_as(tokens)).logits.float()


def _biased_args(attention_bias: bool = True, mlp_bias: bool = True, **changes) -> ModelArgs:
    return ModelArgs(**{**dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=72,
                               rope_theta=10000.0, max_seq_len=256), **changes},
                     attention_bias=attention_bias, mlp_bias=mlp_bias)


def _random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.2, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


# ---- transformers' checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("attention_bias,mlp_bias", FLAGS, ids=["attn", "mlp", "both"])
@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=16),
                                       dict(num_key_value_heads=6)], ids=["gqa", "mqa-tied-headdim", "mha"])
def test_transformers_checkpoint_matches_and_round_trips(tmp_path, attention_bias, mlp_bias, overrides):
    ref, path = _save(tmp_path, attention_bias, mlp_bias, **overrides)
    ckpt = read_checkpoint(path)
    assert (ckpt.args.attention_bias, ckpt.args.mlp_bias) == (attention_bias, mlp_bias)
    assert read_args(path).num_params() == sum(p.numel() for p in ref.parameters())  # herd info counts them
    model = build_model(ckpt.args, ckpt.state_dict)
    tokens = _tokens()
    want = _hf_logits(ref, tokens)
    torch.testing.assert_close(_herd_logits(model, tokens), want, rtol=0, atol=1e-5)

    # herd's HF output: the flags in config.json, the tensors (q/k biases back in HF's layout) as saved
    write_checkpoint(tmp_path / "out", "hf", ckpt.args, ckpt.state_dict)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["attention_bias"], cfg["mlp_bias"]) == (attention_bias, mlp_bias)
    theirs, ours = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    if ref.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    again = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(_hf_logits(again, tokens), want, rtol=0, atol=1e-5)


# ---- herd's own formats ----------------------------------------------------------------------------
@pytest.mark.parametrize("attention_bias,mlp_bias", FLAGS, ids=["attn", "mlp", "both"])
def test_every_format_round_trips_exactly(tmp_path, attention_bias, mlp_bias):
    args = _biased_args(attention_bias, mlp_bias)
    model = _random_model(args)
    sd = model.state_dict()
    tokens = _tokens()
    want = _herd_logits(model, tokens)
    paths = {"hf": tmp_path / "hf", "meta": tmp_path / "meta", "meta-mp2": tmp_path / "mp2", "gguf": tmp_path / "m.gguf"}
    for fmt, p in paths.items():
        write_checkpoint(p, fmt.split("-")[0], args, sd, model_parallel=2 if fmt == "meta-mp2" else 1)
    for fmt, p in paths.items():
        ckpt = read_checkpoint(p)
        assert (ckpt.args.attention_bias, ckpt.args.mlp_bias) == (attention_bias, mlp_bias), fmt
        assert (read_args(p).attention_bias, read_args(p).mlp_bias) == (attention_bias, mlp_bias), fmt
        assert ckpt.state_dict.keys() == sd.keys(), fmt
        for k, v in sd.items():
            assert torch.equal(ckpt.state_dict[k], v), (fmt, k)
        assert torch.equal(_herd_logits(build_model(ckpt.args, ckpt.state_dict), tokens), want), fmt


def test_meta_shards_split_column_biases_and_replicate_row_biases(tmp_path):
    """fairscale's layout: ColumnParallelLinear's bias is split with the weight's rows,
    RowParallelLinear's is whole on every rank (added once, after the all-reduce)."""
    args = _biased_args()
    sd = _random_model(args).state_dict()
    write_checkpoint(tmp_path / "mp2", "meta", args, sd, model_parallel=2)
    s0, s1 = (torch.load(tmp_path / "mp2" / f"consolidated.0{i}.pth", weights_only=True) for i in (0, 1))
    for name in ("attention.wq.bias", "attention.wk.bias", "feed_forward.w1.bias", "feed_forward.w3.bias"):
        k = f"layers.1.{name}"
        assert torch.equal(torch.cat([s0[k], s1[k]]), sd[k]), k
    for name in ("attention.wo.bias", "feed_forward.w2.bias"):
        k = f"layers.1.{name}"
        assert torch.equal(s0[k], sd[k]) and torch.equal(s1[k], sd[k]), k
    params = json.loads((tmp_path / "mp2" / "params.json").read_text())
    assert params["herd"]["attention_bias"] is True and params["herd"]["mlp_bias"] is True


def test_transformers_reads_our_biased_gguf(tmp_path):
    """llama.cpp's convert_hf_to_gguf permutes q/k biases with their weights; transformers' GGUF
    loader undoes that permutation on both. Its config from a GGUF has no bias flags (llama.cpp has
    no key: the tensors' presence says it), so it is given the HF config."""
    ref, path = _save(tmp_path, True, True)
    ckpt = read_checkpoint(path)
    write_checkpoint(tmp_path / "m.gguf", "gguf", ckpt.args, ckpt.state_dict)
    back = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=ref.config,
                                            dtype=torch.float32).eval()
    tokens = _tokens()
    torch.testing.assert_close(_hf_logits(back, tokens), _hf_logits(ref, tokens), rtol=0, atol=1e-5)


# ---- what does not fit is refused -------------------------------------------------------------------
def test_bias_tensors_without_the_flag_are_refused(tmp_path):
    _, path = _save(tmp_path, True, False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["attention_bias"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HerdError, match=r"unexpected bias 'layers\.0\.attention\.w.\.bias'.*attention_bias=false") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)


def test_flag_without_bias_tensors_is_refused(tmp_path):
    _, path = _save(tmp_path, False, True)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.bias"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HerdError, match=r"missing 1 weight\(s\), first 'layers\.1\.feed_forward\.w2\.bias'"):
        read_checkpoint(path)


def test_gguf_with_part_of_the_biases_is_refused(tmp_path):
    from gguf import GGUFWriter

    from herd.checkpoint.gguf import read_gguf

    args = _biased_args(True, False)
    sd = _random_model(args).state_dict()
    write_checkpoint(tmp_path / "m.gguf", "gguf", args, sd)
    ckpt = read_checkpoint(tmp_path / "m.gguf")
    # rewrite without blk.1.attn_output.bias (llama.cpp's loader takes each bias as optional)
    from herd.checkpoint.gguf import to_gguf_name

    w = GGUFWriter(str(tmp_path / "part.gguf"), "llama")
    src = read_gguf(tmp_path / "m.gguf")[2]
    for key, value in src.items():
        if key != "general.architecture":
            vtype, sub = src.types[key]
            w.add_key_value(key, value, vtype, sub)
    for k, v in ckpt.state_dict.items():
        if k != "layers.1.attention.wo.bias":
            w.add_tensor(to_gguf_name(k), v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HerdError, match=r"missing 1 weight\(s\), first 'layers\.1\.attention\.wo\.bias'"):
        read_checkpoint(tmp_path / "part.gguf")


def test_bias_flags_must_be_booleans(tmp_path):
    with pytest.raises(HerdError, match="attention_bias must be true or false"):
        _biased_args(attention_bias="false")
    _, path = _save(tmp_path, False, False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["mlp_bias"] = "true"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HerdError, match="mlp_bias must be true or false"):
        read_args(path)


# ---- max_position_embeddings absent: transformers' LlamaConfig default --------------------------------
def test_missing_max_position_embeddings_is_transformers_2048(tmp_path):
    """transformers fills in 2048 (LlamaConfig's default), and llama3 RoPE without an original
    context falls back to it; herd used 8192, a different RoPE than the model was run with."""
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    _, path = _save(tmp_path, False, False, rope_scaling={**rope, "original_max_position_embeddings": 64})
    cfg = json.loads((path / "config.json").read_text())
    del cfg["max_position_embeddings"]
    cfg["rope_parameters"].pop("original_max_position_embeddings")
    (path / "config.json").write_text(json.dumps(cfg))
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ref.config.max_position_embeddings == 2048
    args = read_args(path)
    assert args.max_seq_len == 2048 and args.rope_scaling.original_max_position_embeddings == 2048
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.args, ckpt.state_dict)
    tokens = _tokens()
    far = torch.arange(3000, 3000 + tokens.shape[1]).expand_as(tokens)  # beyond 2048: the scaling applies
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions=far), ref(tokens, position_ids=far).logits,
                                   rtol=0, atol=1e-5)


# ---- inference and training on a biased model ----------------------------------------------------------
def test_init_weights_zeroes_biases():
    model = Transformer(_biased_args())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    model.init_weights()
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 2 * 7 and all(torch.equal(p, torch.zeros_like(p)) for p in biases.values())
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_packed_linears_add_the_bias():
    from herd.inference.cpu_linear import PackedLinear, pack_linears, packing_available

    if not packing_available():
        pytest.skip("oneDNN packing is not available")
    model = _random_model(_biased_args())
    tokens = _tokens()
    want = _herd_logits(model, tokens)
    pack_linears(model, tune=False)
    assert isinstance(model.layers[0].attention.wq, PackedLinear) and model.layers[0].attention.wq.bias is not None
    torch.testing.assert_close(_herd_logits(model, tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_biased_model_stays_close(mode):
    from herd.inference.quantize import FP8Linear, Int8Linear, quantize

    model = _random_model(_biased_args(n_layers=3))
    tokens = _tokens()
    want = _herd_logits(model, tokens)
    quantize(model, mode)
    quantized = model.layers[1].feed_forward.w2
    assert isinstance(quantized, Int8Linear if mode == "int8" else FP8Linear) and quantized.bias is not None
    got = _herd_logits(model, tokens)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.99, cos
    # the biases matter here: without them the logits are far off (a dropped bias would not pass)
    assert (got - want).abs().mean() < 0.2 * (want - _herd_logits(_random_model(_biased_args(
        n_layers=3, attention_bias=False, mlp_bias=False)), tokens)).abs().mean()


def test_lora_trains_on_a_biased_base(tmp_path):
    from herd.train.lora import LoRAConfig, apply_lora, merged_state_dict

    model = _random_model(_biased_args()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(names) == 2 * 7
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(".lora." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    tokens = _tokens()
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    merged = merged_state_dict(model)
    for k, v in before.items():
        if k.endswith(".bias"):
            assert torch.equal(merged[k], v), k  # the base biases stay frozen and are kept
    model.eval()
    plain = build_model(model.args, merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_lora_on_a_biased_base_loads_in_peft(tmp_path):
    """The adapters herd exports (bias="none": the base's biases are the base's) give PEFT on the
    HF conversion of the biased base herd's logits."""
    peft = pytest.importorskip("peft")
    from herd.checkpoint.hf import hf_config_from_args, to_hf_state_dict
    from herd.train.lora import LoRAConfig, apply_lora, lora_modules, save_lora

    args = _biased_args()
    model = _random_model(args)
    ref = LlamaForCausalLM(LlamaConfig(**hf_config_from_args(args))).eval()
    ref.load_state_dict(to_hf_state_dict(model.state_dict(), args), strict=True)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at the start would hide a wrong B
        for m in lora_modules(model).values():
            m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * 0.2)
    save_lora(model, tmp_path / "lora")
    adapted = peft.PeftModel.from_pretrained(ref, tmp_path / "lora").eval()
    tokens = _tokens()
    torch.testing.assert_close(_hf_logits(adapted, tokens), _herd_logits(model, tokens), rtol=0, atol=1e-4)
