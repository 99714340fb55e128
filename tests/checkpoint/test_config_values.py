"""A checkpoint's config with values of the wrong type or out of range is one line naming the
file, never a traceback, and never a model that runs and answers nothing (negative rope_theta)."""

from __future__ import annotations

import json

import pytest

from herd.checkpoint import read_checkpoint, write_checkpoint
from herd.errors import HerdError
from herd.models.args import ModelArgs
from tests.reference import random_state_dict

TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "m", "hf", TINY, random_state_dict(TINY))


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "32", "malformed value"), ("num_attention_heads", 0, "malformed value"),
    ("rms_norm_eps", "x", "malformed value"), ("rope_theta", None, "malformed value"),
    ("rope_scaling", "yes", "malformed value"), ("max_position_embeddings", "8k", "malformed value"),
    ("rope_theta", -1, "rope_theta must be positive"), ("max_position_embeddings", -5, "max_seq_len must be positive"),
    ("rms_norm_eps", 0, "norm_eps must be positive"), ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    # 0 was read as "not given" (hidden_size // heads) and the model built anyway
    ("head_dim", 0, "head_dim must be positive"), ("head_dim", -16, "head_dim must be positive"),
])
def test_bad_hf_config_values(hf_dir, tmp_path, key, value, message):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HerdError, match=message):
        read_checkpoint(d)


def test_a_config_that_is_not_an_object(hf_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(HerdError, match="expected a JSON object, got list"):
        read_checkpoint(d)
