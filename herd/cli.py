"""`herd <verb>`: one verb per stage, thin over the library.

Errors the user can fix (HerdError) print as one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from herd.errors import ArgumentParser, HerdError, HerdWarning, print_error
from herd.hub import BUILTIN_MODELS, DEFAULT_MODEL

EXAMPLES = """\
examples:
  herd generate --prompt "What is the capital of France?"      # built-in SmolLM2-135M-Instruct
  herd chat                                                      # interactive; /reset, /system TEXT, /image PATH, /exit
  herd generate --model path/to/Meta-Llama-3.1-8B-Instruct/ --prompt "Hi"   # HF or Meta layout
  herd generate --model model.gguf --prompt "Once upon a time" --raw --temperature 0.8 --seed 1
  herd generate --model Llama-4-Scout-17B-16E-Instruct/ --image dog.jpg --prompt "What is in this picture?"
  herd generate --model Llama-4-Scout-17B-16E-Instruct/ --image a.jpg --image b.jpg --prompt "Compare them"
  herd convert model.gguf out/ --to hf                           # hf | meta | gguf, any to any
  herd info llama3-405b                                          # sizes, FLOPs/token, KV cache, memory
  herd tokenize --tokenizer llama3 "Hello world"                 # ids as JSON ("-" reads stdin)
  herd tokenize --tokenizer llama3 --chat dialog.json --add-generation-prompt
  herd data prepare builtin --out data/builtin                  # Shakespeare + Python stdlib, as JSONL
  herd tokenizer train data/builtin --vocab-size 8192 --out tok/ # Llama 3 style BPE → tokenizer.model
  herd data run configs/data/builtin.toml                       # dedup, filters, mix → token shards
  herd pretrain --config configs/debug.toml --out runs/debug    # train; --resume DIR continues exactly
  herd sft --data sft.jsonl --out runs/sft --lora.rank=16        # post-train: sft, reward, sample, dpo, eval
  herd average runs/debug/ckpt-* --out runs/debug/averaged      # Polyak average of checkpoints
  herd serve --port 8000 --max-batch 32                         # OpenAI-compatible server (--quantize int8|fp8)
  herd plan --model llama3-405b --parallel.tp=8 --parallel.pp=16 --parallel.dp_shard=64 --seq 8192  # per-GPU memory
"""


# ---- shared options ------------------------------------------------------------------------------
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name ({', '.join(BUILTIN_MODELS)}), a checkpoint directory (HF or Meta "
                        f"layout) or a .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: float32 on CPU, bfloat16 on GPU)")


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default: 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the most likely one's probability (default: 0 = off)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="new tokens before a stop token may end the reply (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already in the prompt or reply (default: 1.0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract from the logits of tokens already generated, -2..2 (default: 0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract per repetition of a generated token, -2..2 (default: 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (pays off on a GPU; compiling takes a while)")


def _sampling_kwargs(a) -> dict:
    """The sampling options as herd.api's keywords, checked here so a bad value is the one error
    line before the model loads (herd.api checks them the same way for library callers)."""
    from herd.inference.generate import check_max_new_tokens, check_min_tokens, check_seed
    from herd.inference.sampling import SamplingParams

    check_max_new_tokens(a.max_new_tokens)
    check_seed(a.seed)
    # vLLM's SamplingParams names (herd.api.generate/stream take them as keywords)
    more = dict(min_p=a.min_p, min_tokens=a.min_tokens, repetition_penalty=a.repetition_penalty,
                presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty)
    SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, **more)
    check_min_tokens(a.min_tokens, a.max_new_tokens)
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                seed=a.seed, compile=a.compile, **more)


def check_device(device: str, option: str = "--device") -> None:
    """A device torch knows and this machine has, checked before a model loads: otherwise torch
    fails deep inside loading with a RuntimeError or AssertionError traceback. The rules are
    training's (herd/train/config.py), reworded for the command-line option."""
    import torch

    from herd.train.config import check_device_present

    try:
        check_device_present(device)
    except HerdError as e:
        raise HerdError(str(e).replace("train.device", option, 1)) from None
    index = torch.device(device).index
    if torch.device(device).type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise HerdError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def read_stdin() -> str:
    """All of stdin as UTF-8 text. Read as bytes and decoded strictly: Python's own stdin decoding
    passes undecodable bytes through as lone surrogates (surrogateescape), which then fail deep in
    the tokenizer with a TypeError."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (a StringIO in tests, an embedding application's stream)
        return sys.stdin.read()
    raw = buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HerdError(f"stdin: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}: {e.reason})") \
            from None


def _utf8_line(line: str, where: str) -> str:
    """A line from input(): undecodable bytes arrive as lone surrogates (surrogateescape)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HerdError(f"{where}: not valid UTF-8 (undecodable byte at character {e.start})") from None
    return line


CHAT_COMMANDS = "/reset, /system TEXT, /image PATH, /exit"


def check_not_empty(value: str, what: str, builtin: bool = True) -> str:
    """An empty path is Path("") == ".": `--model ""` loaded the working directory's lone .gguf
    and generated with it, and `info ""` described it, without a word."""
    if not str(value).strip():
        raise HerdError(f"{what} is empty; give {'a built-in name or ' if builtin else ''}a path")
    return value


def _load(a):
    import torch

    from herd.api import load

    check_not_empty(a.model, "--model")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == "cpu" else torch.bfloat16)
    with warnings.catch_warnings():  # a missing tokenizer is reported below as the one error line
        warnings.simplefilter("ignore", UserWarning)
        model, tokenizer = load(a.model, device=a.device, dtype=dtype)
    if tokenizer is None:
        raise HerdError(f"{a.model}: no tokenizer found next to the checkpoint; text generation needs one")
    return model, tokenizer


# ---- verbs ---------------------------------------------------------------------------------------
def cmd_generate(a) -> None:
    from herd.api import stream

    sampling = _sampling_kwargs(a)
    if a.raw and a.system is not None:  # --raw sends the text as is: the system prompt would be dropped
        raise HerdError("--system needs the chat format; it cannot be combined with --raw")
    check_device(a.device)
    images = _read_images(a.image)  # a bad file fails before the model loads
    # bad bytes, too: on stdin, or in argv (lone surrogates the tokenizer would quietly mangle)
    prompt = read_stdin() if a.prompt == "-" else _utf8_line(a.prompt, "--prompt")
    if a.system is not None:
        _utf8_line(a.system, "--system")
    model, tokenizer = _load(a)
    if a.system is not None and tokenizer.chat is None:
        raise HerdError(f"--system needs a chat format, and {a.model}'s tokenizer has none")
    if a.raw or tokenizer.chat is None:
        request = prompt
    else:
        request = ([{"role": "system", "content": a.system}] if a.system is not None else []) + [
            {"role": "user", "content": prompt}]
    for piece in stream(model, tokenizer, request, images=images or None, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _read_images(paths: list[str] | None) -> list:
    """--image files as RGB PIL images; an unreadable one is the one-line error."""
    from herd.models.image_processing import load_image

    return [load_image(p) for p in paths or []]


def cmd_chat(a) -> None:
    from herd.api import stream
    from herd.inference.generate import Completion
    from herd.models.image_processing import load_image, require_vision

    sampling = _sampling_kwargs(a)
    check_device(a.device)
    pending = _read_images(a.image)  # for the next user message (the first, from --image)
    if a.system is not None:
        _utf8_line(a.system, "--system")
    model, tokenizer = _load(a)
    if tokenizer.chat is None:
        raise HerdError(f"{a.model}: the tokenizer has no chat format; use `herd generate --raw`")
    if pending:
        require_vision(model)
    system = a.system
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"herd chat · {a.model} · /reset clears the dialog, /system TEXT sets the system prompt, "
              "/image PATH attaches a picture to your next message, /exit quits", file=sys.stderr)
    number = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        number += 1
        try:
            text = _utf8_line(line, f"stdin line {number}").strip()
        except HerdError as e:
            if not interactive:  # a piped script with bad bytes: stop, as any other bad input
                raise
            print(f"herd: {e}", file=sys.stderr)
            continue
        if not text:
            continue
        command = text.split(maxsplit=1)[0]
        if text.startswith("//"):  # the escape for a message that itself begins with "/"
            text, command = text[1:], ""
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history.clear()
            pending.clear()
            print("(dialog cleared)", file=sys.stderr)
            continue
        if command == "/image":
            try:
                require_vision(model)
                pending.append(load_image(text[len("/image"):].strip() or "(no path given)"))
            except HerdError as e:
                print(f"herd: {e}", file=sys.stderr)
                continue
            print(f"(image {len(pending)} attached to your next message)", file=sys.stderr)
            continue
        if command == "/system":
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; dialog cleared)", file=sys.stderr)
            continue
        if command.startswith("/"):  # a typo'd command would otherwise go to the model as a message
            print(f"herd: unknown command {command}; commands: {CHAT_COMMANDS} (start a message with // "
                  "to send one beginning with /)", file=sys.stderr)
            continue
        # Images go before the text of their turn, in order (Meta's layout for a picture that
        # precedes the question); they stay in the history, so later turns still see them.
        content = [{"type": "image", "image": img} for img in pending] + [{"type": "text", "text": text}]
        history.append({"role": "user", "content": content if pending else text})
        pending = []
        dialog = ([{"role": "system", "content": system}] if system is not None else []) + history
        done = Completion()
        try:
            for piece in stream(model, tokenizer, dialog, completion=done, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        except HerdError as e:  # e.g. the dialog outgrew the context: say so, keep the session
            turn = history.pop()["content"]
            pending = [p["image"] for p in turn[:-1]] if isinstance(turn, list) else []
            print(f"herd: {e} (try /reset)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": tokenizer.decode(done.ids)})


def cmd_convert(a) -> None:
    from herd.checkpoint import convert

    src = check_not_empty(a.src, "SRC")
    check_not_empty(a.dst, "DST", builtin=False)
    if str(src) in BUILTIN_MODELS:
        from herd.hub import fetch_builtin

        src = fetch_builtin(str(src))
    convert(src, a.dst, a.to, dtype=a.dtype)
    print(f"wrote {a.to} checkpoint to {a.dst}", file=sys.stderr)


def cmd_info(a) -> None:
    from herd.models.args import PRESETS
    from herd.models.llama4 import LLAMA4_PRESETS

    if a.seq_len is not None and a.seq_len <= 0:
        raise HerdError(f"--seq-len must be a positive number of tokens (got {a.seq_len})")
    check_not_empty(a.name, "NAME")

    if a.name in PRESETS:
        args, label = PRESETS[a.name], a.name
    elif a.name in LLAMA4_PRESETS:
        args, label = LLAMA4_PRESETS[a.name], a.name
    elif a.name not in BUILTIN_MODELS and not Path(a.name).expanduser().exists():
        raise HerdError(f"unknown model {a.name!r}: not a preset ({', '.join([*PRESETS, *LLAMA4_PRESETS])}), "
                        f"a built-in model ({', '.join(BUILTIN_MODELS)}) or an existing path")
    else:
        from herd.api import resolve_model_path
        from herd.checkpoint import read_args

        path = resolve_model_path(a.name)
        args, label = read_args(path), str(a.name)
    seq = a.seq_len or args.max_seq_len
    n, n_body = args.num_params(), args.num_params(include_embeddings=False)
    kv_tok = args.kv_cache_bytes_per_token(2)
    info = {
        "model": label,
        "layers": args.n_layers, "dim": args.dim, "ffn_dim": args.ffn_dim, "heads": args.n_heads,
        "kv_heads": args.kv_heads, "head_dim": args.hd, "vocab_size": args.vocab_size,
        "context": args.max_seq_len, "rope_theta": args.rope_theta,
        "rope_scaling": None if args.rope_scaling is None else args.rope_scaling.factor,
        "rope_scaling_type": None if args.rope_scaling is None else args.rope_scaling.kind,
        "tied_embeddings": args.tie_embeddings,
        "params": n, "params_without_input_embedding": n_body,
        "seq_len": seq,
        "forward_flops_per_token": args.flops_per_token(seq, training=False),
        "training_flops_per_token": args.flops_per_token(seq, training=True),
        "kv_cache_bytes_per_token_bf16": kv_tok,
        "kv_cache_bytes_per_sequence_bf16": kv_tok * seq,
        "weights_bytes_bf16": 2 * n, "weights_bytes_fp8": n, "weights_bytes_fp32": 4 * n,
        # fp32 master weights + fp32 grads + AdamW's two fp32 moments, before activations
        "training_state_bytes_adamw": 16 * n,
    }
    if hasattr(args, "active_params"):  # Llama 4 MoE: FLOPs above count the active parameters
        info.update({"experts": args.n_experts, "experts_per_token": args.top_k,
                     "moe_layers": args.n_moe_layers, "expert_ffn_dim": args.moe_ffn_dim,
                     "active_params": args.active_params(),
                     "params_with_vision_encoder": args.num_params(include_vision=True)})
    if a.json:
        print(json.dumps(info, indent=2))
        return

    def gb(x):
        return f"{x / 1e9:,.2f} GB"

    rows = [
        ("model", label),
        ("shape", f"{args.n_layers} layers, dim {args.dim}, FFN {args.ffn_dim}, "
                  f"{args.n_heads} heads / {args.kv_heads} KV heads (head dim {args.hd})"),
        ("vocabulary", f"{args.vocab_size:,}" + (" (tied input/output embeddings)" if args.tie_embeddings else "")),
        ("context", f"{args.max_seq_len:,} tokens, RoPE θ={args.rope_theta:g}"
                    + (f", {args.rope_scaling.kind} scaling ×{args.rope_scaling.factor:g}" if args.rope_scaling else "")),
        ("parameters", f"{n:,} ({n / 1e9:.2f}B; {n_body / 1e9:.2f}B without the input embedding)"),
        (f"FLOPs/token @ {seq:,}", f"{info['forward_flops_per_token']:.3e} forward, "
                                   f"{info['training_flops_per_token']:.3e} training (fwd+bwd)"),
        ("KV cache (bf16)", f"{kv_tok:,} bytes/token; {gb(kv_tok * seq)} per {seq:,}-token sequence"),
        ("weights", f"{gb(2 * n)} bf16, {gb(n)} fp8, {gb(4 * n)} fp32"),
        ("training state", f"{gb(16 * n)} (fp32 weights + grads + AdamW moments, before activations)"),
    ]
    if "active_params" in info:
        rows.insert(5, ("mixture of experts",
                        f"{args.n_experts} experts (top-{args.top_k}) + shared in {args.n_moe_layers} layers, "
                        f"expert FFN {args.moe_ffn_dim}; {info['active_params'] / 1e9:.2f}B active"
                        # only a multimodal config has an encoder to count (llama4-debug has none)
                        + (f"; {info['params_with_vision_encoder'] / 1e9:.2f}B with the vision encoder"
                           if getattr(args, "vision", None) is not None else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _tokenizer_for(spec: str):
    from herd.tokenizer import load_tokenizer

    check_not_empty(spec, "--tokenizer")
    if spec in BUILTIN_MODELS:
        from herd.hub import fetch_builtin

        spec = str(fetch_builtin(spec))
    return load_tokenizer(spec)


def cmd_tokenize(a) -> None:
    # options of the other mode would be ignored without a word: the chat format places BOS and the
    # special tokens itself, and plain text has no generation prompt
    if a.chat and (a.bos or a.eos or a.allow_special):
        raise HerdError("--bos, --eos and --allow-special are for TEXT; a --chat dialog's special tokens "
                        "come from its chat format")
    if not a.chat and a.add_generation_prompt:
        raise HerdError("--add-generation-prompt is for --chat FILE, not TEXT")
    tokenizer = _tokenizer_for(a.tokenizer)
    if a.chat:
        if a.text is not None:
            raise HerdError("give either TEXT or --chat FILE, not both")
        if tokenizer.chat is None:
            raise HerdError(f"tokenizer {a.tokenizer!r} has no chat format")
        raw = read_stdin() if a.chat == "-" else _read_text(a.chat)
        try:
            dialog = json.loads(raw)
        except json.JSONDecodeError as e:
            raise HerdError(f"{a.chat}: not valid JSON ({e})") from None
        ids = tokenizer.chat.encode_dialog(dialog, add_generation_prompt=a.add_generation_prompt)
    else:
        if a.text is None:
            raise HerdError("nothing to tokenize: give TEXT, '-' for stdin, or --chat FILE")
        # argv's undecodable bytes arrive as lone surrogates, which the tokenizer would quietly turn
        # into U+FFFD: refused like non-UTF-8 stdin.
        text = read_stdin() if a.text == "-" else _utf8_line(a.text, "TEXT")
        ids = tokenizer.encode(text, bos=a.bos, eos=a.eos, allow_special=a.allow_special)
    print(json.dumps(ids))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else e})") from None


# ---- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="herd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="herd: run, convert and inspect Llama-architecture models (Llama 3, 3.1, 3.2, 4, SmolLM2).")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("generate", help="complete one prompt and print the answer",
                       description="Answer one prompt. Instruct models get it as a user message in their "
                                   "chat format; --raw completes the text as is.")
    _add_model(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("--system", default=None, help="system prompt (chat format only)")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="a picture for a multimodal Llama 4 (JPEG, PNG, ...), placed before the prompt; "
                        "repeat for several, in order")
    _add_sampling(p, 256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming",
                       description="Chat in the terminal. Commands: /reset clears the dialog, "
                                   "/system TEXT sets the system prompt, /image PATH attaches a picture "
                                   "to the next message (multimodal Llama 4), /exit quits.")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="a picture for the first message (multimodal Llama 4); repeat for several")
    _add_sampling(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert a checkpoint between HF, Meta and GGUF layouts")
    p.add_argument("src", help="checkpoint directory, .gguf file or built-in model name")
    p.add_argument("dst", help="output directory (hf, meta) or .gguf file")
    p.add_argument("--to", required=True, choices=["hf", "meta", "gguf"], help="output format")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "q8_0"],
                   help="weight type to write (default: float32; q8_0 for GGUF only)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="sizes of a preset or checkpoint: params, FLOPs/token, KV cache, memory")
    p.add_argument("name", help="a preset (llama3-8b, llama3.1-405b, ...), built-in model or checkpoint path")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs and KV cache "
                                                            "(default: the model's context)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokenize", help="print token ids as JSON",
                       description="Print the ids of TEXT (no BOS unless --bos), or of a whole dialog "
                                   "(--chat FILE: a JSON list of {role, content, tool_calls?} messages).")
    p.add_argument("text", nargs="?", default=None, help="text to encode; '-' reads stdin")
    p.add_argument("--tokenizer", default="llama3",
                   help="llama3, llama4, bytes, a built-in model name, a tokenizer file/directory or a .gguf")
    p.add_argument("--bos", action="store_true", help="prepend the begin-of-text token")
    p.add_argument("--eos", action="store_true", help="append the end-of-text token")
    p.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")
    p.add_argument("--chat", metavar="FILE", default=None, help="dialog JSON file ('-' reads stdin)")
    p.add_argument("--add-generation-prompt", action="store_true", help="append the assistant header")
    p.set_defaults(func=cmd_tokenize)

    from herd.train.cli import add_average_parser, add_pretrain_parser

    add_pretrain_parser(sub)
    add_average_parser(sub)
    from herd.inference.server import add_serve_parser

    add_serve_parser(sub)
    from herd.train.plan import add_plan_parser

    add_plan_parser(sub)
    from herd.train.dist_checkpoint import add_export_parser

    add_export_parser(sub)

    from herd.train.posttrain_cli import add_posttrain_parsers

    add_posttrain_parsers(sub)  # sft, reward, dpo, sample, eval

    from herd.data.builtin import add_prepare_builtin_parser
    from herd.tokenizer.train import add_tokenizer_parser

    p = sub.add_parser("data", help="data pipeline: prepare corpora")
    data = p.add_subparsers(dest="data_verb", metavar="STEP", required=True)
    prepare = data.add_parser("prepare", help="fetch and write a corpus as documents.jsonl")
    add_prepare_builtin_parser(prepare.add_subparsers(dest="source", metavar="SOURCE", required=True))
    from herd.data.pipeline import add_run_parser

    add_run_parser(data)
    p = sub.add_parser("tokenizer", help="train a Llama 3 style BPE tokenizer")
    add_tokenizer_parser(p.add_subparsers(dest="tokenizer_verb", metavar="STEP", required=True))
    return parser


def _warning_printer(fallback):
    """A `warnings.showwarning` that prints herd's own warnings as one `herd: warning: ...` line,
    like its errors (Python's format is two lines pointing at wherever the stack level landed,
    torch's decorators included), and hands any other library's warning to `fallback`."""
    def show(message, category, *rest, **kw):
        if issubclass(category, HerdWarning):
            print(f"herd: warning: {message}", file=sys.stderr, flush=True)
        else:
            fallback(message, category, *rest, **kw)
    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _warning_printer(shown)
    try:
        args.func(args)
    except HerdError as e:
        print_error(f"herd: error: {e}")  # under torchrun: rank 0's line only (herd/errors.py)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `herd ... | head`
        return 0
    finally:
        warnings.showwarning = shown  # main() called from Python leaves the caller's as it was
    return 0


if __name__ == "__main__":
    sys.exit(main())
