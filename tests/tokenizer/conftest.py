"""Fixtures for the tokenizer tests: the references (llama-models' own Tokenizer, transformers'
reading of the SmolLM2 GGUF) and a multilingual corpus.

data/zh_llama_notes.txt is a few KB of the Chinese notes in shared/seeds/001 and 002, copied so the
tests do not depend on files outside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

EMOJI = ("👨‍👩‍👧‍👦 family, 👩🏽‍💻 coder, 🏳️‍🌈 flag, 🇯🇵🇫🇷 flags, 1️⃣ keycap, 🤦🏼‍♂️ facepalm, "
         "❤️‍🔥 heart on fire, 🧑‍🤝‍🧑 people, 😀😃😄😁 faces, ✈︎ text-style")
ENGLISH = ("The Llama 3 Herd of Models describes dense Transformers with 8B, 70B and 405B parameters. "
           "It's trained on ~15.6T tokens; they've said the 405B model was \"compute-optimal\".\n"
           "Don't panic: we'll re-run it at 3:45pm on 2024-07-23 (UTC+2)!\r\n")
MULTILINGUAL = ("Привет, мир! Как дела? — Ça va très bien, merci. ¿Qué tal, señor Müller? "
                "مرحبا بالعالم. नमस्ते दुनिया। こんにちは、世界！カタカナとひらがな。안녕하세요 세계. "
                "Γειά σου Κόσμε. שלום עולם. ไทย ภาษา. Tiếng Việt có dấu.")
WHITESPACE_DIGITS = ("a" + " " * 40 + "b\t\t\t\tc\n\n\n\nd \n \n e" + "\u3000\u00a0 x" + " " * 300 + "\n"
                     + "1234567890" * 40 + " 3.14159 1,000,000 007 " + "\t" * 50 + "9" * 77 + "\n\n1. item\n  22 x")
SPECIAL_TEXT = ("<|begin_of_text|>hi<|eot_id|> <|start_header_id|>user<|end_header_id|> <|header_start|>"
                "<|eot|><|python_tag|><|im_start|>x<|im_end|><|endoftext|>")


def _code_chunk() -> str:
    import json.decoder

    return Path(json.decoder.__file__).read_text(encoding="utf-8")[:6000]


@pytest.fixture(scope="session")
def corpus() -> dict[str, str]:
    return {
        "zh": (DATA / "zh_llama_notes.txt").read_text(encoding="utf-8"),
        "en": ENGLISH,
        "code": _code_chunk(),
        "emoji": EMOJI,
        "multilingual": MULTILINGUAL,
        "whitespace_digits": WHITESPACE_DIGITS,
        "special_text": SPECIAL_TEXT,
        "json": json.dumps({"name": "x", "values": [1, 2.5, None], "nested": {"k": "v\u00e9"}}, indent=2),
    }


@pytest.fixture(scope="session")
def long_text(corpus) -> str:
    """Over 400k characters (Meta's per-call chunk), with runs past 25k of both kinds."""
    text = (corpus["en"] + corpus["zh"]) * 40 + "x" * 30_000 + " " * 60_000 + "y" * 80_000 + "\n" * 26_000
    text = (text * 2)[:560_000]
    assert len(text) > 400_000
    return text


@pytest.fixture(scope="session")
def ref_llama3():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="session")
def ref_llama4():
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="session")
def llama3():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def llama4():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama4")


@pytest.fixture(scope="session")
def smollm2_meta(smollm2_gguf):
    from herd.checkpoint.gguf import read_gguf_metadata

    return read_gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2(smollm2_meta):
    from herd.tokenizer import tokenizer_from_gguf_metadata

    return tokenizer_from_gguf_metadata(smollm2_meta)
