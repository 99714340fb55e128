"""Pre-training a model with projection biases (`model.attention_bias` / `model.mlp_bias`): the
loop builds it on the meta device and initializes the biases to zero (init_weights set every 1-D
parameter to one, the norms' value), trains them, and its checkpoint reads back as the same biased
model; continuing from it with the flags changed is refused by name."""

from __future__ import annotations

import pytest
import torch

from herd.checkpoint import read_checkpoint
from herd.errors import HerdError
from herd.train import checkpoint as ckpt
from herd.train.config import load_config
from herd.train.loop import Trainer

from .conftest import debug_overrides


def test_biased_model_trains_and_checkpoints(shards, tmp_path):
    overrides = debug_overrides(shards, tmp_path / "run", **{"model.attention_bias": "true", "model.mlp_bias": "true",
                                                             "train.steps": 3, "checkpoint.every": 3})
    trainer = Trainer(load_config(overrides=overrides), progress=False, log=lambda m: None)
    biases = {n: p for n, p in trainer.model.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 7 * trainer.args.n_layers
    assert all(torch.equal(p, torch.zeros_like(p)) for p in biases.values())
    trainer.run()
    assert all(p.abs().sum() > 0 for p in biases.values())  # they trained
    saved = read_checkpoint(ckpt.latest_checkpoint(tmp_path / "run") / "model")
    assert saved.args.attention_bias and saved.args.mlp_bias
    for n, p in biases.items():
        assert torch.equal(saved.state_dict[n], p.detach()), n

    plain = debug_overrides(shards, tmp_path / "plain", **{"train.init_from": f'"{tmp_path / "run"}"'})
    with pytest.raises(HerdError, match="attention_bias True → False"):
        Trainer(load_config(overrides=plain), progress=False, log=lambda m: None)
