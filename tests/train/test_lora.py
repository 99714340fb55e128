"""LoRA adapters: the LoRA formula W x + (α/r)·B A x (Hu et al. 2021, as peft computes it), exact
start, merging, export round trip, and that only adapters train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.errors import HerdError
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train.lora import (
    LoRAConfig,
    apply_lora,
    load_lora,
    lora_modules,
    merge_lora,
    merged_state_dict,
    save_lora,
    trainable_parameters,
)


def _model(seed=0):
    args = get_preset("debug")
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    m.init_weights(generator=torch.Generator().manual_seed(seed))
    return m


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * 0.1)


def test_lora_formula_start_merge_and_export(tmp_path):
    model = _model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(tokens)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(names) == 7 * model.args.n_layers
    with torch.no_grad():
        assert torch.equal(model(tokens), before)  # B = 0: training starts from the unchanged model
    _randomize_adapters(model)
    wq = model.layers[0].attention.wq
    x = torch.randn(3, wq.in_features)
    expected = F.linear(x, wq.weight) + (8 / 4) * (x @ wq.lora.A.t() @ wq.lora.B.t())  # peft's LoRA Linear
    torch.testing.assert_close(wq(x), expected)
    with torch.no_grad():
        adapted = model(tokens)
    assert not torch.allclose(adapted, before)
    sd = merged_state_dict(model)
    assert not any(".lora." in k for k in sd)

    save_lora(model, tmp_path / "adapter")
    fresh = _model()
    load_lora(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), adapted)

    merge_lora(model)
    assert not lora_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), adapted, rtol=1e-4, atol=1e-5)
    plain = _model()
    plain.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), adapted, rtol=1e-4, atol=1e-5)


def test_only_adapters_train():
    from herd.train.config import OptimConfig
    from herd.train.loop import build_optimizer

    model = _model()
    apply_lora(model, LoRAConfig(rank=2, targets=("wq", "wv")))
    n, total = trainable_parameters(model)
    assert n == sum(2 * (m.in_features + m.out_features) for m in lora_modules(model).values()) and n < total
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    tokens = torch.randint(0, model.args.vocab_size, (2, 8))
    for _ in range(2):
        loss = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())
    assert any(m.lora.B.abs().sum() > 0 for m in lora_modules(model).values())


def test_lora_bad_input(tmp_path):
    with pytest.raises(HerdError, match="lora.rank must be positive"):
        apply_lora(_model(), LoRAConfig(rank=0))
    with pytest.raises(HerdError, match="no linear layer named .nope.; valid: .*wq"):
        apply_lora(_model(), LoRAConfig(rank=2, targets=("nope",)))
    with pytest.raises(HerdError, match="not a LoRA adapter directory"):
        load_lora(_model(), tmp_path)
