"""Bad values given to the post-training and evaluation commands are refused in one line, exit
status 2, before any model loads, and never overwrite what the user made.

The CLI cases name a model that does not exist: had a check come after the model load, the error
would be about the model instead of the value."""

from __future__ import annotations

import json
import math

import pytest
import torch

from herd.errors import HerdError
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train.lora import LoRAConfig, apply_lora, lora_modules
from herd.train.posttrain import DPO, DPOConfig
from herd.train.posttrain_cli import build_config
from herd.train.rejection import Sampled, check_sample_args, preference_pairs, write_best
from tests.cli_errors import run_cli_error
from tests.train.posttrain_fixtures import write_jsonl

NO_MODEL = "/nonexistent/model-dir"


_run = run_cli_error


# ---- LoRA and DPO settings: checked when the config is built ---------------------------------------
@pytest.mark.parametrize("override,message", [
    ("lora.rank=-2", "lora.rank must be a whole number >= 0"),
    ("lora.alpha=0", "lora.alpha must be a finite number > 0"),
    ("lora.alpha=-1", "lora.alpha must be a finite number > 0"),
    ("lora.alpha=nan", "lora.alpha must be a finite number > 0"),
    ("lora.dropout=2", r"lora.dropout must be in \[0, 1\)"),
    ("lora.dropout=1", r"lora.dropout must be in \[0, 1\)"),
    ("lora.dropout=-0.5", r"lora.dropout must be in \[0, 1\)"),
    ("lora.dropout=nan", r"lora.dropout must be in \[0, 1\)"),
    ("lora.targets=wq,zz", "unknown layer 'zz'; valid: wq, wk, wv, wo, w1, w2, w3"),
    ("lora.targets=", "at least one layer name"),
    ("dpo.beta=-1", "dpo.beta must be a finite number > 0"),
    ("dpo.beta=0", "dpo.beta must be a finite number > 0"),
    ("dpo.beta=nan", "dpo.beta must be a finite number > 0"),
    ("dpo.beta=inf", "dpo.beta must be a finite number > 0"),
    ("dpo.nll=-1", "dpo.nll must be a finite number >= 0"),
    ("dpo.nll=nan", "dpo.nll must be a finite number >= 0"),
    ("dpo.nll_norm=mean", "dpo.nll_norm must be one of"),
])
def test_build_config_refuses(override, message):
    with pytest.raises(HerdError, match=message):
        build_config(None, [override], None)


def test_build_config_refuses_bad_toml_tables():
    with pytest.raises(HerdError, match="lora.rank must be"):
        build_config(None, [], None, tables={"lora": {"rank": -1}})
    with pytest.raises(HerdError, match="lora.targets must be a list"):
        build_config(None, [], None, tables={"lora": {"targets": 5}})
    with pytest.raises(HerdError, match="lora.targets must be a list of layer names"):
        build_config(None, [], None, tables={"lora": {"targets": [1, 2]}})
    with pytest.raises(HerdError, match="dpo.beta"):
        build_config(None, [], None, tables={"dpo": {"beta": 0.0}})


def test_build_config_keeps_valid_values():
    _, own = build_config(None, ["lora.rank=0", "lora.dropout=0", "dpo.nll=0", "dpo.beta=0.5"], None)
    assert own["lora"].rank == 0 and own["dpo"].nll == 0 and own["dpo"].beta == 0.5
    _, own = build_config(None, ["lora.rank=4", "lora.targets=wq,w2", "lora.dropout=0.1"], None)
    assert own["lora"].targets == ("wq", "w2") and own["lora"].dropout == 0.1


@pytest.mark.parametrize("verb,extra,message", [
    ("sft", ["--lora.rank=-2"], "lora.rank must be"),
    ("sft", ["--lora.targets=wq,zz"], "unknown layer 'zz'"),
    ("dpo", ["--dpo.beta=nan"], "dpo.beta must be"),
    ("dpo", ["--dpo.nll=-1"], "dpo.nll must be"),
])
def test_cli_refuses_before_loading_the_model(tmp_path, capsys, verb, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    line = _run([verb, "--model", NO_MODEL, "--data", str(data), "--out", str(tmp_path / "run"), *extra], capsys)
    assert message in line
    assert not (tmp_path / "run").exists()


def test_dpo_objective_refuses_bad_values():
    for kw in ({"beta": float("nan")}, {"beta": 0.0}, {"beta": -0.1}, {"nll": -0.2}, {"nll": float("inf")}):
        with pytest.raises(HerdError, match="dpo."):
            DPO(**kw)
    assert DPOConfig(beta=0.2, nll=0.0).validate().beta == 0.2


def _model():
    torch.manual_seed(0)
    with torch.device("meta"):
        m = Transformer(get_preset("debug"))
    m.to_empty(device="cpu")
    m.init_weights(generator=torch.Generator().manual_seed(0))
    return m


def test_apply_lora_checks_rank_and_targets_against_the_model():
    model = _model()
    smallest = min(min(m.in_features, m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("wq", "wk"))
    with pytest.raises(HerdError, match=rf"lora.rank {smallest + 1} exceeds .*lora.rank <= {smallest}"):
        apply_lora(model, LoRAConfig(rank=smallest + 1, targets=("wq", "wk")))
    with pytest.raises(HerdError, match="no linear layer named 'zz'"):
        apply_lora(model, LoRAConfig(rank=2, targets=("wq", "zz")))
    # a refusal leaves the model as it was: nothing frozen, no adapters
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    assert len(apply_lora(model, LoRAConfig(rank=smallest, targets=("wq", "wk")))) > 0


# ---- herd sample ---------------------------------------------------------------------------------
def _prompts(tmp_path, rows=None):
    return write_jsonl(tmp_path / "p.jsonl", rows or [{"prompt": "What is 2 + 2?", "answer": 4}])


def _sample(tmp_path, *args):
    return ["sample", "--model", NO_MODEL, "--prompts", str(tmp_path / "p.jsonl"), "--verifier", "answer", *args]


@pytest.mark.parametrize("args,message", [
    (["--pairs-per-prompt", "-1"], "pairs per prompt must be a whole number >= 1"),
    (["--pairs-per-prompt", "0"], "pairs per prompt must be a whole number >= 1"),
    (["--missing-eos-penalty", "nan"], "missing-EOS penalty must be a finite number >= 0"),
    (["--missing-eos-penalty", "-1"], "missing-EOS penalty must be a finite number >= 0"),
    (["--min-score", "nan"], "minimum score must be a finite number"),
    (["-k", "0"], "k (samples per prompt) must be a whole number >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "1.5"], "top_p must be in"),
])
def test_sample_refuses_bad_numbers_first(tmp_path, capsys, args, message):
    _prompts(tmp_path)
    line = _run(_sample(tmp_path, "--out", str(tmp_path / "o.jsonl"), "--pairs", str(tmp_path / "q.jsonl"), *args),
                capsys)
    assert message in line
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "q.jsonl").exists()


def test_sample_never_overwrites_its_input(tmp_path, capsys):
    p = _prompts(tmp_path)
    before = p.read_bytes()
    assert "--out" in _run(_sample(tmp_path, "--out", str(p)), capsys)
    # the same file through another spelling of its path
    assert "--prompts input" in _run(_sample(tmp_path, "--out", str(tmp_path / "sub" / ".." / "p.jsonl")), capsys)
    assert "--pairs" in _run(_sample(tmp_path, "--out", str(tmp_path / "o.jsonl"), "--pairs", str(p)), capsys)
    same = _run(_sample(tmp_path, "--out", str(tmp_path / "o.jsonl"), "--pairs", str(tmp_path / "o.jsonl")), capsys)
    assert "same file" in same
    assert p.read_bytes() == before and not (tmp_path / "o.jsonl").exists()


def test_sample_refuses_a_directory_output_before_sampling(tmp_path, capsys):
    _prompts(tmp_path)
    (tmp_path / "d").mkdir()
    assert "is a directory" in _run(_sample(tmp_path, "--out", str(tmp_path / "d")), capsys)
    line = _run(_sample(tmp_path, "--out", str(tmp_path / "o.jsonl"), "--pairs", str(tmp_path / "d")), capsys)
    assert "is a directory" in line


def test_sample_verifier_needs_answers_before_the_model_loads(tmp_path, capsys):
    _prompts(tmp_path, [{"prompt": "a", "answer": 1}, {"prompt": "b"}])
    line = _run(_sample(tmp_path, "--out", str(tmp_path / "o.jsonl")), capsys)
    assert "p.jsonl:2:" in line and "needs an 'answer'" in line
    _prompts(tmp_path, [{"prompt": "a", "answer": None}])
    assert "p.jsonl:1: 'answer' must be a string or a number" in _run(_sample(tmp_path, "--out", str(tmp_path / "o.jsonl")), capsys)


def test_sample_api_checks():
    p = [{"role": "user", "content": "q"}]
    res = [Sampled(p, {}, ["a", "b", "c"], [1.0, 0.0, 0.0])]
    for bad in (-1, 0, True):
        with pytest.raises(HerdError, match="pairs per prompt"):
            preference_pairs(res, per_prompt=bad)
    assert len(preference_pairs(res, per_prompt=5)) == 2
    with pytest.raises(HerdError):
        check_sample_args(missing_eos_penalty=math.inf)
    check_sample_args(missing_eos_penalty=0.0, min_score=-3.0)


def test_written_scores_are_strict_json(tmp_path):
    p = [{"role": "user", "content": "q"}]
    ok = [Sampled(p, {"answer": 1}, ["a", "b"], [1.0, -0.5], [True, False])]
    assert write_best(ok, tmp_path / "o.jsonl", keep_all=True) == 1
    row = json.loads((tmp_path / "o.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert row["score"] == 1.0 and row["scores"] == [1.0, -0.5]
    with pytest.raises(HerdError, match="non-finite score"):
        write_best([Sampled(p, {}, ["a"], [math.nan])], tmp_path / "n.jsonl")
    assert not (tmp_path / "n.jsonl").exists()
    with pytest.raises(HerdError, match="minimum score"):
        write_best(ok, tmp_path / "n.jsonl", min_score=math.nan)


def test_number_like_overrides_of_own_text_fields_are_text():
    """post-training's own sections read overrides apart from load_config: `--dpo.nll_norm=2024` was
    an int refused as "expected str" instead of the value check naming the choices."""
    with pytest.raises(HerdError, match="nll_norm") as e:
        build_config(None, ["--dpo.nll_norm=2024"], None)
    assert "expected str" not in str(e.value)
    cfg, _ = build_config(None, ["--train.out_dir=2024"], None)
    assert cfg.train.out_dir == "2024"


# ---- sections post-training does not read; the run directory before the model load ------------------
@pytest.mark.parametrize("extra, message", [
    # taken and silently ignored: the model comes from --model
    (["--model.dim=32"], "post-training has no model.* settings (it takes the model from --model)"),
    (["--data.path=x"], "post-training has no data.* settings (it takes the data from --data)"),
    (["--parallel.tp=2"], "post-training has no parallel.* settings"),
    # listed pretrain's sections (model, data, parallel), none of which post-training reads
    (["--nosuch.x=1"], "unknown config section 'nosuch'; valid: train, optim, schedule, checkpoint, lora, dpo"),
])
def test_sections_post_training_does_not_read_are_refused(tmp_path, capsys, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    for verb in ("sft", "dpo"):
        line = _run([verb, "--model", NO_MODEL, "--data", str(data), "--out", str(tmp_path / "run"), *extra], capsys)
        assert message in line, line
    (tmp_path / "c.toml").write_text("[model]\ndim = 32\n")
    with pytest.raises(HerdError, match="no model.. settings"):
        build_config(str(tmp_path / "c.toml"), [], None)


@pytest.mark.parametrize("verb", ["sft", "reward", "dpo"])
def test_an_unusable_run_directory_is_refused_before_the_model_loads(tmp_path, capsys, verb):
    """--out at a model checkpoint (or a folder of the user's) was refused only after the model had
    loaded, and for dpo after the whole reference pass."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}],
                                               "prompt": "q", "chosen": "a", "rejected": "b"}])
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _run([verb, "--model", NO_MODEL, "--data", str(data), "--out", str(out)], capsys)
    assert "'notes.txt', which a herd run does not write" in line
    line = _run([verb, "--model", NO_MODEL, "--data", str(data), "--out", ""], capsys)
    assert "train.out_dir is empty" in line
