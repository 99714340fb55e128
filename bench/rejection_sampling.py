"""Rejection sampling throughput: K samples of one prompt with the prompt prefilled once and its KV
cache shared by the K rows (herd.train.rejection.sample_k; SPEC §4: the paper's prompt sharing)
against K independent copies of the prompt in one batch (herd.inference.generate.generate_batch,
which prefills every copy — what a generator without prefix sharing does). Same model, sampling
settings and seed; contenders interleaved, medians compared.

    python bench/rejection_sampling.py [--model smollm2-135m-instruct] [--k 8] [--prompt-tokens 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import interleaved_medians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import herd
    from herd.inference.generate import generate_batch
    from herd.inference.sampling import SamplingParams
    from herd.train.rejection import sample_k

    model, tok = herd.load(a.model)
    text = "The history of the herd is long and full of detail. " * 200
    prompt = tok.encode(text)[:a.prompt_tokens]
    params = SamplingParams(temperature=0.8)
    stop = sorted(tok.stop_ids)

    def shared():
        sample_k(model, prompt, a.k, max_new_tokens=a.new_tokens, sampling=params, stop_ids=stop,
                 generator=torch.Generator().manual_seed(0))

    def independent():
        generate_batch(model, [prompt] * a.k, max_new_tokens=a.new_tokens,
                       sampling=SamplingParams(temperature=0.8, seed=0), stop_ids=stop)

    t = interleaved_medians({"shared prefill (herd sample)": shared, "K independent prompts": independent}, a.runs)
    for name, s in t.items():
        print(f"{name:32s} {s:7.2f} s  ({a.k * a.new_tokens / s:6.1f} sampled tokens/s)")
    print(f"speed-up of sharing the prompt's KV cache: {t['K independent prompts'] / t['shared prefill (herd sample)']:.2f}x "
          f"(K={a.k}, prompt {len(prompt)} tokens, {a.new_tokens} new tokens, {a.threads} threads)")


if __name__ == "__main__":
    main()
