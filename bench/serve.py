"""`herd serve` under load, over loopback, against the real server processes (SmolLM2-135M, fp32).

Prints, contenders interleaved round by round and medians taken (bench/timing.py's rule):
- aggregate generated tokens/s with 1, 8 and 32 concurrent streams, against the same requests sent
  one after another (the ratio is what continuous batching buys);
- time to first token, p50 and p99, at each concurrency;
- one request for n=8 samples of a long prompt, on a server with prefix sharing and one without;
- single-stream decode tokens/s with --quantize int8 against fp32.

    python bench/serve.py [--model smollm2-135m-instruct] [--rounds 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

WORDS = ("river market stone winter garden letter engine harbor violin forest lantern mirror copper "
         "meadow signal orchard thunder candle canyon pepper").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, threads: int, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from herd.cli import main; main()", "serve", "--model", model,
               "--port", str(self.port), "--max-batch", "32", "--threads", str(threads), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.flags = flags

    def wait(self) -> Server:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.flags} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server {self.flags} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompt(i: int, words: int = 12) -> str:
    return f"Story {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


async def one(client, url, body) -> dict:
    """Stream one completion → {tokens, ttft, total, first_to_last}."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                                                                    "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"tokens": tokens, "ttft": (first or end) - t0, "total": end - t0,
            "first_to_last": (last or end) - (first or end)}


async def concurrent(url, bodies) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, b) for b in bodies))
        wall = time.perf_counter() - t0
    return sum(r["tokens"] for r in results) / wall, [r["ttft"] for r in results]


async def sequential(url, bodies) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        tokens = 0
        for b in bodies:
            tokens += (await one(client, url, b))["tokens"]
        return tokens / (time.perf_counter() - t0)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sequential-requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server (default: 2)")
    a = ap.parse_args()
    print(f"bench/serve.py: {a.model}, {os.cpu_count()} CPUs, {a.threads} threads/server, {a.rounds} rounds, "
          f"{a.max_tokens} tokens/request",
          flush=True)
    servers = {"fp32": Server(a.model, a.threads), "fp32-no-sharing": Server(a.model, a.threads, "--no-prefix-sharing"),
               "int8": Server(a.model, a.threads, "--quantize", "int8")}
    try:
        for s in servers.values():
            s.wait()
        url = servers["fp32"].url
        body = lambda i: {"prompt": prompt(i), "max_tokens": a.max_tokens, "temperature": 0,  # noqa: E731
                          "ignore_eos": True}
        asyncio.run(concurrent(url, [body(i) for i in range(4)]))  # warm-up
        tput = {k: [] for k in ("sequential", 1, 8, 32)}
        ttft = {k: [] for k in (1, 8, 32)}
        n8 = {"fp32": [], "fp32-no-sharing": []}
        dec = {"fp32": [], "int8": []}
        uid = 1000
        for r in range(a.rounds):
            uid += 100
            tput["sequential"].append(asyncio.run(sequential(url, [body(uid + i) for i in range(a.sequential_requests)])))
            for c in (1, 8, 32):
                uid += 100
                tps, firsts = asyncio.run(concurrent(url, [body(uid + i) for i in range(c)]))
                tput[c].append(tps)
                ttft[c] += firsts
            # n=8 samples of one long prompt; a fresh prompt each time so no cache from earlier rounds helps
            for name in n8:
                uid += 1
                long = {"prompt": prompt(uid, 400), "max_tokens": 16, "n": 8, "temperature": 0.8, "seed": 1}
                t0 = time.perf_counter()
                resp = httpx.post(servers[name].url + "/v1/completions", json=long, timeout=600)
                resp.raise_for_status()
                n8[name].append(time.perf_counter() - t0)
            for name in dec:
                uid += 1
                out = asyncio.run(concurrent_decode(servers[name].url, {**body(uid), "max_tokens": 64}))
                dec[name].append(out)
            print(f"  round {r + 1}/{a.rounds} done", flush=True)
        med = {k: statistics.median(v) for k, v in tput.items()}
        print("\naggregate generated tokens/s (median of rounds)")
        print(f"  sequential requests: {med['sequential']:7.1f}")
        for c in (1, 8, 32):
            print(f"  {c:2d} concurrent streams: {med[c]:7.1f}   {med[c] / med['sequential']:5.2f}x sequential   "
                  f"TTFT p50 {pct(ttft[c], 0.5) * 1000:6.0f} ms  p99 {pct(ttft[c], 0.99) * 1000:6.0f} ms")
        sh, nosh = statistics.median(n8["fp32"]), statistics.median(n8["fp32-no-sharing"])
        print(f"\nn=8 samples of a ~{len(prompt(0, 400).split())}-word prompt, 16 tokens each: "
              f"prefix sharing {sh:.2f} s, without {nosh:.2f} s -> {nosh / sh:.2f}x")
        d32, d8 = statistics.median(dec["fp32"]), statistics.median(dec["int8"])
        print(f"single-stream decode: fp32 {d32:.1f} tok/s, int8 {d8:.1f} tok/s -> {d8 / d32:.2f}x")
    finally:
        for s in servers.values():
            s.stop()


async def concurrent_decode(url, body) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await one(client, url, body)
    return (r["tokens"] - 1) / r["first_to_last"]


if __name__ == "__main__":
    main()
