"""Tied input/output embeddings in pre-training (Llama 3.2 1B/3B, SmolLM2): the model the loop
builds on the meta device must train one shared table. nn.Module.to_empty gave the embedding and
the output head a new Parameter each, so a tied run trained two tables, its checkpoints (which
store the table once) dropped the trained head, and `--resume` continued from other weights than
the run had: the first loss after a resume differed."""

from __future__ import annotations

import json
import shutil

import torch

from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.models.llama4 import Transformer as Llama4Transformer
from herd.models.llama4 import get_llama4_preset
from herd.train import checkpoint as ckpt
from herd.train.config import load_config
from herd.train.loop import Trainer

from .conftest import debug_overrides


def test_to_empty_keeps_embeddings_tied():
    for model_class, args in ((Transformer, get_preset("debug")), (Llama4Transformer, get_llama4_preset("llama4-debug"))):
        with torch.device("meta"):
            model = model_class(args.replace(tie_embeddings=True))
        model.to_empty(device="cpu")
        assert model.output.weight is model.tok_embeddings.weight, model_class
        with torch.device("meta"):
            untied = model_class(args)
        assert untied.to_empty(device="cpu").output.weight is not untied.tok_embeddings.weight


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_tied_run_resumes_bitwise_and_saves_what_it_trained(shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    overrides = debug_overrides(shards, full, **{"model.tie_embeddings": "true", "train.steps": 4,
                                                 "checkpoint.every": 2})
    trainer = Trainer(load_config(overrides=overrides), progress=False, log=lambda m: None)
    trainer.run()
    model = trainer.model
    assert model.output.weight is model.tok_embeddings.weight
    assert len(trainer.optimizer.param_groups[0]["params"]) == sum(p.ndim >= 2 for p in model.parameters())
    saved, _ = ckpt.load_train_state(ckpt.latest_checkpoint(full))
    assert torch.equal(saved["tok_embeddings.weight"], model.output.weight.detach())  # the head it trained

    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / ckpt.checkpoint_name(4))  # stopped at step 2's checkpoint
    cfg = load_config(overrides=[*overrides, f'train.out_dir="{resumed}"'])
    Trainer(cfg, resume=True, progress=False, log=lambda m: None).run()
    assert _losses(resumed) == _losses(full)
