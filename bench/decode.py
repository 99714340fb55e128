"""Decode and prefill speed: herd vs transformers on SmolLM2-135M-Instruct, side by side.

Both run the same GGUF (transformers dequantizes it with `gguf_file=`), fp32, batch 1, the same
thread count and prompt. Decode speed is measured as (time for N tokens − time for 1 token) /
(N − 1), so prefill and warm-up are excluded for both; each figure is the median of several runs.
The roofline is the decode speed a pure weight stream would reach: bytes of weights read per token
÷ the read bandwidth measured here with a reduction over a buffer far above cache size (decoding
only reads its weights). The rate of a large copy (bytes copied per second) is printed beside it:
on some machines it is under half the read rate (the writes cost as much again), and decoding
then runs "above" a copy-based roofline.

    python bench/decode.py [--threads 2] [--new-tokens 128] [--runs 5] [--prefill 512]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians, machine, median_time


def bandwidths(nbytes: int = 512 * 2**20, runs: int = 10) -> tuple[float, float]:
    """(bytes copied per second, bytes read per second by a sum) over a buffer far above cache size."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return nbytes / median_time(lambda: dst.copy_(src), runs), nbytes / median_time(src.sum, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill figure")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import transformers

    import herd
    from herd.hub import fetch_builtin
    from herd.inference.generate import generate_ids

    path = fetch_builtin("smollm2-135m-instruct")
    model, tok = herd.load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = tok.chat.encode_dialog([{"role": "user", "content": "Write a long story about a lighthouse."}])

    def herd_decode(n):
        for _ in generate_ids(model, [prompt], max_new_tokens=n):  # no stop ids: exactly n tokens
            pass

    def hf_decode(n):
        with torch.inference_mode():
            ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)

    n = a.new_tokens
    t = interleaved_medians({"herd": lambda: herd_decode(n), "transformers": lambda: hf_decode(n),
                             "herd-1": lambda: herd_decode(1), "transformers-1": lambda: hf_decode(1)}, a.runs)
    per_token = {name: (t[name] - t[f"{name}-1"]) / (n - 1) for name in ("herd", "transformers")}

    long_prompt = torch.randint(0, model.args.vocab_size, (1, a.prefill))

    def herd_prefill():
        from herd.inference.kv_cache import KVCache

        with torch.inference_mode():
            model(long_prompt, cache=KVCache(model.args, 1, a.prefill), last_only=True)

    def hf_prefill():
        with torch.inference_mode():
            ref(long_prompt, use_cache=True, logits_to_keep=1)

    prefill = interleaved_medians({"herd": herd_prefill, "transformers": hf_prefill}, a.runs)

    # Bytes read per decoded token: every weight except the input-embedding lookup (a tied table is
    # read once, as the output projection).
    args = model.args
    weight_bytes = 4 * (args.num_params() - (0 if args.tie_embeddings else args.vocab_size * args.dim))
    copy_bandwidth, bandwidth = bandwidths()
    roofline = bandwidth / weight_bytes

    print(f"SmolLM2-135M fp32, batch 1, {a.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; medians of {a.runs} runs; {machine()}")
    for name in ("herd", "transformers"):
        print(f"  {name:<13} decode {1 / per_token[name]:7.1f} tok/s   prefill {a.prefill} tokens "
              f"{prefill[name] * 1e3:7.1f} ms ({a.prefill / prefill[name]:,.0f} tok/s)")
    print(f"  decode ratio herd/transformers  {per_token['transformers'] / per_token['herd']:.2f}x")
    print(f"  prefill ratio herd/transformers {prefill['transformers'] / prefill['herd']:.2f}x")
    print(f"  roofline: {weight_bytes / 1e6:.0f} MB of weights per token at {bandwidth / 1e9:.1f} GB/s read "
          f"bandwidth = {roofline:.1f} tok/s; herd reaches {1 / per_token['herd'] / roofline:.0%} "
          f"(transformers {1 / per_token['transformers'] / roofline:.0%}; copy bandwidth "
          f"{copy_bandwidth / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
