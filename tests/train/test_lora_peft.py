"""herd's LoRA against PEFT (the reference every LoRA user has) on transformers' LlamaForCausalLM with
the same base weights: the same forward, the same merged weights, and adapters that travel both ways
(herd's <out>/lora loads with `PeftModel.from_pretrained`; a PEFT directory loads with `load_lora`).

HF's q_proj / k_proj rows are Meta's permuted for RoPE's layout (herd/checkpoint/hf.py), so an adapter
on wq / wk is the same adapter in HF only with B's rows permuted the same way; the debug preset has
GQA (8 query heads, 2 KV heads), so both permutations are exercised."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from herd.checkpoint.hf import permute_to_hf, to_hf_state_dict
from herd.errors import HerdError
from herd.models.args import get_preset
from herd.train.lora import LoRAConfig, apply_lora, load_lora, lora_modules, merged_state_dict, save_lora
from tests.reference import herd_and_hf

HF_LEAF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
           "w3": "up_proj"}


def _randomize(model, seed=1):
    """Nonzero A and B (B starts at zero, which would hide a wrong B or a wrong scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora.A.copy_(torch.randn(m.lora.A.shape, generator=g) * 0.2)
            m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * 0.2)


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def test_forward_and_merge_equal_peft():
    args = get_preset("debug")
    model, ref = herd_and_hf(args)
    targets = tuple(HF_LEAF)
    apply_lora(model, LoRAConfig(rank=4, alpha=12, targets=targets))
    _randomize(model)
    peft = get_peft_model(ref, LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, task_type="CAUSAL_LM",
                                          target_modules=[HF_LEAF[t] for t in targets])).eval()
    # copy A/B by hand (independent of herd's PEFT writer): only B's rows move for q / k
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            _, i, block, leaf = name.split(".")
            hf = peft.base_model.model.model.layers[int(i)].get_submodule(
                f"{'self_attn' if block == 'attention' else 'mlp'}.{HF_LEAF[leaf]}")
            assert hf.scaling["default"] == m.lora.scale == 12 / 4  # alpha / r, both
            B = {"wq": lambda b: permute_to_hf(b, args.n_heads), "wk": lambda b: permute_to_hf(b, args.kv_heads)}.get(
                leaf, lambda b: b)(m.lora.B)
            hf.lora_A["default"].weight.copy_(m.lora.A)
            hf.lora_B["default"].weight.copy_(B)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    torch.testing.assert_close(_logits(model, tokens), _logits(peft, tokens), rtol=0, atol=1e-4)
    ours = to_hf_state_dict(merged_state_dict(model), args)
    theirs = peft.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("targets", [("wq", "wk"), tuple(HF_LEAF)])
def test_save_lora_loads_in_peft_with_herds_logits(tmp_path, targets):
    args = get_preset("debug")
    model, ref = herd_and_hf(args)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    _randomize(model)
    save_lora(model, tmp_path / "lora", base="runs/base")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"], cfg["base_model_name_or_path"]) \
        == ("LORA", "CAUSAL_LM", 4, 8, "none", "runs/base")
    assert sorted(cfg["target_modules"]) == sorted(HF_LEAF[t] for t in targets)
    # a key PEFT did not recognise would leave its B at zero: the logits below would be the base's
    peft = PeftModel.from_pretrained(ref, tmp_path / "lora").eval()
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    torch.testing.assert_close(_logits(peft, tokens), _logits(model, tokens), rtol=0, atol=1e-4)
    # herd's own format still reads back
    fresh, _ = herd_and_hf(args)
    load_lora(fresh, tmp_path / "lora")
    torch.testing.assert_close(_logits(fresh, tokens), _logits(model, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_load_lora_reads_a_peft_directory(tmp_path, rslora):
    args = get_preset("debug")
    model, ref = herd_and_hf(args)
    peft = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", use_rslora=rslora,
                                          target_modules=["q_proj", "k_proj", "down_proj"]))
    with torch.no_grad():  # B = 0 from PEFT's init would make any reading look right
        g = torch.Generator().manual_seed(3)
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft.save_pretrained(tmp_path / "peft")
    load_lora(model, tmp_path / "peft")
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)}) == ["w2", "wk", "wq"]
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    torch.testing.assert_close(_logits(model, tokens), _logits(peft.eval(), tokens), rtol=0, atol=1e-4)


def test_peft_adapters_herd_cannot_express_are_refused(tmp_path):
    args = get_preset("debug")
    _, ref = herd_and_hf(args)
    get_peft_model(ref, LoraConfig(r=2, task_type="CAUSAL_LM", target_modules=["q_proj"], bias="lora_only")) \
        .save_pretrained(tmp_path / "bias")
    with pytest.raises(HerdError, match="PEFT adapter herd cannot load .bias='lora_only'"):
        load_lora(herd_and_hf(args)[0], tmp_path / "bias")


def test_tied_output_cannot_take_an_adapter():
    # SmolLM2 / Llama 3.2 tie output to the embedding: an adapter there used to be dropped by the
    # export (which keeps the embedding alone) and merge_lora moved the embedding with it.
    model, _ = herd_and_hf(get_preset("debug").replace(tie_embeddings=True))
    with pytest.raises(HerdError, match="'output' shares its weight"):
        apply_lora(model, LoRAConfig(rank=2, targets=("wq", "output")))
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # refused before any change
    untied, _ = herd_and_hf(get_preset("debug"))
    assert "output" in apply_lora(untied, LoRAConfig(rank=2, targets=("output",)))


def test_adapters_of_another_model_size_are_one_line(tmp_path):
    # the shapes used to surface as load_state_dict's RuntimeError traceback
    small, _ = herd_and_hf(get_preset("debug"))
    apply_lora(small, LoRAConfig(rank=2, targets=("wq",)))
    save_lora(small, tmp_path / "lora")
    wide, _ = herd_and_hf(get_preset("debug").replace(dim=128))
    with pytest.raises(HerdError, match="adapters do not fit this model .size mismatch"):
        load_lora(wide, tmp_path / "lora")
