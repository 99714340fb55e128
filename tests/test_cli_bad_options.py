"""Bad command-line input is one line and exit status 2, before the model loads where it can be:
seeds out of range, unknown or absent devices, non-UTF-8 stdin, --system with --raw, `herd serve`'s
KV cache, port and media directory, and `herd chat`'s unknown commands."""

from __future__ import annotations

import io
import socket
import sys

import pytest
import torch

from herd.cli import main
from herd.errors import HerdError

NO_MODEL = "/no/such/model.gguf"  # an error naming anything else proves the check ran before the load


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, out, err):
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error: ") and "Traceback" not in err, err
    return lines[0]


def bytes_stdin(monkeypatch, data: bytes):
    # What a real process gets: a text stream over bytes, undecodable ones passed through as
    # surrogates (Python's default for stdin under a C/POSIX locale).
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8",
                                                       errors="surrogateescape"))


# ---- seeds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("seed", [str(1 << 63), str(-(1 << 63) - 1), "99999999999999999999999"])
def test_seed_outside_64_bits_is_refused_before_the_load(capsys, verb, seed):
    extra = ["--prompt", "hi"] if verb == "generate" else []
    line = one_line_error(*run(capsys, verb, "--model", NO_MODEL, *extra, "--seed", seed, "--temperature", "1"))
    assert "seed must be a whole number from -9223372036854775808 to 9223372036854775807" in line and seed in line


def test_library_takes_the_server_s_seed_range():
    from herd.inference.generate import SEED_MAX, SEED_MIN, generate_batch
    from herd.inference.sampling import SamplingParams
    from herd.inference.server import Limits, RequestError, parse_params
    from herd.models.args import PRESETS
    from herd.models.llama3 import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["debug"]).eval()
    for seed in (SEED_MIN, -1, SEED_MAX):  # the ends are usable, and reproducible
        a = generate_batch(model, [[1, 2, 3]], max_new_tokens=4, sampling=SamplingParams(temperature=1.0, seed=seed))
        b = generate_batch(model, [[1, 2, 3]], max_new_tokens=4, sampling=SamplingParams(temperature=1.0, seed=seed))
        assert a[0].ids == b[0].ids and len(a[0].ids) == 4
        assert parse_params({"seed": seed}, "completions", Limits()).sampling.seed == seed
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 10 ** 23):
        with pytest.raises(HerdError, match="seed must be"):  # was: ValueError from torch
            generate_batch(model, [[1, 2, 3]], max_new_tokens=2, sampling=SamplingParams(temperature=1.0, seed=seed))
        with pytest.raises(RequestError, match="seed must be between"):
            parse_params({"seed": seed}, "completions", Limits())


# ---- vLLM's extra sampling options ----------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("option, value, message", [
    ("--min-p", "1.5", "min_p must be a number in [0, 1], got 1.5"),
    ("--min-p", "nan", "min_p must be a number in [0, 1], got nan"),
    ("--min-tokens", "-1", "min_tokens must be a whole number >= 0, got -1"),
    ("--min-tokens", "9", "min_tokens must be less than or equal to max_tokens=8, got 9"),
    ("--repetition-penalty", "0", "repetition_penalty must be"),
    ("--repetition-penalty", "inf", "repetition_penalty must be"),
    ("--presence-penalty", "2.5", "presence_penalty must be a number in [-2, 2], got 2.5"),
    ("--frequency-penalty", "-3", "frequency_penalty must be a number in [-2, 2], got -3.0"),
])
def test_sampling_options_out_of_range_are_refused_before_the_load(capsys, verb, option, value, message):
    extra = ["--prompt", "hi"] if verb == "generate" else []
    line = one_line_error(*run(capsys, verb, "--model", NO_MODEL, *extra, "--max-new-tokens", "8", option, value))
    assert line.startswith("herd: error: " + message), line


# ---- devices -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi"], ["chat"], ["serve", "--port", "0"]])
def test_unknown_device_is_one_line_before_the_load(capsys, argv):
    line = one_line_error(*run(capsys, *argv, "--model", NO_MODEL, "--device", "foo"))
    assert line == "herd: error: --device 'foo': choose cpu, cuda, cuda:N or mps"


def test_absent_gpu_is_one_line_before_the_load(capsys):
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for argv in (["generate", "--prompt", "hi"], ["serve", "--port", "0"]):
        line = one_line_error(*run(capsys, *argv, "--model", NO_MODEL, "--device", device))
        assert line.startswith(f"herd: error: --device {device!r}: ") and ("no CUDA GPU" in line or "has" in line)


# ---- stdin ---------------------------------------------------------------------------------------------

def test_non_utf8_stdin_is_one_line_naming_the_offset(capsys, monkeypatch):
    bytes_stdin(monkeypatch, b"ok \xff\xfe hi")
    line = one_line_error(*run(capsys, "generate", "--model", NO_MODEL, "--prompt", "-"))
    assert line == "herd: error: stdin: not valid UTF-8 (byte 0xff at offset 3: invalid start byte)"
    for argv in (["tokenize", "--tokenizer", "llama3", "-"], ["tokenize", "--tokenizer", "llama3", "--chat", "-"]):
        bytes_stdin(monkeypatch, b"\xff\xfe hi")
        line = one_line_error(*run(capsys, *argv))
        assert "stdin: not valid UTF-8" in line and "offset 0" in line


def test_utf8_stdin_is_read_as_bytes_and_decoded(capsys, monkeypatch):
    text = "héllo → wörld"
    code, want, _ = run(capsys, "tokenize", "--tokenizer", "llama3", text)
    assert code == 0
    bytes_stdin(monkeypatch, text.encode())
    code, out, _ = run(capsys, "tokenize", "--tokenizer", "llama3", "-")
    assert code == 0 and out == want


def test_tokenize_options_of_the_other_mode_are_refused(capsys):
    """--bos/--eos/--allow-special with --chat and --add-generation-prompt with TEXT were ignored."""
    for argv, word in ((["--chat", "/no/dialog.json", "--bos"], "--bos"), (["--chat", "-", "--allow-special"], "--bos"),
                       (["hi", "--add-generation-prompt"], "--add-generation-prompt")):
        line = one_line_error(*run(capsys, "tokenize", "--tokenizer", "/no/tokenizer", *argv))
        assert word in line and "/no/" not in line  # checked before the tokenizer or the file is read


# ---- generate --system --raw -----------------------------------------------------------------------------

def test_system_with_raw_is_refused(capsys):
    line = one_line_error(*run(capsys, "generate", "--model", NO_MODEL, "--prompt", "hi", "--system", "X", "--raw"))
    assert "--system" in line and "--raw" in line


# ---- serve -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mb", ["0", "-5"])
def test_serve_refuses_an_empty_kv_cache(capsys, mb):
    line = one_line_error(*run(capsys, "serve", "--model", NO_MODEL, "--kv-cache-mb", mb))
    assert line == f"herd: error: --kv-cache-mb must be at least 1, got {mb}"


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_model_path_is_not_the_working_directory(capsys, tmp_path, monkeypatch, smollm2_gguf, spec):
    """`herd serve --model ""` and `herd.load("")` loaded the working directory's checkpoint:
    Path("") is "."."""
    import herd
    from herd.api import resolve_model_path

    (tmp_path / "model.gguf").symlink_to(smollm2_gguf)  # a loadable model where "." would find it
    monkeypatch.chdir(tmp_path)
    line = one_line_error(*run(capsys, "serve", "--model", spec, "--port", "0"))
    assert line == "herd: error: model path is empty; give a built-in name or a path"
    for call in (resolve_model_path, herd.load):
        with pytest.raises(HerdError, match="^model path is empty"):
            call(spec)


def test_serve_refuses_a_kv_cache_below_one_full_context_request(capsys, smollm2_gguf):
    from herd.checkpoint import read_args
    from herd.inference.server import KV_BLOCK_SIZE, kv_cache_blocks

    args = read_args(smollm2_gguf)
    need = args.max_seq_len // KV_BLOCK_SIZE + 2  # Engine.submit's reservation at worst
    per_block = args.kv_cache_bytes_per_token(4) * KV_BLOCK_SIZE
    least = -(-need * per_block // (1 << 20))
    line = one_line_error(*run(capsys, "serve", "--model", str(smollm2_gguf), "--port", "0",
                               "--kv-cache-mb", str(least - 1)))
    assert line.endswith(f"(--kv-cache-mb {least} at least)") and f"{args.max_seq_len}-token context" in line
    # The minimum is enough: a full-context request fits, even at --max-batch 1 (where the engine's
    # own cap, max_batch × context, is 2 blocks short of it).
    assert kv_cache_blocks(args, least << 20, 1, 4) >= need
    assert kv_cache_blocks(args, 1 << 40, 1, 4) == need
    assert kv_cache_blocks(args, 1 << 40, 4, 4) == 4 * (need - 2)


def test_serve_refuses_a_port_in_use_in_one_line(capsys, smollm2_gguf):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(*run(capsys, "serve", "--model", str(smollm2_gguf), "--port", str(port)))
    assert line.startswith(f"herd: error: --port {port}: the port is already in use on 127.0.0.1")


def test_serve_refuses_a_media_path_that_is_not_a_directory(capsys, tmp_path):
    line = one_line_error(*run(capsys, "serve", "--model", NO_MODEL, "--allowed-local-media", str(tmp_path / "x")))
    assert line.endswith("is not a directory")
    (tmp_path / "f").write_text("")
    line = one_line_error(*run(capsys, "serve", "--model", NO_MODEL, "--allowed-local-media", str(tmp_path / "f")))
    assert line.endswith("is not a directory")


# ---- chat ----------------------------------------------------------------------------------------------------

def test_chat_unknown_command_is_not_sent_and_double_slash_is(capsys, monkeypatch, smollm2_gguf):
    import herd

    monkeypatch.setattr(sys, "stdin", io.StringIO("/bogus\n/systemic thing\n//hi\n/exit\nnever sent\n"))
    code, out, err = run(capsys, "chat", "--max-new-tokens", "6")
    assert code == 0
    assert "unknown command /bogus; commands: /reset, /system TEXT, /image PATH, /exit" in err
    assert "unknown command /systemic;" in err and "system prompt" not in err
    model, tok = herd.load(smollm2_gguf)
    want = herd.generate(model, tok, [{"role": "user", "content": "/hi"}], max_new_tokens=6)
    assert out == want + "\n"  # one reply, to "/hi"; nothing after /exit


def test_chat_non_utf8_piped_line_is_one_line_error(capsys, monkeypatch, smollm2_gguf):
    bytes_stdin(monkeypatch, b"\xff hi\n")
    line = one_line_error(*run(capsys, "chat", "--max-new-tokens", "2"))
    assert line == "herd: error: stdin line 1: not valid UTF-8 (undecodable byte at character 0)"


@pytest.mark.parametrize("seq_len", ["0", "-5"])
def test_info_seq_len_must_be_positive(seq_len, capsys):
    from herd.cli import main

    assert main(["info", "llama3-8b", "--seq-len", seq_len]) == 2
    assert "--seq-len must be a positive number" in capsys.readouterr().err


# ---- the command line itself (argparse) ----------------------------------------------------------------
@pytest.mark.parametrize("argv,names", [
    (["generate", "--max-new-tokens", "x"], "--max-new-tokens: invalid int value: 'x'"),
    (["generate"], "required: --prompt"),
    (["frob"], "invalid choice: 'frob'"),
    (["data", "label", "docs", "--out", "l.jsonl", "--threshold", "2"], "--threshold: '2': a probability in [0, 1]"),
    (["pretrain", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # The verbs whose parser takes --section.key=VALUE overrides (a swapped parser class) printed
    # argparse's whole usage block first: pretrain, sft, reward, dpo, plan, data run.
    (["pretrain", "--model.dim"], "--model.dim needs a value"),
    (["sft", "--data"], "argument --data: expected one argument"),
    (["reward"], "required: --data"),
    (["dpo", "--data", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["plan", "--model"], "argument --model: expected one argument"),
    (["data", "run", "--x.y"], "--x.y needs a value"),
])
def test_argparse_errors_are_one_line(capsys, argv, names):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "usage:" not in err, err
    assert lines[0].startswith("herd") and ": error: " in lines[0] and names in lines[0], lines[0]
    assert lines[0].endswith("--help)")


def test_pretrain_resume_of_a_missing_directory_says_so(capsys, tmp_path):
    line = one_line_error(*run(capsys, "pretrain", "--resume", str(tmp_path / "nope")))
    assert line == f"herd: error: --resume {tmp_path / 'nope'}: no such run directory"


# ---- empty paths: Path("") is the working directory -------------------------------------------------
@pytest.mark.parametrize("argv, names", [
    (["generate", "--model", "", "--prompt", "hi"], "--model is empty"),
    (["chat", "--model", ""], "--model is empty"),
    (["info", ""], "NAME is empty"),
    (["convert", "", "out", "--to", "hf"], "SRC is empty"),
    (["convert", "m.gguf", "", "--to", "hf"], "DST is empty; give a path"),
    (["tokenize", "--tokenizer", "", "hi"], "--tokenizer is empty"),
    (["eval", "--model", "", "--task", "t.jsonl"], "the model is empty"),
    (["sample", "--model", "", "--prompts", "t.jsonl", "--out", "o.jsonl", "--verifier", "answer"], "the model is empty"),
    (["sft", "--model", "", "--data", "d.jsonl", "--out", "run"], "the model is empty"),
    # `--ref ""` was read as no --ref: the policy became its own reference without a word
    (["dpo", "--model", "m.gguf", "--ref", "", "--data", "d.jsonl", "--out", "run"], "the model is empty"),
    (["average", "", "m.gguf", "--out", "avg"], "a checkpoint path is empty"),
    (["average", "m.gguf", "--out", ""], "the output directory (--out) is empty"),
])
def test_an_empty_path_is_not_the_working_directory(capsys, monkeypatch, tmp_path, argv, names):
    """With one .gguf in the working directory, `generate --model ""` loaded it and generated, and
    `info ""` described it, exit status 0."""
    import json

    from herd.checkpoint import write_checkpoint
    from herd.models.args import ModelArgs
    from tests.reference import random_state_dict

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=258, multiple_of=16, max_seq_len=32)
    write_checkpoint(tmp_path / "m.gguf", "gguf", args, random_state_dict(args))
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_line_error(*run(capsys, *argv))
    assert names in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
