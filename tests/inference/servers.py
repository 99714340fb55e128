"""The served models the server tests share: a random `debug` Transformer with the real Llama 3
tokenizer (tied embeddings, init std 0.5 so greedy text varies), and the real SmolLM2 GGUF loaded as
`herd serve` loads it, each behind `herd serve`'s app; and the small random models engine tests use."""

from __future__ import annotations

import contextlib

import torch

from herd.inference.engine import Engine
from herd.inference.server import Limits, ServerThread, create_app
from herd.models.args import PRESETS
from herd.models.llama3 import Transformer


@contextlib.contextmanager
def debug_server(*, max_batch: int, num_blocks: int, max_n: int):
    """Yields (server, model, tokenizer, engine)."""
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    torch.manual_seed(0)
    model = Transformer(PRESETS["debug"].replace(vocab_size=tok.vocab_size, tie_embeddings=True))
    model.init_weights(std=0.5)
    model.eval()
    engine = Engine(model, tok, max_batch=max_batch, num_blocks=num_blocks, block_size=16)
    with ServerThread(create_app(engine, "debug", Limits(max_n=max_n, max_body_bytes=1 << 20))) as server:
        yield server, model, tok, engine


@contextlib.contextmanager
def smollm2_server(gguf):
    """The real SmolLM2 GGUF as `herd serve` (and `herd eval`) load it, behind the app. Yields
    (server, model, tokenizer, engine)."""
    import herd

    model, tok = herd.load(gguf)
    engine = Engine(model, tok, max_batch=8, kv_cache_bytes=64 << 20)
    with ServerThread(create_app(engine, "smollm2")) as server:
        yield server, model, tok, engine


def random_model(args, seed: int = 0) -> Transformer:
    """A random Transformer with large weights (std 0.5), so that greedy text varies."""
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights(std=0.5)
    return m.eval()


def bad_request_error(server, path: str, body: dict) -> dict:
    """POST a minimal request plus `body` to /v1/chat/completions (path "chat") or /v1/completions
    and return its error object, checked to be a 400 with a one-line message."""
    import httpx

    base = {"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {"prompt": "hi"}
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                   json={**base, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "\n" not in err["message"], err
    return err
