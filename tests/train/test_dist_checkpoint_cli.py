"""A distributed (DCP) checkpoint of a byte-level run, as `torchrun ... herd pretrain --config
configs/debug.toml` writes it, is as usable as the single-process one: its model/ carries the
byte-level tokenizer (so `herd generate --model ckpt-N` works), `herd export` carries it into the
HF output (AutoTokenizer reads it), and resuming it in one process prints no torch warning.

Fast: the DCP checkpoint is written by dist_checkpoint.save from one process (DCP's no_dist mode,
the same files a 2-rank run writes, each tensor whole); tests/train/test_parallel.py covers the
multi-rank layouts themselves."""

from __future__ import annotations

import shutil
import warnings

import torch

from herd.train import dist_checkpoint
from herd.train.config import load_config
from herd.train.loop import Trainer

from .conftest import debug_overrides


def _dcp_run(shards, out):
    cfg = load_config(overrides=debug_overrides(shards, out, **{"train.steps": 1}))
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    trainer.run()
    shutil.rmtree(out / "ckpt-00000001", ignore_errors=True)  # the single-process one; DCP below
    with warnings.catch_warnings():  # DCP's "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        path = dist_checkpoint.save(trainer)
    assert dist_checkpoint.is_distributed_checkpoint(path)
    return trainer, path


def test_dcp_checkpoint_of_a_byte_level_run_carries_its_tokenizer(shards, tmp_path):
    import herd

    trainer, path = _dcp_run(shards, tmp_path / "run")
    # model/ (herd generate --model ckpt-N): before, byte-level runs' DCP checkpoints had none
    model, tok = herd.load(path / "model", for_inference=False)
    assert tok is not None and tok.encode("def", bos=False) == [100, 101, 102]
    ids = torch.tensor([[256, 100, 101, 102, 32, 102]])
    trainer.model.eval()
    with torch.no_grad():
        ref = trainer.model(ids)
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-5)
    # herd export → HF: the weights and the tokenizer, as `herd convert ckpt-N/model` gives them
    out = dist_checkpoint.export(path, tmp_path / "hf", "hf")
    model_hf, tok_hf = herd.load(out, for_inference=False)
    assert tok_hf is not None and tok_hf.encode("def f", bos=True) == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model_hf(ids), ref, rtol=0, atol=1e-5)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("def f")["input_ids"] == ids[0].tolist()


def test_dcp_checkpoint_resumes_in_one_process_without_a_torch_warning(shards, tmp_path):
    _, path = _dcp_run(shards, tmp_path / "run")
    cfg = load_config(overrides=debug_overrides(shards, tmp_path / "run", **{"train.steps": 2}))
    with warnings.catch_warnings():
        # DCP's "torch.distributed is disabled ... assuming the intent is to load in a single
        # process" was printed to the user on every such resume
        warnings.simplefilter("error", UserWarning)
        trainer = Trainer(cfg, resume=True, progress=False, log=lambda m: None)
    assert trainer.step == 1


def test_a_layout_that_does_not_fit_the_world_size_says_how_to_relay_it():
    """`herd pretrain --resume R` of a dp_shard=2 torchrun run in one process: the saved layout
    does not fit; the line used to say only "launch with torchrun", not that --parallel.* re-lays
    the run out (DCP reshards the checkpoint onto it)."""
    import pytest

    from herd.errors import HerdError
    from herd.train.parallel import ParallelConfig

    with pytest.raises(HerdError, match=r"needs 2 processes, this run has 1 .*--parallel\.dp_shard=-1"):
        ParallelConfig(dp_shard=2).degrees(1)
    assert ParallelConfig(dp_shard=-1).degrees(1)["dp_shard"] == 1
