"""`herd eval` refuses task lines and settings that would give a silently wrong accuracy, in one line
naming file:line, before the model loads, and never writes its report over a task file."""

from __future__ import annotations

import json

import pytest

from herd.errors import HerdError
from herd.eval.tasks import evaluate_items, load_task
from tests.cli_errors import run_cli_error
from tests.train.posttrain_fixtures import make_tiny_model, write_jsonl

NO_MODEL = "/nonexistent/model-dir"


_run = run_cli_error


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "choices": ["a", "b"], "answer": True}, "answer must be a choice index, letter or text, got true"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": None}, "answer must be a choice index, letter or text, got null"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 1.0}, "answer must be a choice index"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 5}, "answer index 5 is out of range for 2 choices"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": -1}, "answer index -1 is out of range"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": "C"}, "answer 'C' is past the last of the 2 choices"),
    ({"prompt": "p", "choices": ["a", "a"], "answer": 1}, "choices 0 and 1 are the same ('a')"),
    ({"prompt": "p", "choices": ["", ""], "answer": 1}, "choice 0 is empty"),
    ({"prompt": "p", "choices": ["", "a long wrong answer"], "answer": 1}, "choice 0 is empty"),
    ({"prompt": "p", "answer": None}, "'answer' must be a string or a number, got null"),
    ({"prompt": "p", "answer": True}, "'answer' must be a string or a number, got true"),
    ({"prompt": "p", "answer": [1, 2]}, "'answer' must be a string or a number"),
    ({"prompt": "p", "answer": ""}, "'answer' is empty"),
    ({"prompt": [{"role": "wizard", "content": "hi"}], "answer": "x"}, "message 0: unknown role 'wizard'"),
    ({"prompt": [{"role": "user"}], "answer": "x"}, "message 0 (user): missing 'content'"),
])
def test_bad_items_name_file_and_line(tmp_path, row, message):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "fine", "choices": ["a", "b"], "answer": "B"}, row])
    with pytest.raises(HerdError) as e:
        load_task(task)
    assert str(e.value).startswith(f"{task}:2: ") and message in str(e.value)


def test_good_answers_still_load(tmp_path):
    task = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "p", "choices": ["a", "b", "c"], "answer": "C"},  # letter
        {"prompt": "p", "choices": ["A", "b"], "answer": "A"},  # a choice's text that is also a letter
        {"prompt": "p", "choices": ["a", "b"], "answer": "b"},  # text
        {"prompt": "p", "choices": ["a", "b"], "answer": 0}])
    assert [it.answer for it in load_task(task)] == [2, 0, 1, 0]
    gen = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": 4.5}, {"prompt": "p", "answer": "Paris"}])
    assert [it.answer for it in load_task(gen)] == [4.5, "Paris"]  # a file holds one kind of item


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "-1"], "batch size must be a whole number >= 1"),
    (["--batch-size", "0"], "batch size must be a whole number >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1"),
])
def test_eval_refuses_bad_numbers_before_the_model_loads(tmp_path, capsys, args, message):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": 1}])
    assert message in _run(["eval", "--model", NO_MODEL, "--task", str(task), *args], capsys)


def test_eval_refuses_a_bad_task_line_before_the_model_loads(tmp_path, capsys):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "choices": ["a", "a"], "answer": 0}])
    assert f"{task}:1: choices 0 and 1 are the same" in _run(["eval", "--model", NO_MODEL, "--task", str(task)],
                                                              capsys)


def test_eval_never_writes_over_a_task(tmp_path, capsys):
    t1 = write_jsonl(tmp_path / "t1.jsonl", [{"prompt": "p", "answer": 1}])
    t2 = write_jsonl(tmp_path / "t2.jsonl", [{"prompt": "p", "answer": 2}])
    before = t2.read_bytes()
    line = _run(["eval", "--model", NO_MODEL, "--task", str(t1), "--task", str(t2), "--out", str(t2)], capsys)
    assert "--out" in line and "t2.jsonl" in line
    assert t2.read_bytes() == before
    (tmp_path / "d").mkdir()
    assert "is a directory" in _run(["eval", "--model", NO_MODEL, "--task", str(t1), "--out", str(tmp_path / "d")],
                                    capsys)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import herd

    return herd.load(make_tiny_model(tmp_path_factory.mktemp("m"), seed=3), for_inference=False)


def test_items_too_long_name_their_line_not_train_seq_len(tiny, tmp_path):
    model, tok = tiny
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "word " * 300, "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(HerdError) as e:
        evaluate_items(model, tok, load_task(mc))
    msg = str(e.value)
    assert msg.startswith(f"{mc}:1: ") and "context of 256" in msg and "train.seq_len" not in msg
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "hi", "answer": 1}, {"prompt": "word " * 300, "answer": 1}])
    with pytest.raises(HerdError, match=rf"^{gen}:2: prompt of \d+ tokens does not fit the model's context of 256"):
        evaluate_items(model, tok, load_task(gen))


def test_evaluate_items_refuses_a_batch_size_below_one(tiny, tmp_path):
    model, tok = tiny
    items = load_task(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": 1}]))
    for bad in (0, -1):
        with pytest.raises(HerdError, match="batch size must be"):
            evaluate_items(model, tok, items, batch_size=bad)
    r = evaluate_items(model, tok, items, batch_size=1, max_new_tokens=2)
    assert r.n == 1 and len(r.replies) == 1 and json.dumps(r.replies)


def test_a_base_model_without_a_chat_format_is_evaluated_on_raw_prompts(tmp_path, capsys):
    """`herd eval` refused every model without a chat format ("needs a tokenizer with a chat format"),
    though --no-apply-chat-template (lm-eval's default) and the default (the template only when the
    model has one) both score raw prompts: a base model from `herd pretrain` could not be evaluated."""
    import dataclasses

    import herd
    from herd.checkpoint import write_checkpoint
    from herd.cli import main
    from herd.models.args import get_preset
    from herd.tokenizer.byte_ids import byte_tokenizer
    from tests.reference import random_state_dict

    args = dataclasses.replace(get_preset("debug"), vocab_size=258)
    base = write_checkpoint(tmp_path / "base", "hf", args, random_state_dict(args, seed=1), tokenizer=byte_tokenizer())
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
                                             {"prompt": "The sky is", "choices": ["blue", "loud"], "answer": 0}])
    model, tok = herd.load(base)
    assert tok.chat is None
    want = evaluate_items(model, tok, load_task(mc), chat_template=False)
    for flag in ([], ["--no-apply-chat-template"]):
        out = tmp_path / "r.json"
        assert main(["eval", "--model", str(base), "--task", str(mc), "--out", str(out), *flag]) == 0
        got = json.loads(out.read_text())[str(mc)]
        assert got["chat_template"] is False and got["correct"] == want.correct
        for g, w in zip(got["choice_logprobs"], want.scores, strict=True):
            assert g == pytest.approx(w, rel=1e-5)
        out.unlink()
    capsys.readouterr()
    line = _run(["eval", "--model", str(base), "--task", str(mc), "--apply-chat-template"], capsys)
    assert "needs a tokenizer with a chat format" in line


@pytest.mark.parametrize("task, message", [
    ("mmlu", "task mmlu: no such file; herd eval reads local JSONL task files"),  # was "mmlu: no such file"
    ("", "task '': not a file"),  # Path("") is "."
    (".", "task '.': not a file"),  # was "cannot read ([Errno 21] Is a directory: '.')"
])
def test_a_task_that_is_no_file_says_what_a_task_is(tmp_path, capsys, monkeypatch, task, message):
    monkeypatch.chdir(tmp_path)
    line = _run(["eval", "--model", NO_MODEL, "--task", task], capsys)
    assert message in line, line
