"""Exact resume of post-training (DESIGN principle 12), as tests/train/test_resume.py checks it for
pre-training: an SFT or DPO run (LoRA or full fine-tuning) that stops right after its checkpoint at
step K and is resumed reproduces the uninterrupted run bit for bit — every step's loss and the
final weights (canonical and adapters) and optimizer moments."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from herd.train import checkpoint as ckpt
from herd.train.config import load_config
from herd.train.lora import LoRAConfig
from herd.train.posttrain import DPOConfig, PostTrainer, finetune
from tests.train.posttrain_fixtures import chat_rows, make_tiny_model, preference_rows, write_jsonl

STEPS, K = 3, 2


class Stopped(Exception):
    """Stands for the process dying right after a checkpoint was written."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from herd.train.posttrain import load_trainable

    return load_trainable(tiny_dir)


@pytest.fixture(autouse=True)
def fast(loaded, monkeypatch):
    """Speed only, nothing a resume depends on: the model is read from disk once and each run gets a
    fresh copy of it (the 128K-token BPE tokenizer takes seconds to load), and no loss.png is drawn."""
    import herd.train.posttrain as pt
    from herd.train.metrics import MetricSinks

    model, tok = loaded
    monkeypatch.setattr(pt, "load_trainable", lambda spec, device="cpu": (copy.deepcopy(model).train(), tok))
    monkeypatch.setattr(MetricSinks, "plot", lambda self, rows: None)


def _cfg(out):
    # checkpoint every K steps; lr high enough that every step moves the weights visibly
    return load_config(overrides=[f'train.out_dir="{out}"', f"train.steps={STEPS}", "train.batch_size=2",
                                  "train.seq_len=128", f"checkpoint.every={K}", "checkpoint.keep=0",
                                  "optim.lr=3e-3", "optim.weight_decay=0.0", "schedule.name=cosine",
                                  "schedule.warmup_steps=1", "model.max_seq_len=256"])


def _run(stage, tiny_dir, data, out, lora_rank, resume=False):
    lora = LoRAConfig(rank=lora_rank, alpha=8.0) if lora_rank else None
    dpo = DPOConfig(beta=0.1, nll=0.2) if stage == "dpo" else None
    return finetune(stage, _cfg(out), str(tiny_dir), str(data), lora=lora, dpo=dpo, resume=resume,
                    progress=False, log=lambda m: None)


def _losses(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in
            (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("stage,lora_rank", [("sft", 4), ("sft", 0), ("dpo", 4), ("dpo", 0)])
def test_stop_after_checkpoint_then_resume_is_bitwise_identical(stage, lora_rank, tiny_dir, tmp_path,
                                                                monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(5) if stage == "sft" else preference_rows(5))
    # Something run in this process before (here: another test's training) must not change a run:
    # LoRA's A and any head are drawn from train.seed, not from whatever the global RNG holds.
    torch.manual_seed(1234)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    trainer_full, _ = _run(stage, tiny_dir, data, full, lora_rank)

    save = PostTrainer.save

    def save_then_die(self):
        path = save(self)
        if self.step == K:
            raise Stopped
        return path

    torch.manual_seed(99)
    monkeypatch.setattr(PostTrainer, "save", save_then_die)
    with pytest.raises(Stopped):
        _run(stage, tiny_dir, data, stopped, lora_rank)
    monkeypatch.setattr(PostTrainer, "save", save)
    assert [s for s, *_ in _losses(stopped)] == list(range(1, K + 1))
    assert ckpt.latest_checkpoint(stopped).name.endswith(str(K))

    torch.manual_seed(7)
    trainer_res, _ = _run(stage, tiny_dir, data, stopped, lora_rank, resume=True)

    assert _losses(stopped) == _losses(full)  # every step's loss and grad norm, bit for bit
    assert len(_losses(full)) == STEPS and _losses(full)[0][1] != _losses(full)[-1][1]
    a, b = trainer_full.model.state_dict(), trainer_res.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    if lora_rank:
        assert any(".lora." in k for k in a)
    # the optimizer moments too (the next step would differ otherwise)
    sa, sb = trainer_full.optimizer.state_dict()["state"], trainer_res.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # and the checkpoints' canonical weights
    ea, eb = (ckpt.load_train_state(ckpt.latest_checkpoint(r))[0] for r in (full, stopped))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_a_run_resumed_by_another_stage_is_refused(tiny_dir, tmp_path):
    """A DPO run continued by `herd sft --resume` would train on under the other objective and export
    a mix of both; the stage is kept in every checkpoint and checked."""
    from herd.errors import HerdError

    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(5))
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(5))
    _run("dpo", tiny_dir, prefs, tmp_path / "run", 4)
    with pytest.raises(HerdError, match=r"is a `herd dpo` run; resume it with `herd dpo`"):
        finetune("sft", _cfg(tmp_path / "run"), str(tiny_dir), str(chats),
                 lora=LoRAConfig(rank=4, alpha=8.0), resume=True, progress=False, log=lambda m: None)


def test_a_bad_message_is_named_by_file_and_line(tmp_path):
    from herd.errors import HerdError
    from herd.train.posttrain import load_chats, load_prompts

    rows = chat_rows(2) + [{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(HerdError, match=r"sft.jsonl:3: message 0: unknown role 'wizard'"):
        load_chats(path)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user"}]}])
    with pytest.raises(HerdError, match=r"prompts.jsonl:1: message 0 \(user\): missing 'content'"):
        load_prompts(path)


def test_every_checkpoint_is_a_model_with_its_chat_tokenizer(tiny_dir, tmp_path):
    """`herd eval --model run/ckpt-N` (or generate) needs the tokenizer and its chat format in each
    checkpoint's model/, as in the final export; before, only the final model/ had them."""
    from herd.api import load
    from herd.tokenizer import load_tokenizer

    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(5))
    _run("sft", tiny_dir, data, tmp_path / "run", 4)
    first = ckpt.list_checkpoints(tmp_path / "run")[0]
    model, tok = load(first / "model")
    assert tok is not None and tok.chat is not None
    dialog = [{"role": "user", "content": "What is 2 + 3?"}]
    ref = load_tokenizer("llama3")
    assert tok.chat.encode_dialog(dialog, add_generation_prompt=True) == \
        ref.chat.encode_dialog(dialog, add_generation_prompt=True)


def test_reward_on_a_reward_model_continues_its_trained_head(tiny_dir, tmp_path):
    """`herd reward --model <reward run>` trains the existing head on, as SFT/DPO continue their
    weights; it used to draw a fresh random head and throw the trained one away."""
    from safetensors.torch import load_file

    from herd.train.posttrain import REWARD_HEAD

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(5))
    _, first = _run("reward", tiny_dir, data, tmp_path / "rm1", 0)
    cfg = _cfg(tmp_path / "rm2")
    cfg.optim.lr = 0.0  # no update: the continued run must export exactly the head it started from
    _, second = finetune("reward", cfg, str(first), str(data), progress=False, log=lambda m: None)
    a, b = load_file(str(first / REWARD_HEAD)), load_file(str(second / REWARD_HEAD))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
