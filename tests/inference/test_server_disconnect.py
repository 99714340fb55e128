"""A client that goes away cancels its request while it is decoding — for non-streaming requests
too, whose response sends nothing before the end, so only the server's own check can notice."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from torch import nn

from herd.inference.engine import Engine
from herd.inference.server import ServerThread, create_app
from herd.models.args import PRESETS
from herd.models.llama3 import Transformer

STEP_S = 0.02  # per forward: 200 tokens take >= 4 s, far longer than a prompt cancel needs


class Slow(nn.Module):
    """The debug model, slowed down so a request is reliably still decoding when the client leaves."""

    def __init__(self, model):
        super().__init__()
        self.model, self.args, self.tok_embeddings = model, model.args, model.tok_embeddings

    def forward(self, *a, **kw):
        time.sleep(STEP_S)
        return self.model(*a, **kw)


@pytest.fixture()
def server():
    torch.manual_seed(0)
    engine = Engine(Slow(Transformer(PRESETS["debug"]).eval()), num_blocks=64)
    with ServerThread(create_app(engine, "debug")) as s:
        yield s, engine


def _send(url: str, path: str, body: dict) -> socket.socket:
    """POST `body` on a raw connection, leaving it open without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait(cond, timeout: float) -> float:
    """Seconds until cond() held; fails after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True}),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "n": 2}),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "stream": True}),
])
def test_client_leaving_mid_decode_frees_the_kv_cache_at_once(server, path, body):
    s, engine = server
    total = engine.blocks.num_blocks
    sock = _send(s.url, path, body)
    try:
        # Decoding for real: some tokens out, blocks held, far from max_tokens.
        _wait(lambda: engine.stats["decode_tokens"] >= 10, timeout=30)
        assert engine.has_work and engine.blocks_free < total
    finally:
        sock.close()
    left = engine.stats["decode_tokens"]
    # The check runs every 0.25 s; 2 s leaves room for a slow machine, yet is well under the
    # >= 190 * STEP_S = 3.8 s the request would need to run to its end.
    took = _wait(lambda: not engine.has_work, timeout=2.0)
    assert engine.blocks_free == total and all(r == 0 for r in engine.blocks.refs)
    assert engine.stats["decode_tokens"] - left < body.get("n", 1) * 100, took


def test_openai_client_closing_a_chat_stream_frees_the_request():
    """As a vLLM user stops reading: the official client's `stream.close()` mid-stream, on a chat
    request (plain, and with tools, where the reply is held back until it is complete)."""
    import openai

    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    torch.manual_seed(0)
    # 512 positions: the tools prompt alone is ~150 tokens.
    args = PRESETS["debug"].replace(vocab_size=tok.vocab_size, max_seq_len=512)
    engine = Engine(Slow(Transformer(args).eval()), tok, num_blocks=64)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with ServerThread(create_app(engine, "debug")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for extra in ({}, {"tools": tools}):
            stream = client.chat.completions.create(
                model="debug", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=200,
                stream=True, extra_body={"ignore_eos": True}, **extra)
            next(iter(stream))  # the role chunk: the request is in
            _wait(lambda: engine.stats["decode_tokens"] >= 10, timeout=30)
            assert engine.has_work
            stream.close()
            left = engine.stats["decode_tokens"]
            _wait(lambda: not engine.has_work, timeout=2.0)  # well under the >= 3.8 s to its end
            assert engine.blocks_free == engine.blocks.num_blocks and all(r == 0 for r in engine.blocks.refs)
            assert engine.stats["decode_tokens"] - left < 100
