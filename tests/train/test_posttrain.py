"""Post-training objectives against formulas nobody here wrote (TRL's DPOTrainer / RewardTrainer
losses and the RPO NLL term, worked by hand on fixed logits), format-token masking checked by the
Llama 3 token ids, prompt-sharing rows against the same sequences run alone, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from herd.errors import HerdError
from herd.train.posttrain import (
    DPO,
    SFT,
    EncodedRanked,
    RankedBatch,
    RewardModel,
    RewardRanking,
    collate_ranked,
    encode_chat,
    encode_preferences,
    encode_prompt_response,
    load_chats,
    load_preferences,
    load_trainable,
    ranked_loader,
    read_jsonl,
    response_logps,
    sft_loader,
)
from tests.train.posttrain_fixtures import chat_rows, make_tiny_model, preference_rows, write_jsonl

BOT, SH, EH, EOT = 128000, 128006, 128007, 128009  # Llama 3 special token ids (llama-models)


@pytest.fixture(scope="session")
def llama3_tok():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture()
def tiny(tiny_dir):
    torch.manual_seed(0)
    return load_trainable(tiny_dir)


# ---- format-token masking, by token id ----------------------------------------------------------
def test_dpo_mask_excludes_header_and_eot_ids(llama3_tok):
    prompt = [{"role": "user", "content": "Hi"}]
    p, turn, content = encode_prompt_response(llama3_tok, prompt, "Hello there")
    body = llama3_tok.encode("Hello there")
    assistant_header = [SH] + llama3_tok.encode("assistant") + [EH] + llama3_tok.encode("\n\n")
    assert p[0] == BOT and p[-len(assistant_header):] == assistant_header  # header is prompt, not reply
    assert turn == body + [EOT]
    assert [t for t, c in zip(turn, content, strict=True) if c] == body  # eot masked out (§4.1.4)
    batch = collate_ranked(encode_preferences(llama3_tok, [load_pref(prompt, "Hello there", "No")], 64))
    counted = batch.lp_token[batch.lp_content].tolist()
    assert counted == body + llama3_tok.encode("No")
    assert not set(counted) & {BOT, SH, EH, EOT}
    assert set(batch.lp_token[~batch.lp_content].tolist()) == {EOT}


def load_pref(prompt, chosen, rejected, edited=None):
    from herd.train.posttrain import Preference

    return Preference("t", prompt, ([edited] if edited else []) + [chosen, rejected])


def test_sft_targets_are_assistant_content_and_eot(llama3_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you"}]
    ids, target = encode_chat(llama3_tok, msgs)
    assert ids == llama3_tok.chat.encode_dialog(msgs, add_generation_prompt=False)
    got = [t for t, m in zip(ids, target, strict=True) if m]
    assert got == llama3_tok.encode("Hello") + [EOT] + llama3_tok.encode("See you") + [EOT]
    assert SH not in got and EH not in got


# ---- DPO and reward losses against TRL's formulas -------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: the losses are then plain arithmetic on known numbers."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, tokens, positions=None, mask=None):
        return self.logits[:, :tokens.shape[1]]


def _toy_batch(V=11):
    # Two examples; prompts of 3 and 2 tokens; responses of 2-4 tokens; the last token of each
    # response is a masked format token (content False). The chosen responses have 2 and 3 content
    # tokens, so a mean over the batch's tokens and a mean of per-response means differ.
    exs = [EncodedRanked(0, [1, 2, 3], [[4, 5, 9], [6, 9]], [[True, True, False], [True, False]]),
           EncodedRanked(1, [2, 3], [[7, 8, 5, 9], [5, 6, 9]], [[True, True, True, False], [True, True, False]])]
    return exs, collate_ranked(exs)


def _hand_logps(logits, ex, b):
    """Per response: Σ log p(token) over content tokens, each response read as if run alone after
    the prompt (TRL: prompt + completion, completion_mask)."""
    lp = torch.log_softmax(logits[b], -1)
    out, start = [], len(ex.prompt)
    for resp, content in zip(ex.responses, ex.content, strict=True):
        s = 0.0
        for j, (tok, c) in enumerate(zip(resp, content, strict=True)):
            pos = len(ex.prompt) - 1 if j == 0 else start + j - 1
            s += float(lp[pos, tok]) if c else 0.0
        out.append(s)
        start += len(resp)
    return out


def _trl_rpo_nll(logits, exs):
    """TRL DPOTrainer (rpo_alpha): `F.cross_entropy(chosen_logits.flatten(0, 1), chosen_labels.flatten(),
    ignore_index=...)` over every chosen completion — one mean over all chosen tokens of the batch.
    Built here as TRL lays it out: each example's prompt + chosen completion as its own sequence,
    labels = the next token on completion content tokens, ignored elsewhere."""
    rows, labels = [], []
    for b, ex in enumerate(exs):
        p, resp, content = len(ex.prompt), ex.responses[0], ex.content[0]
        for j, (tok, c) in enumerate(zip(resp, content, strict=True)):
            rows.append(logits[b, p - 1 if j == 0 else p + j - 1])  # the chosen response follows the prompt
            labels.append(tok if c else -100)
    return float(F.cross_entropy(torch.stack(rows), torch.tensor(labels), ignore_index=-100))


def test_dpo_loss_equals_trl_sigmoid_plus_rpo_nll():
    torch.manual_seed(0)
    exs, batch = _toy_batch()
    logits = torch.randn(2, batch.inputs.shape[1], 11)
    model = FixedLogits(logits.clone())
    hand = [_hand_logps(logits, ex, b) for b, ex in enumerate(exs)]
    ref = {0: (-3.0, -2.5), 1: (-4.0, -1.0)}
    trl_nll = _trl_rpo_nll(logits, exs)
    for beta, nll in ((0.1, 0.2), (0.5, 0.0), (0.1, 1.0)):
        obj = DPO(beta=beta, nll=nll, reference=dict(ref))
        losses = []
        for e in (0, 1):
            pc, pr = hand[e]
            # TRL DPOTrainer, loss_type="sigmoid": -logsigmoid(β·(chosen_logratios − rejected_logratios));
            # then `losses = losses + rpo_alpha * nll_loss` and `loss = losses.mean()`
            delta = (pc - ref[e][0]) - (pr - ref[e][1])
            losses.append(float(-F.logsigmoid(torch.tensor(beta * delta))) + nll * trl_nll)
        trl_loss = sum(losses) / len(losses)
        assert obj.num_terms(batch) == 2
        assert float(obj.loss_sum(model, batch).detach()) / obj.num_terms(batch) == pytest.approx(trl_loss, rel=1e-5)


def test_dpo_nll_normalizations():
    # "tokens" is TRL's batch token mean; "response" Pang et al.'s per-response mean (differs here:
    # chosen lengths 2 and 3); "sum" the per-response sum. Worked from per-token log-probs by hand.
    torch.manual_seed(1)
    exs, batch = _toy_batch()
    logits = torch.randn(2, batch.inputs.shape[1], 11)
    per_tok = []
    for b, ex in enumerate(exs):
        lp = torch.log_softmax(logits[b], -1)
        p, resp = len(ex.prompt), ex.responses[0]
        per_tok.append([-float(lp[p - 1 if j == 0 else p + j - 1, resp[j]])
                        for j in range(len(resp)) if ex.content[0][j]])
    assert [len(x) for x in per_tok] == [2, 3]
    ref = {0: (0.0, 0.0), 1: (0.0, 0.0)}
    want = {"tokens": [sum(map(sum, per_tok)) / 5] * 2, "response": [sum(x) / len(x) for x in per_tok],
            "sum": [sum(x) for x in per_tok]}
    assert want["tokens"][0] == pytest.approx(_trl_rpo_nll(logits, exs), rel=1e-6)
    for norm, expected in want.items():
        obj = DPO(nll_norm=norm, reference=dict(ref))
        got = obj.nll_per_pair(obj.terms(FixedLogits(logits), batch)).detach().tolist()
        assert got == pytest.approx(expected, rel=1e-5), norm
    with pytest.raises(HerdError, match="dpo.nll_norm must be one of tokens, response, sum"):
        DPO(nll_norm="mean")


def test_reward_loss_equals_trl_pairwise_ranking_edited_chosen_rejected():
    class FixedRewards(torch.nn.Module):
        def __init__(self, r):
            super().__init__()
            self.r = r

        def rewards(self, batch):
            return self.r

    exs = [EncodedRanked(0, [1, 2], [[3], [4], [5]], [[True]] * 3),  # edited, chosen, rejected
           EncodedRanked(1, [1], [[6], [7]], [[True]] * 2)]  # chosen, rejected
    batch = collate_ranked(exs)
    r = torch.tensor([0.3, -0.2, 1.0, 0.5, -1.5])
    obj = RewardRanking()
    # TRL RewardTrainer: −logsigmoid(r_chosen − r_rejected) (no margin), for every implied pair
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4)]
    expected = sum(float(-F.logsigmoid(r[i] - r[j])) for i, j in pairs)
    assert obj.num_terms(batch) == 4
    assert float(obj.loss_sum(FixedRewards(r), batch)) == pytest.approx(expected, rel=1e-6)


# ---- prompt-sharing rows equal the sequences run alone --------------------------------------------
def test_shared_prompt_rows_match_separate_sequences(tiny, llama3_tok):
    model, tok = tiny
    model.eval()
    prefs = load_preferences(write_jsonl(_tmp("prefs.jsonl"), preference_rows(3, edited=True)))
    enc = encode_preferences(tok, prefs, 256)
    batch = collate_ranked(enc)
    with torch.no_grad():
        packed = response_logps(model, batch)
        rm = RewardModel(model).eval()
        rewards = rm.rewards(batch)
        rm.backbone.output = rm._lm_output  # back to a language model for the logps below
        s = 0
        for ex in enc:
            for resp, content in zip(ex.responses, ex.content, strict=True):
                seq = torch.tensor([ex.prompt + resp])
                lp = torch.log_softmax(model(seq)[0], -1)
                p = len(ex.prompt)
                alone = sum(float(lp[p - 1 + j, t]) for j, t in enumerate(resp) if content[j])
                assert float(packed[s]) == pytest.approx(alone, abs=2e-4)
                rm.backbone.output = torch.nn.Identity()
                r_alone = rm(seq)[0, -1]
                rm.backbone.output = rm._lm_output
                assert float(rewards[s]) == pytest.approx(float(r_alone), abs=2e-4)
                s += 1


def _tmp(name):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / name


def test_sft_packed_loss_equals_dialogs_alone(tiny):
    model, tok = tiny
    model.eval()
    chats = load_chats(write_jsonl(_tmp("chat.jsonl"), chat_rows(3)))
    loader = sft_loader(tok, chats, batch_size=1, seq_len=256, shuffle=False)
    batch = loader.batch(0)
    assert (batch.doc_ids[0] >= 0).sum() > 0 and len(set(batch.doc_ids[0].tolist())) >= 3  # packed
    obj = SFT()
    with torch.no_grad():
        packed = float(obj.loss_sum(model, batch))
        alone, n = 0.0, 0
        for _, msgs in chats:
            ids, target = encode_chat(tok, msgs)
            logits = model(torch.tensor([ids]))[0]
            tgt = torch.tensor([t if m else -100 for t, m in zip(ids[1:], target[1:], strict=True)])
            alone += float(F.cross_entropy(logits[:-1], tgt, ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
    assert obj.num_terms(batch) == n
    assert packed == pytest.approx(alone, rel=1e-4)


# ---- the loop, the CLI contract, bad input ---------------------------------------------------------
def test_herd_sft_cli_lora_metrics_and_export(tiny_dir, tmp_path):
    import herd
    from herd.cli import main

    data = write_jsonl(tmp_path / "sft.jsonl", chat_rows(4))
    out = tmp_path / "run"
    rc = main(["sft", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--no-progress",
               "--train.steps=3", "--train.batch_size=1", "--train.seq_len=128", "--lora.rank=4",
               "--optim.lr=1e-2", "--checkpoint.every=2"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("loss" in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "lora" / "adapter.safetensors").exists()
    model, tok = herd.load(out / "model", for_inference=False)  # merged, plain checkpoint + tokenizer, chat format
    base, _ = herd.load(tiny_dir, for_inference=False)
    diff = (model.layers[0].attention.wq.weight - base.layers[0].attention.wq.weight).abs().max()
    assert tok.chat is not None and diff > 0
    # <out>/lora is also a PEFT adapter: on the HF conversion of the base it gives the merged model's logits
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from herd.checkpoint import convert

    convert(tiny_dir, tmp_path / "base-hf", "hf", tokenizer=False)
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base-hf"), out / "lora").eval()
    tokens = torch.randint(0, model.args.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(peft(tokens).logits, model.eval()(tokens), rtol=0, atol=1e-4)
    # resume continues the run from its checkpoint (step 2 here: 3 is the final one)
    rc = main(["sft", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--no-progress",
               "--train.steps=4", "--train.batch_size=1", "--train.seq_len=128", "--lora.rank=4",
               "--optim.lr=1e-2", "--resume"])
    assert rc == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_dpo_lowers_loss_and_raises_margin(tiny_dir, tmp_path):
    from herd.train.config import load_config
    from herd.train.posttrain import DPOConfig, finetune

    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(4))
    cfg = load_config(overrides=[f'train.out_dir="{tmp_path / "dpo"}"', "train.steps=4", "train.batch_size=4",
                                 "train.seq_len=128", "checkpoint.every=0", "optim.lr=3e-3",
                                 "schedule.name=constant", "model.max_seq_len=256"])
    trainer, _ = finetune("dpo", cfg, str(tiny_dir), str(data), dpo=DPOConfig(beta=0.1, nll=0.0), progress=False,
                          log=lambda m: None)
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(float(-F.logsigmoid(torch.tensor(0.0))), abs=1e-4)  # π = ref at start
    assert rows[-1]["loss"] < rows[0]["loss"]
    # TRL's logged metrics, per step: implicit rewards are 0 before the first update, and with no NLL
    # term the loss is the mean of −log σ(margin) — the margin rises as the loss falls
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-4) and rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    for r in rows:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0 <= r["rewards/accuracies"] <= 1
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["rewards/accuracies"] > 0


def test_bad_input_one_clear_line(tmp_path, tiny_dir, llama3_tok, capsys):
    from herd.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(HerdError, match=r"bad.jsonl:2: invalid JSON"):
        read_jsonl(bad)
    assert main(["sft", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("herd: error:") and "bad.jsonl:2" in err[0]

    no_assistant = write_jsonl(tmp_path / "na.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(HerdError, match=r"na.jsonl:1: the chat has no assistant turn"):
        load_chats(no_assistant)

    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "word " * 300},
                                                               {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(HerdError, match=r"long.jsonl:1: the dialog takes \d+ tokens, more than the context of 64"):
        sft_loader(llama3_tok, load_chats(long), batch_size=1, seq_len=64)
    longp = write_jsonl(tmp_path / "longp.jsonl", [{"prompt": "word " * 300, "chosen": "a", "rejected": "b"}])
    with pytest.raises(HerdError, match=r"longp.jsonl:1: prompt and responses take \d+ tokens"):
        ranked_loader(llama3_tok, load_preferences(longp), batch_size=1, seq_len=64)

    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "x", "chosen": "a"}])
    with pytest.raises(HerdError, match=r"m.jsonl:1: missing 'rejected'"):
        load_preferences(missing)


def test_reference_with_other_vocabulary_is_refused(tiny_dir, tmp_path, capsys):
    from herd.cli import main

    other = make_tiny_model(tmp_path / "other", vocab_size=128384)
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(2))
    rc = main(["dpo", "--model", str(tiny_dir), "--ref", str(other), "--data", str(data),
               "--out", str(tmp_path / "run"), "--train.steps=1", "--train.seq_len=128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "vocabulary of 128384 tokens, the policy 128256" in err[0]


def test_preference_formats_conversational_and_plain(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}],
             "edited": [{"role": "assistant", "content": "e"}]},
            {"prompt": "q2", "chosen": "c", "rejected": "r"}]
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert prefs[0].responses == ["e", "a", "b"] and prefs[0].prompt[0]["role"] == "system"
    assert prefs[1].prompt == [{"role": "user", "content": "q2"}] and prefs[1].responses == ["c", "r"]
    assert isinstance(collate_ranked([EncodedRanked(0, [1], [[2], [3]], [[True], [True]])]), RankedBatch)
