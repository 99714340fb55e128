"""DPO and the reward model end to end against references nobody here wrote, on dialogs the other
tests never use (system prompts, a tool call and its ipython result, unicode, an edited response):

- DPO: TRL's DPOTrainer (loss_type="sigmoid", rpo_alpha) written out on transformers'
  LlamaForCausalLM logits of each prompt + completion run alone — loss, gradient (through the
  shared embedding and a norm weight, which need no RoPE permutation) and TRL's logged metrics
  (rewards/chosen = β(π_c − ref_c), rewards/rejected, rewards/accuracies, rewards/margins) — with
  header and end-of-turn tokens masked out of the log-probs (SPEC §4.1.4).
- Reward model: transformers' LlamaForSequenceClassification (score of the last non-pad token of
  each right-padded prompt + response) against herd's packed rows, and −log σ(r_w − r_l) per pair.
- Rejection sampling's scoring of K long samples (rows split at the reward model's context) and
  preference lines that hold no preference (the same text twice)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.errors import HerdError
from herd.models.args import get_preset
from herd.train.posttrain import (
    DPO,
    Preference,
    RewardModel,
    RewardRanking,
    collate_ranked,
    encode_preferences,
    load_preferences,
    preference_stats,
    ranked_loader,
    score_responses,
)
from herd.train.rejection import Sampled, preference_pairs
from tests.train.posttrain_fixtures import write_jsonl

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
PREFS = [
    Preference("a", [{"role": "system", "content": "Antworte kurz."},
                     {"role": "user", "content": "Wetter in Zürich? 🌦"},
                     {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "ipython", "content": '{"temp_c": 7}'}],
               ["Es sind 7 °C.", "Keine Ahnung, schau aus dem Fenster."]),
    Preference("b", [{"role": "user", "content": "2+2?"}], ["It is 4.", "4", "Five, obviously — 5."]),
    Preference("c", [{"role": "system", "content": "日本語で答えて"}, {"role": "user", "content": "こんにちは"}],
               ["こんにちは！お元気ですか？", "hello"]),
]


@pytest.fixture(scope="module")
def llama3_tok():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


def _args():
    return get_preset("debug").replace(vocab_size=128256, max_seq_len=256, dim=32, n_heads=4, tie_embeddings=True)


def _pair(seed):
    from tests.reference import herd_and_hf

    herd, hf = herd_and_hf(_args(), seed=seed, std=0.2)
    return herd.train(), hf.train()


def _trl_rows(tok, prefs):
    """Per example, TRL's layout: (prompt ids = the generation prompt, [completion ids], [content mask]),
    each completion = the whole dialog's ids after the prompt's, its loss mask = not a special token
    (the assistant header is the prompt's; the end-of-turn token is masked, SPEC §4.1.4)."""
    special = set(tok.special_tokens.values()) | set(tok.stop_ids)
    rows = []
    for p in prefs:
        prompt = tok.chat.encode_dialog(p.prompt, add_generation_prompt=True)
        comps = []
        for r in p.responses:
            full = tok.chat.encode_dialog(p.prompt + [{"role": "assistant", "content": r}], add_generation_prompt=False)
            assert full[:len(prompt)] == prompt
            comp = full[len(prompt):]
            comps.append((comp, [t not in special for t in comp]))
        rows.append((prompt, comps))
    return rows


def _hf_logps(hf, prompt, comp, mask):
    """(Σ log p over the completion's content tokens, count) from transformers' logits of prompt +
    completion alone."""
    ids = torch.tensor([prompt + comp])
    logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(comp)[:, None])[:, 0]
    m = torch.tensor(mask, dtype=lp.dtype)
    return (lp * m).sum(), m.sum()


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.2), (0.5, 0.0)])
def test_dpo_loss_gradient_and_metrics_equal_trl_on_transformers_logits(llama3_tok, beta, alpha):
    tok = llama3_tok
    policy, hf_policy = _pair(0)
    ref, hf_ref = _pair(1)
    loader = ranked_loader(tok, PREFS, batch_size=len(PREFS), seq_len=256, shuffle=False)
    obj = DPO(beta=beta, nll=alpha)
    obj.cache_reference(ref, loader, policy.args.vocab_size)
    batch = loader.batch(0)

    # TRL DPOTrainer: chosen/rejected are the last two ranks (an edited response ranks above them)
    rows = _trl_rows(tok, PREFS)
    losses, chosen_r, rejected_r, nll_sum, nll_n = [], [], [], 0.0, 0.0
    for prompt, comps in rows:
        (c, cm), (r, rm) = comps[-2], comps[-1]
        with torch.no_grad():
            ref_c, ref_r = _hf_logps(hf_ref, prompt, c, cm)[0], _hf_logps(hf_ref, prompt, r, rm)[0]
        pol_c, n_c = _hf_logps(hf_policy, prompt, c, cm)
        pol_r, _ = _hf_logps(hf_policy, prompt, r, rm)
        # loss_type="sigmoid", label_smoothing=0: −logsigmoid(β·(chosen_logratios − rejected_logratios))
        losses.append(-F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))))
        chosen_r.append(beta * (pol_c - ref_c).detach())
        rejected_r.append(beta * (pol_r - ref_r).detach())
        nll_sum, nll_n = nll_sum - pol_c, nll_n + n_c
    # rpo_alpha: one cross-entropy mean over every chosen completion token of the batch, added to each pair
    trl_loss = (torch.stack(losses) + alpha * nll_sum / nll_n).mean()
    trl_loss.backward()

    loss = obj.loss_sum(policy, batch) / obj.num_terms(batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-4, abs=1e-6)
    g, g_hf = policy.tok_embeddings.weight.grad, hf_policy.model.embed_tokens.weight.grad
    assert g_hf.abs().max() > 0
    torch.testing.assert_close(g, g_hf, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(policy.layers[0].attention_norm.weight.grad,
                               hf_policy.model.layers[0].input_layernorm.weight.grad, rtol=1e-3, atol=1e-7)

    # TRL's metrics from herd's terms
    t = obj.terms(policy, batch)
    rc = beta * (t["policy_chosen"] - t["ref_chosen"]).detach()
    rr = beta * (t["policy_rejected"] - t["ref_rejected"]).detach()
    torch.testing.assert_close(rc, torch.stack(chosen_r), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rr, torch.stack(rejected_r), rtol=1e-4, atol=1e-5)
    trl_acc = float((torch.stack(chosen_r) > torch.stack(rejected_r)).float().mean())
    assert preference_stats(policy, loader, obj)["reward_accuracy"] == pytest.approx(trl_acc)
    margins = torch.stack(chosen_r) - torch.stack(rejected_r)
    torch.testing.assert_close(rc - rr, margins, rtol=1e-4, atol=1e-5)


def test_reward_scores_and_loss_equal_transformers_sequence_classification(llama3_tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from herd.checkpoint.hf import hf_config_from_args, to_hf_state_dict

    tok = llama3_tok
    herd, _ = _pair(2)
    torch.manual_seed(3)
    rm = RewardModel(herd).eval()
    with torch.no_grad():
        rm.score.bias.fill_(0.25)
    pad = 128004  # <|finetune_right_pad_id|>: never in the dialogs
    cfg = LlamaConfig(**hf_config_from_args(_args()), num_labels=1, pad_token_id=pad)
    hf = LlamaForSequenceClassification(cfg).eval()
    sd = {k: v for k, v in to_hf_state_dict(herd.state_dict(), herd.args).items() if k.startswith("model.")}
    sd["score.weight"] = rm.score.weight.detach().clone()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not unexpected

    # transformers: each prompt + response a right-padded row, the score at its last non-pad token
    seqs, where = [], []
    for e, (prompt, comps) in enumerate(_trl_rows(tok, PREFS)):
        for k, (comp, _) in enumerate(comps):
            seqs.append(prompt + comp)
            where.append((e, k))
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        hf_scores = hf(ids, attention_mask=(ids != pad).long()).logits[:, 0] + 0.25

    batch = collate_ranked(encode_preferences(tok, PREFS, 256))
    with torch.no_grad():
        r = rm.rewards(batch)
    assert [(int(e), int(k)) for e, k in zip(batch.seg_example, batch.seg_rank, strict=True)] == where
    torch.testing.assert_close(r, hf_scores, rtol=1e-4, atol=1e-5)
    # the scored token is each response's end of turn
    assert all(int(batch.inputs[b, t]) in tok.stop_ids for b, t in zip(batch.seg_row, batch.seg_last, strict=True))

    # −log σ(r_better − r_worse) over every pair the ranking implies (edited > chosen > rejected)
    expected, n = 0.0, 0
    for e in range(len(PREFS)):
        idx = [i for i, (ee, _) in enumerate(where) if ee == e]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                expected += float(-F.logsigmoid(hf_scores[idx[a]] - hf_scores[idx[b]]))
                n += 1
    obj = RewardRanking()
    assert obj.num_terms(batch) == n == 5
    with torch.no_grad():
        assert float(obj.loss_sum(rm, batch)) == pytest.approx(expected, rel=1e-4)


def test_score_responses_splits_rows_at_the_reward_models_context(llama3_tok):
    """K samples that fit the reward model's context one by one, but not 8 to a row with the prompt:
    scoring used to fail (after all the sampling); now each row holds what fits, and every score
    equals the response scored alone."""
    herd, _ = _pair(4)
    torch.manual_seed(5)
    rm = RewardModel(herd).eval()
    prompt = [{"role": "user", "content": "Tell me a story."}]
    samples = [("once upon a time " * 12) + str(i) for i in range(8)]
    ids = encode_preferences(llama3_tok, [Preference("x", prompt, samples)], 10_000)[0]
    assert len(ids) > rm.args.max_seq_len and len(ids.prompt) + max(map(len, ids.responses)) <= rm.args.max_seq_len
    together = score_responses(rm, llama3_tok, prompt, samples)
    alone = [score_responses(rm, llama3_tok, prompt, [s])[0] for s in samples]
    assert together == pytest.approx(alone, rel=1e-4, abs=1e-5)
    with pytest.raises(HerdError, match="reward model's context of 256"):
        score_responses(rm, llama3_tok, prompt, ["word " * 300])


@pytest.mark.parametrize("row", [
    {"prompt": "Hi", "chosen": "same", "rejected": "same"},
    {"prompt": "Hi", "chosen": [{"role": "assistant", "content": ""}], "rejected": ""},
    {"prompt": "Hi", "edited": "y", "chosen": "x", "rejected": "y"},
])
def test_a_preference_without_a_preference_is_skipped_and_said(tmp_path, capsys, row):
    """A tie trains nothing (log 2 loss, zero gradient): skipped with one line naming it — real sets
    such as UltraFeedback's binarized one have some — and a file of nothing but ties is refused."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, row])
    said = []
    prefs = load_preferences(path, log=said.append)
    assert [p.responses for p in prefs] == [["a", "b"]]
    assert len(said) == 1 and "skipped 1 preference line(s)" in said[0] and "p.jsonl:2" in said[0]
    only = write_jsonl(tmp_path / "ties.jsonl", [row])
    with pytest.raises(HerdError, match="no preference to learn"):
        load_preferences(only)
    from herd.cli import main

    for verb in ("dpo", "reward"):
        assert main([verb, "--model", str(tmp_path / "never-loaded"), "--data", str(only),
                     "--out", str(tmp_path / verb)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no preference to learn" in err[0] and "Traceback" not in err[0], err


def test_an_edit_that_changed_nothing_is_the_chosen_response(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "edited": "x", "chosen": "x", "rejected": "y"}])
    assert [p.responses for p in load_preferences(path)] == [["x", "y"]]


def test_sampled_pairs_never_pair_a_text_with_itself():
    # two equal samples with scores apart by float noise (rows packed differently) must not make a pair
    r = Sampled([{"role": "user", "content": "q"}], {}, ["A", "A", "B"], [1.0, 1.0 - 1e-7, 0.0])
    rows = preference_pairs([r], seed=0, per_prompt=5)
    assert rows and all(x["chosen"][0]["content"] != x["rejected"][0]["content"] for x in rows)
    assert {(x["chosen"][0]["content"], x["rejected"][0]["content"]) for x in rows} == {("A", "B")}


def test_reference_with_another_chat_format_of_the_same_size_is_refused(tmp_path, monkeypatch, capsys):
    """Same vocabulary size, other chat format: the reference would score the policy's ids as text its
    tokenizer never writes (silently wrong log-probs); refused, one line, before any training."""
    import copy

    from herd.cli import main
    from herd.train import posttrain
    from tests.train.posttrain_fixtures import make_tiny_model, preference_rows

    base = make_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(2))
    real = posttrain.load_trainable

    class OtherChat:
        def __init__(self, chat):
            self.chat = chat

        def encode_dialog(self, messages, add_generation_prompt=False):
            return self.chat.encode_dialog(messages, add_generation_prompt=add_generation_prompt)[1:]  # no BOS

    def load(spec, device="cpu"):
        model, tok = real(spec, device)
        if str(spec).endswith("ref"):
            tok = copy.copy(tok)
            tok.chat = OtherChat(tok.chat)
        return model, tok

    monkeypatch.setattr(posttrain, "load_trainable", load)
    ref = make_tiny_model(tmp_path / "ref")
    rc = main(["dpo", "--model", str(base), "--ref", str(ref), "--data", str(data), "--out", str(tmp_path / "run"),
               "--train.steps=1", "--train.seq_len=128", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "encodes the dialogs differently from the policy" in err[-1]
    assert not (tmp_path / "run" / "model").exists()
    # the same tokenizer passes the check
    monkeypatch.setattr(posttrain, "load_trainable", real)
    assert main(["dpo", "--model", str(base), "--ref", str(ref), "--data", str(data), "--out", str(tmp_path / "ok"),
                 "--train.steps=1", "--train.seq_len=128", "--no-progress"]) == 0
