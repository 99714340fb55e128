"""The built-in default model end to end: herd.load of the real SmolLM2-135M-Instruct GGUF,
greedy generation against transformers reading the same file."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.inference.generate import generate_batch

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return herd.load(smollm2_gguf)


def test_load_by_name_and_logits_shape(smollm2):
    model, tokenizer = smollm2
    tokens = torch.tensor([tokenizer.encode("Hello world")])
    logits = model(tokens)
    assert logits.dtype == torch.float32 and logits.shape == (1, tokens.shape[1], 49152)


def test_greedy_generation_equals_transformers(smollm2, hf_smollm2, hf_smollm2_tokenizer):
    model, tokenizer = smollm2
    for question in QUESTIONS:
        dialog = [{"role": "user", "content": question}]
        ids = tokenizer.chat.encode_dialog(dialog, add_generation_prompt=True)
        theirs_prompt = hf_smollm2_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        if not isinstance(theirs_prompt, list):  # transformers 5 returns a BatchEncoding
            theirs_prompt = theirs_prompt["input_ids"]
        assert ids == list(theirs_prompt)
        ours = generate_batch(model, [ids], max_new_tokens=32)[0].ids
        with torch.no_grad():
            # An explicit mask: SmolLM2's pad id is <|im_end|>, which the prompt itself contains.
            prompt = torch.tensor([ids])
            out = hf_smollm2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                      min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours == out[0, len(ids):].tolist(), question


def test_the_capital_of_france_is_paris(smollm2):
    model, tokenizer = smollm2
    reply = herd.generate(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                          max_new_tokens=32, temperature=0.0)
    assert "Paris" in reply


def test_stream_and_batch_agree_with_generate(smollm2):
    model, tokenizer = smollm2
    dialogs = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    batch = herd.generate(model, tokenizer, dialogs, max_new_tokens=24)
    singles = [herd.generate(model, tokenizer, d, max_new_tokens=24) for d in dialogs]
    assert batch == singles
    assert "".join(herd.stream(model, tokenizer, dialogs[1], max_new_tokens=24)) == singles[1]
