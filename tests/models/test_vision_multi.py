"""Llama 4 image prompts beyond one picture: several images in a prompt, batches of image prompts in
`herd.generate`, and `herd generate --image A --image B` / `herd chat --image` and `/image` with their
one-line errors (issue 6). The layout itself is checked against llama-models in test_vision.py."""

from __future__ import annotations

import io
import sys

import pytest

from herd.api import generate
from herd.cli import main
from herd.errors import HerdError
from herd.models.image_processing import prepare_images_prompt
from herd.models.llama4 import Transformer
from herd.tokenizer import load_tokenizer
from tests.models.multimodal import tiny_multimodal
from tests.models.test_vision import DOG, PASTA
from tests.test_cli import one_line_error


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random multimodal Llama 4 (real Llama 4 tokenizer, so real <|patch|> ids), in memory
    and written as an HF checkpoint, plus a text-only one."""
    return tiny_multimodal(tmp_path_factory.mktemp("mm"), std=0.3)


def user(*parts):
    return [{"role": "user", "content": [{"type": "image", "image": p} if not isinstance(p, str) else
                                         {"type": "text", "text": p} for p in parts]}]


def test_batched_image_prompts_equal_each_row_alone(setup):
    _, model, tokenizer = setup
    rows = [
        ([{"role": "user", "content": "Compare the two pictures."}], [DOG, PASTA]),
        ("A photo of", PASTA),  # a raw text prompt with one image
        ([{"role": "user", "content": "Say hello."}], None),  # a text-only row between image rows
        (user("Look:", DOG, "and tell me what it is."), None),  # the dialog places its own image
    ]
    prompts, images = [p for p, _ in rows], [i for _, i in rows]
    batch = generate(model, tokenizer, prompts, images=images, max_new_tokens=6)
    alone = [generate(model, tokenizer, p, images=i, max_new_tokens=6) for p, i in rows]
    assert batch == alone
    assert all(alone)  # real text, not an immediate stop
    # the images really steer the answer: the same question with the pictures swapped differs
    assert generate(model, tokenizer, prompts[0], images=[PASTA, DOG], max_new_tokens=6) != alone[0]


def test_image_and_images_mean_the_same_for_one_picture(setup):
    _, model, tokenizer = setup
    dialog = [{"role": "user", "content": "What is it?"}]
    one = generate(model, tokenizer, dialog, image=DOG, max_new_tokens=4)
    assert one == generate(model, tokenizer, dialog, images=[DOG], max_new_tokens=4)
    assert one == generate(model, tokenizer, user(DOG, "What is it?"), max_new_tokens=4)


def test_image_prompt_errors(setup):
    root, model, tokenizer = setup
    dialog = [{"role": "user", "content": "Hi"}]
    with pytest.raises(HerdError, match="one entry per prompt"):
        generate(model, tokenizer, [dialog, dialog], images=[[DOG]], max_new_tokens=1)
    with pytest.raises(HerdError, match="not both"):
        generate(model, tokenizer, dialog, image=DOG, images=[PASTA], max_new_tokens=1)
    with pytest.raises(HerdError, match="1 image slot"):
        generate(model, tokenizer, [{"role": "user", "content": [{"type": "image"}, "Hi"]}], images=[DOG, PASTA],
                 max_new_tokens=1)
    with pytest.raises(HerdError, match="images go in user messages"):
        prepare_images_prompt(model, tokenizer, dialog + [{"role": "assistant", "content": [{"type": "image"}]}],
                              [DOG])
    with pytest.raises(HerdError, match="file path or a PIL image"):
        generate(model, tokenizer, dialog, images=[b"\xff\xd8"], max_new_tokens=1)
    text_only = Transformer(model.args.replace(vision=None))
    with pytest.raises(HerdError, match="text-only"):
        generate(text_only, tokenizer, [dialog, dialog], images=[None, [DOG]], max_new_tokens=1)


# ---- the CLI ------------------------------------------------------------------------------------
def test_generate_with_two_images(setup, capsys):
    root, model, tokenizer = setup
    prompt = "Which picture has food in it?"
    assert main(["generate", "--model", str(root / "mm"), "--image", str(DOG), "--image", str(PASTA),
                 "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    dialog = [{"role": "user", "content": prompt}]
    # the checkpoint's own tokenizer (HF chat template) lays two images out as Meta's format does
    saved = load_tokenizer(root / "mm")
    assert type(saved.chat).__name__ == "TemplateChatFormat"
    ours = prepare_images_prompt(model, tokenizer, dialog, [DOG, PASTA])
    assert prepare_images_prompt(model, saved, dialog, [DOG, PASTA]).ids == ours.ids
    assert out == generate(model, tokenizer, dialog, images=[DOG, PASTA], max_new_tokens=4) + "\n"


def test_chat_with_image_option_and_command(setup, capsys, monkeypatch, tmp_path):
    root, model, tokenizer = setup
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    # a bad /image inside the loop is reported and the chat goes on without it
    lines = ["What is this?", f"/image {bad}", f"/image {tmp_path / 'none.jpg'}", f"/image {PASTA}", "And this one?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(root / "mm"), "--image", str(DOG), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "photo.png" in err and "no such image" in err
    first = user(DOG, "What is this?")
    reply1 = generate(model, tokenizer, first, max_new_tokens=4)
    second = first + [{"role": "assistant", "content": reply1}] + user(PASTA, "And this one?")
    reply2 = generate(model, tokenizer, second, max_new_tokens=4)
    assert out == f"{reply1}\n{reply2}\n"
    assert "image 1 attached" in err


def test_chat_image_errors(setup, capsys, monkeypatch, tmp_path):
    root, _, _ = setup
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    code = main(["chat", "--model", str(root / "text"), "--image", str(DOG)])
    _, err = capsys.readouterr()
    assert one_line_error(code, err) and "text-only" in err
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    code = main(["chat", "--model", str(root / "mm"), "--image", str(bad)])
    _, err = capsys.readouterr()
    assert one_line_error(code, err) and "photo.png" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {DOG}\nHi\n"))
    assert main(["chat", "--model", str(root / "text"), "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "text-only" in err and out.count("\n") == 1
