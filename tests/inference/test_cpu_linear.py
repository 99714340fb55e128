"""Pre-packed CPU linears (herd/inference/cpu_linear.py): packing changes no number, and the
per-shape choice between packed and plain follows the timings it measures."""

import pytest
import torch
from torch import nn

from herd.inference import cpu_linear
from herd.inference.cpu_linear import PackedLinear, pack_linears, packed_is_faster
from herd.models.args import get_preset
from herd.models.llama3 import Transformer

pytestmark = pytest.mark.skipif(not cpu_linear.packing_available(), reason="oneDNN packing is not available")


def _model():
    args = get_preset("debug").replace(vocab_size=300, n_layers=3)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


def _shapes(model):
    kinds: dict[tuple, set] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, PackedLinear)):
            kinds.setdefault((m.out_features, m.in_features), set()).add(type(m))
    return kinds


@pytest.mark.parametrize("tune", [True, False])
def test_packing_keeps_the_logits(tune):
    model = _model()
    tokens = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
        pack_linears(model, tune=tune)
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kinds = _shapes(model)
    assert all(len(types) == 1 for types in kinds.values()), kinds  # one choice per shape
    if not tune:
        assert all(types == {PackedLinear} for types in kinds.values())


class _VirtualClock:
    """Time that passes only when a linear runs: `plain` per nn.Linear call, `packed` per PackedLinear."""

    def __init__(self, monkeypatch, plain: float, packed: float):
        self.now, self.plain, self.packed = 0.0, plain, packed
        forward = PackedLinear.forward

        def packed_forward(layer, x):
            self.now += self.packed
            return forward(layer, x)
        monkeypatch.setattr(PackedLinear, "forward", packed_forward)

    def hook(self, *_):
        self.now += self.plain

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("plain,packed,want", [(2.0, 1.0, True), (1.0, 0.9, True), (1.0, 2.0, False), (1.0, 1.0, False), (1.0, 0.97, False)])
def test_choice_follows_the_timings(monkeypatch, plain, packed, want):
    clock = _VirtualClock(monkeypatch, plain, packed)
    linears = [nn.Linear(64, 32) for _ in range(3)]
    for lin in linears:
        lin.register_forward_hook(clock.hook)
    assert packed_is_faster(linears, clock=clock) is want


def test_tuned_model_follows_the_choice(monkeypatch):
    # packed wins for the FFN's 3x-wide shapes only: exactly those are swapped, everywhere in the model
    model = _model()
    ffn_in = model.layers[0].feed_forward.w1.weight.shape
    monkeypatch.setattr(cpu_linear, "packed_is_faster", lambda linears: linears[0].weight.shape == ffn_in)
    pack_linears(model)
    for layer in model.layers:
        assert isinstance(layer.feed_forward.w1, PackedLinear) and isinstance(layer.feed_forward.w3, PackedLinear)
        assert type(layer.feed_forward.w2) is nn.Linear and type(layer.attention.wq) is nn.Linear
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
