"""Rejection sampling: K samples share one prefill of the prompt and one KV cache, and give the same
tokens as recomputing each of the K rows from scratch at every step with the same random draws (and,
greedy, as herd.inference.generate)."""

from __future__ import annotations

import torch

from herd.inference.generate import generate_batch
from herd.inference.sampling import SamplingParams
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train.rejection import Sampled, preference_pairs, sample_k, write_best


def _model():
    torch.manual_seed(0)
    with torch.device("meta"):
        m = Transformer(get_preset("debug"))
    m.to_empty(device="cpu")
    m.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return m.eval()


def test_sample_k_shares_prefill_and_matches_independent_generation():
    model = _model()
    prompt = [5, 17, 99, 3, 42, 7, 8]
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    params = SamplingParams(temperature=1.0)
    got = sample_k(model, prompt, 4, max_new_tokens=6, sampling=params, stop_ids=[1],
                   generator=torch.Generator().manual_seed(7))
    h.remove()
    assert calls[0] == (1, len(prompt))  # the prompt is prefilled once, for all 4 samples
    assert all(s == (4, 1) for s in calls[1:])
    # the reference: no cache and no sharing; each step runs the whole of every row again and draws
    # from the stacked last logits with the same generator
    from herd.inference.sampling import sample

    gen, rows, done = torch.Generator().manual_seed(7), [list(prompt) for _ in range(4)], [False] * 4
    with torch.no_grad():
        for _ in range(6):
            logits = torch.cat([model(torch.tensor([r]))[:, -1] for r in rows])
            for i, t in enumerate(sample(logits, params, gen).tolist()):
                done[i] = done[i] or t == 1
                rows[i].append(t)
            if all(done):
                break
    new = [r[len(prompt):] for r in rows]
    ref = [n[:n.index(1)] if 1 in n else n for n in new]  # up to the stop token, which is not kept
    assert [c.ids for c in got] == ref
    assert len({tuple(c.ids) for c in got}) > 1  # really sampled
    greedy = sample_k(model, prompt, 2, max_new_tokens=5, sampling=SamplingParams(), stop_ids=[])
    ref = generate_batch(model, [prompt], max_new_tokens=5, sampling=SamplingParams())
    assert greedy[0].ids == greedy[1].ids == ref[0].ids


def test_best_and_pairs(tmp_path):
    import json

    p = [{"role": "user", "content": "q"}]
    res = [Sampled(p, {"answer": 3}, ["a", "b", "c"], [0.0, 1.0, 0.0]), Sampled(p, {}, ["x", "y"], [0.0, 0.0])]
    n = write_best(res, tmp_path / "best.jsonl", min_score=1.0)
    rows = [json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert n == 1 and rows[0]["messages"][-1] == {"role": "assistant", "content": "b"} and rows[0]["answer"] == 3
    pairs = preference_pairs(res)
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"] == "b" and pairs[0]["rejected"][0]["content"] in "ac"


def test_cli_sample_eval_reward_and_weighted_average(tmp_path, capsys):
    import json

    import herd
    from herd.cli import main
    from tests.train.posttrain_fixtures import make_tiny_model, preference_rows, write_jsonl

    tiny = make_tiny_model(tmp_path / "m", seed=1)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "answer": 4},
                                                 {"prompt": [{"role": "user", "content": "Say hi."}], "answer": "hi",
                                                  "match": "contains"}])
    assert main(["sample", "--model", str(tiny), "--prompts", str(prompts), "-k", "3", "--max-new-tokens", "4",
                 "--verifier", "answer", "--keep-all", "--out", str(tmp_path / "best.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["samples"]) == 3 and r["messages"][-1]["role"] == "assistant" for r in rows)
    assert main(["sample", "--model", str(tiny), "--prompts", str(prompts), "--out", str(tmp_path / "x")]) == 2
    assert "give exactly one of --reward" in capsys.readouterr().err

    # a reward model scores the samples instead of the verifier
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(2))
    assert main(["reward", "--model", str(tiny), "--data", str(prefs), "--out", str(tmp_path / "rm"), "--no-progress",
                 "--train.steps=1", "--train.seq_len=128"]) == 0
    assert main(["sample", "--model", str(tiny), "--prompts", str(prompts), "-k", "2", "--max-new-tokens", "3",
                 "--reward", str(tmp_path / "rm"), "--out", str(tmp_path / "rm.jsonl")]) == 0
    assert len((tmp_path / "rm.jsonl").read_text().splitlines()) == 2

    assert main(["eval", "--model", str(tiny), "--task", str(prompts), "--max-new-tokens", "3",
                 "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())[str(prompts)]
    assert report["n"] == 2 and len(report["replies"]) == 2 and 0 <= report["ci95"][0] <= report["ci95"][1] <= 1

    # weighted averaging of two post-trained models: 0.25·a + 0.75·b
    other = make_tiny_model(tmp_path / "m2", seed=2)
    assert main(["average", str(tiny), str(other), "--weights", "0.25,0.75", "--out", str(tmp_path / "avg")]) == 0
    a, _ = herd.load(tiny, for_inference=False)
    b, _ = herd.load(other, for_inference=False)
    avg, tok = herd.load(tmp_path / "avg", for_inference=False)
    w = "layers.1.feed_forward.w2.weight"
    torch.testing.assert_close(avg.state_dict()[w], 0.25 * a.state_dict()[w] + 0.75 * b.state_dict()[w])
    assert tok is not None


def test_pairs_per_prompt_are_distinct_and_ordered():
    p = [{"role": "user", "content": "q"}]
    res = [Sampled(p, {}, ["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.0])]
    pairs = preference_pairs(res, per_prompt=10)
    got = {(x["chosen"][0]["content"], x["rejected"][0]["content"]) for x in pairs}
    assert got == {("a", "b"), ("a", "d"), ("c", "b"), ("c", "d")} and len(pairs) == 4


def test_help_of_every_post_training_verb(capsys):
    import pytest

    from herd.cli import main

    for argv in (["--help"], ["sft", "--help"], ["reward", "--help"], ["dpo", "--help"], ["sample", "--help"],
                 ["eval", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "95% confidence interval" in capsys.readouterr().out


def test_missing_eos_penalty_scores_cut_off_samples_lower(tmp_path, monkeypatch):
    """A sample the length limit cut off loses `missing_eos_penalty` from its verifier score (TRL's
    missing_eos_penalty), so a correct reply broken off mid-sentence neither becomes SFT data nor a
    chosen reply; without the penalty it scores like a finished one."""
    import herd
    import herd.train.rejection as rej
    from herd.inference.generate import Completion
    from tests.train.posttrain_fixtures import make_tiny_model

    model, tok = herd.load(make_tiny_model(tmp_path / "m", seed=1))
    eot = sorted(tok.stop_ids)[0]
    answers = {"4": tok.encode("4", bos=False, eos=False), "5": tok.encode("5", bos=False, eos=False)}
    # four samples: correct+finished, correct+cut off, wrong+finished, wrong+cut off
    comps = [Completion(answers["4"], eot, "stop"), Completion(answers["4"]), Completion(answers["5"], eot, "stop"),
             Completion(answers["5"])]
    monkeypatch.setattr(rej, "sample_k", lambda *a, **k: [Completion(list(c.ids), c.stop_token, c.finish_reason)
                                                          for c in comps])
    prompts = [("p:1", [{"role": "user", "content": "What is 2 + 2?"}], {"answer": 4})]
    plain = rej.rejection_sample(model, tok, prompts, 4, rej.verifier_scorer("answer"))
    assert plain[0].scores == [1.0, 1.0, 0.0, 0.0] and plain[0].finished == [True, False, True, False]
    got = rej.rejection_sample(model, tok, prompts, 4, rej.verifier_scorer("answer"), missing_eos_penalty=1.0)
    assert got[0].scores == [1.0, 0.0, 0.0, -1.0]
    assert rej.write_best(got, tmp_path / "best.jsonl", min_score=1.0) == 1
    pairs = rej.preference_pairs(got, per_prompt=10)
    # the cut-off "4" is the same text as the finished one once written (the chat format ends both
    # with end-of-turn), so that pair would hold no preference (herd dpo/reward refuse it): not written
    assert {p["chosen"][0]["content"] for p in pairs} == {"4"} and len(pairs) == 2
    assert {p["rejected"][0]["content"] for p in pairs} == {"5"}
