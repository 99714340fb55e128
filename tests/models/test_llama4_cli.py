"""`herd generate --image` with a multimodal Llama 4 checkpoint, and its one-line errors: an image
for a text-only model, a file that is not an image, an expert count that disagrees with the weights
(issue 6)."""

from __future__ import annotations

import json
from pathlib import Path

import llama_models
import pytest

from herd.checkpoint import write_checkpoint
from herd.cli import main
from herd.models.image_processing import prepare_image_prompt
from herd.models.vision import WithImages
from tests.models.multimodal import tiny_multimodal
from tests.test_cli import one_line_error

DOG = Path(llama_models.__file__).parent / "resources" / "dog.jpg"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_multimodal(tmp_path_factory.mktemp("l4"), std=0.2)


def test_generate_with_image_equals_the_model(checkpoints, capsys):
    root, model, tokenizer = checkpoints
    prompt = "What is in this picture?"
    assert main(["generate", "--model", str(root / "mm"), "--image", str(DOG), "--prompt", prompt,
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    from herd.inference.generate import generate_batch

    ids, tiles = prepare_image_prompt(model, tokenizer, [{"role": "user", "content": prompt}], DOG)
    # the checkpoint's tokenizer (tokenizer.json + its chat template) places the image where Meta's does
    from herd.tokenizer import load_tokenizer as load

    saved = load(root / "mm")
    assert type(saved.chat).__name__ == "TemplateChatFormat"
    assert prepare_image_prompt(model, saved, [{"role": "user", "content": prompt}], DOG)[0] == ids
    expect = generate_batch(WithImages(model, tiles), [ids], max_new_tokens=4, stop_ids=sorted(tokenizer.stop_ids))
    assert out == tokenizer.decode(expect[0].ids) + "\n"


def test_image_errors_are_one_line(checkpoints, capsys, tmp_path):
    root, _, _ = checkpoints
    code = main(["generate", "--model", str(root / "text"), "--image", str(DOG), "--prompt", "Hi"])
    _, err = capsys.readouterr()
    assert one_line_error(code, err) and "text-only" in err
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    code = main(["generate", "--model", str(root / "mm"), "--image", str(bad), "--prompt", "Hi"])
    _, err = capsys.readouterr()
    assert one_line_error(code, err) and "photo.png" in err
    code = main(["generate", "--model", str(root / "mm"), "--image", str(tmp_path / "none.jpg"), "--prompt", "Hi"])
    _, err = capsys.readouterr()
    assert one_line_error(code, err) and "no such image" in err


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_expert_count_mismatch_is_one_line(checkpoints, capsys, tmp_path, fmt):
    root, model, tokenizer = checkpoints
    path = tmp_path / fmt
    if fmt == "hf":
        write_checkpoint(path, "hf", model.args, model.state_dict())
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"]["num_local_experts"] = 8
        (path / "config.json").write_text(json.dumps(cfg))
    else:
        write_checkpoint(path, "meta", model.args, model.state_dict())
        params = json.loads((path / "params.json").read_text())
        params["moe_args"]["num_experts"] = 2
        (path / "params.json").write_text(json.dumps(params))
    tokenizer.save(path, fmt)
    code = main(["generate", "--model", str(path), "--prompt", "Hi"])
    _, err = capsys.readouterr()
    assert one_line_error(code, err) and "expert count mismatch" in err
