"""Shared fixtures: the real SmolLM2 GGUF (fetched once into herd's cache) and references."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores here: keep torch from oversubscribing when pytest runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from herd.hub import fetch_builtin

    return fetch_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own reading of the same GGUF file: the reference nobody here wrote."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_smollm2_hub_tokenizer(hf_smollm2_tokenizer):
    """transformers' GGUF tokenizer with the hub's pre-tokenizer put back. lm-eval loads the hub's
    tokenizer.json, whose pre-tokenizer is Digits(individual_digits) + ByteLevel; transformers' GGUF
    reader keeps only ByteLevel (tests/tokenizer/test_hf_bpe.py), so "Answer:  4" would split
    differently from the model's own tokenizer (and herd's)."""
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(hf_smollm2_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok
