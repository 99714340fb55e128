"""Images over the OpenAI-compatible server (a multimodal Llama 4, issue 6): `image_url` content parts
as base64 data URLs (and file:// paths under --allowed-local-media) give, token for token, what
`herd.generate` gives for the same dialog and pictures; the engine's prefix sharing keeps requests
with equal token ids but different images apart and shares the blocks of the same image; every bad
image is one 400 naming the problem."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import torch
from PIL import Image

import herd
from herd.inference.engine import Engine
from herd.inference.server import Limits, ServerThread, create_app
from herd.models.image_processing import prepare_images_prompt
from tests.models.multimodal import tiny_multimodal

LIMITS = dict(max_images=2, max_image_bytes=100_000, max_image_pixels=40_000)


def _picture(kind: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    w, h = size
    if kind == "noise":
        data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    else:  # a smooth gradient with a random tint
        y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        tint = torch.rand(3, generator=g)
        data = (255 * torch.stack([x * tint[0], y * tint[1], (1 - x) * tint[2]], -1)).to(torch.uint8)
    return Image.fromarray(data.numpy(), "RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(raw).decode()


GRADIENT = _picture("gradient", (80, 40))  # 2 tiles + thumbnail at 56-pixel tiles
NOISE = _picture("noise", (80, 40), seed=1)  # same size: the same prompt token ids as GRADIENT
SMALL = _picture("gradient", (50, 50), seed=2)  # one tile


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The image tests' small random multimodal Llama 4 (tests/models/multimodal.py: real Llama 4
    tokenizer, so real <|patch|> ids), served with small blocks and prefill chunks so an image's
    <|patch|> run is spread over several blocks and prefill steps."""
    root, model, tokenizer = tiny_multimodal(tmp_path_factory.mktemp("ckpt"), std=0.3)
    media = tmp_path_factory.mktemp("media")
    (media / "gradient.png").write_bytes(_png(GRADIENT))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(_png(GRADIENT))
    (media / "link.png").symlink_to(outside / "secret.png")
    engine = Engine(model, tokenizer, max_batch=8, num_blocks=256, block_size=4, max_prefill_tokens=16)
    app = create_app(engine, "mm", Limits(**LIMITS, allowed_local_media=media))
    with ServerThread(app) as server:
        yield server, model, tokenizer, engine, media, outside, root


def _parts(*items):
    return [{"type": "text", "text": x} if isinstance(x, str) else x for x in items]


def _image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _as_herd(messages, pictures):
    """The same dialog for herd.generate: each image_url part → {"type": "image", "image": PIL}."""
    it = iter(pictures)
    return [{**m, "content": [{"type": "image", "image": next(it)} if p.get("type") == "image_url" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m for m in messages]


def _chat(server, messages, **kw):
    body = {"model": "mm", "messages": messages, "max_tokens": 8, "temperature": 0, **kw}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def _wait_idle(engine):
    import time

    deadline = time.monotonic() + 30
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.has_work
    assert engine.blocks_free == engine.blocks.num_blocks and all(r == 0 for r in engine.blocks.refs)


def test_base64_images_equal_herd_generate(setup):
    server, model, tok, engine, *_ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    one = [{"role": "user", "content": _parts("Look at this:", _image_url(_data_url(_png(GRADIENT))),
                                              "what is it?")}]
    two = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": _parts(_image_url(_data_url(_png(SMALL))), "Compare it with",
                                              _image_url(_data_url(_png(NOISE))))}]
    for messages, pictures in ((one, [GRADIENT]), (two, [SMALL, NOISE])):
        want = herd.generate(model, tok, _as_herd(messages, pictures), max_new_tokens=8)
        assert want  # real text, not an immediate stop
        reply = client.chat.completions.create(model="mm", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == want
        ids = prepare_images_prompt(model, tok, _as_herd(messages, pictures)).ids
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == len(tok.encode(want)) or reply.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(model="mm", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # JPEG through a data URL decodes as PIL decodes the same bytes for herd.generate
    buf = io.BytesIO()
    SMALL.save(buf, format="JPEG", quality=90)
    jpeg = [{"role": "user", "content": _parts(_image_url(_data_url(buf.getvalue(), "image/jpeg")), "Describe.")}]
    want = herd.generate(model, tok, _as_herd(jpeg, [Image.open(io.BytesIO(buf.getvalue()))]), max_new_tokens=8)
    assert _chat(setup[0], jpeg).json()["choices"][0]["message"]["content"] == want
    _wait_idle(engine)


def test_file_url_under_allowed_media_equals_the_data_url(setup):
    server, model, tok, engine, media, *_ = setup
    question = "What is in the picture?"
    by_file = _chat(server, [{"role": "user", "content": _parts(_image_url((media / "gradient.png").as_uri()),
                                                                question)}])
    by_data = _chat(server, [{"role": "user", "content": _parts(_image_url(_data_url(_png(GRADIENT))), question)}])
    assert by_file.status_code == 200, by_file.text
    assert by_file.json()["choices"][0]["message"]["content"] == by_data.json()["choices"][0]["message"]["content"]
    _wait_idle(engine)


def test_prefix_sharing_keeps_different_images_apart_and_shares_the_same_image(setup):
    server, model, tok, engine, *_ = setup
    question = "Describe the colours in detail."

    def dialog(picture):
        return [{"role": "user", "content": _parts(_image_url(_data_url(_png(picture))), question)}]

    ids = prepare_images_prompt(model, tok, _as_herd(dialog(GRADIENT), [GRADIENT])).ids
    assert ids == prepare_images_prompt(model, tok, _as_herd(dialog(NOISE), [NOISE])).ids  # equal token ids
    patch = model.args.vision.image_token_id
    first_patch, last_patch = ids.index(patch), len(ids) - 1 - ids[::-1].index(patch)
    bs = engine.block_size

    def ask(picture):
        hits, encodes = engine.stats["prefix_hit_tokens"], engine.stats["image_encodes"]
        r = _chat(server, dialog(picture))
        assert r.status_code == 200, r.text
        _wait_idle(engine)
        return (r.json()["choices"][0]["message"]["content"], engine.stats["prefix_hit_tokens"] - hits,
                engine.stats["image_encodes"] - encodes)

    a, _, encodes_a = ask(GRADIENT)
    b, hits_b, encodes_b = ask(NOISE)
    assert a == herd.generate(model, tok, _as_herd(dialog(GRADIENT), [GRADIENT]), max_new_tokens=8)
    assert b == herd.generate(model, tok, _as_herd(dialog(NOISE), [NOISE]), max_new_tokens=8)
    assert a != b  # the picture decides the answer, though the token ids are the same
    assert encodes_a == encodes_b == 1  # the encoder ran once per request, over several prefill chunks
    assert 0 < hits_b <= first_patch  # only the blocks before the image were shared
    a2, hits_a2, encodes_a2 = ask(GRADIENT)
    assert a2 == a
    assert hits_a2 == (len(ids) - 1) // bs * bs > last_patch  # every full block of the prompt, image included
    assert encodes_a2 == 0  # all its image slots were in shared blocks: no encoder run


def test_engine_preemption_and_chunks_with_images_equal_one_at_a_time(setup):
    """A pool too small for three image requests at once: requests are preempted and recomputed
    (their image features kept: one encoder run each), prompts prefilled 7 tokens at a time."""
    from herd.inference.generate import generate_batch
    from herd.models.vision import WithImages

    _, model, tok, *_ = setup
    rows = []
    for picture, text in ((GRADIENT, "What is it?"), (NOISE, "What is it?"), (SMALL, "Name the colours.")):
        p = prepare_images_prompt(model, tok, [{"role": "user", "content": [{"type": "image", "image": picture},
                                                                           text]}])
        rows.append((p.ids, list(torch.split(p.tiles, [r * c + (r * c > 1) for r, c in p.grids]))))
    engine = Engine(model, tok, num_blocks=20, block_size=4, max_batch=3, max_prefill_tokens=7)
    got: dict[int, list[int]] = {}
    ids = [engine.submit(p, max_tokens=12, ignore_eos=True, images=tiles,
                         listener=lambda ev: got.setdefault(ev.request_id, []).extend(ev.token_ids))
           for p, tiles in rows]
    while engine.step():
        pass
    want = [generate_batch(WithImages(model, torch.cat(tiles)), [p], max_new_tokens=12)[0].ids for p, tiles in rows]
    assert [got[i] for i in ids] == want
    assert engine.stats["preemptions"] > 0 and engine.stats["image_encodes"] == 3
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_herd_serve_engine_on_a_written_multimodal_checkpoint(setup):
    """build_engine (what `herd serve` runs) on an HF multimodal checkpoint: its own chat template
    and packed linears; the answer is herd.generate's with the model and tokenizer it loaded."""
    from starlette.testclient import TestClient

    from herd.inference.server import build_engine

    engine = build_engine(str(setup[-1] / "mm"), kv_cache_mb=8)
    messages = [{"role": "user", "content": _parts(_image_url(_data_url(_png(SMALL))), "What is it?")}]
    want = herd.generate(engine.model, engine.tokenizer, _as_herd(messages, [SMALL]), max_new_tokens=8)
    with TestClient(create_app(engine, "mm")) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want


def _text_only_app(setup):
    text, tok = herd.load(setup[-1] / "text")
    return create_app(Engine(text, tok, num_blocks=32), "text")


def _no_media_app(setup):
    _, model, tok, *_ = setup
    return create_app(Engine(model, tok, num_blocks=32), "mm", Limits(**LIMITS))


def _bad_cases(media, outside):
    truncated = _png(SMALL)[:60]
    cases = [
        ("text-only", "text-only", [_image_url(_data_url(_png(SMALL)))], "text-only"),
        ("bad base64", None, [_image_url("data:image/png;base64,iVBORw0K!!!not*base64")], "cannot be decoded"),
        ("not an image", None, [_image_url(_data_url(b"plain text, no picture here" * 3))], "not an image"),
        ("not image/*", None, [_image_url("data:text/plain;base64,aGVsbG8=")], "data:image/<type>;base64"),
        ("truncated", None, [_image_url(_data_url(truncated))], "truncated"),
        ("pixels", None, [_image_url(_data_url(_png(Image.new("RGB", (400, 200), (9, 9, 9)))))],
         "400×200 pixels is over this server's limit of 40000"),
        ("bytes", None, [_image_url(_data_url(_png(_picture("noise", (190, 190)))))],
         "is over this server's limit of 100000 bytes"),
        ("too many", None, [_image_url(_data_url(_png(SMALL)))] * 3, "at most 2 images per request, got 3"),
        ("outside", None, [_image_url((outside / "secret.png").as_uri())], "outside the allowed local media"),
        ("dot-dot", None, [_image_url((media / ".." / outside.name / "secret.png").as_uri())], "outside the allowed"),
        ("symlink out", None, [_image_url((media / "link.png").as_uri())], "outside the allowed local media"),
        ("missing", None, [_image_url((media / "none.png").as_uri())], "no such file"),
        ("no flag", "no-media", [_image_url((media / "gradient.png").as_uri())], "--allowed-local-media"),
        ("http", None, [_image_url("https://example.com/cat.png")], "does not download"),
        ("server path", None, [{"type": "image", "image": str(media / "gradient.png")}], "image_url"),
        ("no url", None, [{"type": "image_url", "image_url": {"uri": "x"}}], "image_url part must be"),
    ]
    return [(name, app, [{"role": "user", "content": _parts(*parts, "What is it?")}], words)
            for name, app, parts, words in cases]


def test_bad_images_get_one_clear_400(setup):
    from starlette.testclient import TestClient

    server, _, _, engine, media, outside, _ = setup
    # Apps that never reach their engine (every request is refused): no lifespan, no engine thread.
    others = {"text-only": TestClient(_text_only_app(setup)), "no-media": TestClient(_no_media_app(setup))}
    for name, app, messages, words in _bad_cases(media, outside):
        body = {"messages": messages, "max_tokens": 4}
        if app is None:
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        else:
            r = others[app].post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err["message"] and "\n" not in err["message"], (name, err)
    extra = [  # an image in an assistant turn; tools with an image
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": _parts(_image_url(_data_url(_png(SMALL))))}]},
         "images go in user messages"),
        ({"messages": [{"role": "user", "content": _parts(_image_url(_data_url(_png(SMALL))))}],
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools together with images"),
    ]
    for body, words in extra:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    _wait_idle(engine)


def test_serve_refuses_a_missing_media_dir_in_one_line(capsys):
    from herd.cli import main

    assert main(["serve", "--allowed-local-media", "/no/such/dir", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("herd: error: --allowed-local-media: /no/such/dir is not a "
                                               "directory")
