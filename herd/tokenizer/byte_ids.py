"""The byte-level ids of `data.tokenizer = "bytes"` (herd/data/shards.py: byte b is id b, then BOS 256
and EOS 257) as a real tokenizer, so a model trained on them (configs/debug.toml) can be generated
from, averaged, converted and evaluated like any other.

It is an HF `tokenizers` byte-level BPE with no merges (every byte its own token), so it is written
as tokenizer.json + tokenizer_config.json into checkpoints, which transformers' `AutoTokenizer` and
herd's `HFTokenizer` read back with the same ids, and as a "gpt2" vocabulary into GGUF.
"""

from __future__ import annotations

from herd.data.shards import BYTE_BOS, BYTE_EOS, BYTE_VOCAB
from herd.tokenizer.bytelevel import BYTE_TO_CHAR, build_backend
from herd.tokenizer.hf_bpe import HFTokenizer

BOS_TEXT, EOS_TEXT = "<|begin_of_text|>", "<|end_of_text|>"  # Llama 3's names for the two


def byte_tokenizer() -> HFTokenizer:
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + [BOS_TEXT, EOS_TEXT]
    assert len(tokens) == BYTE_VOCAB and tokens.index(BOS_TEXT) == BYTE_BOS and tokens.index(EOS_TEXT) == BYTE_EOS
    # GPT-2's pre-tokenizer split changes nothing without merges; it is there so GGUF can name it.
    backend = build_backend(tokens, [], special=[BYTE_BOS, BYTE_EOS], pre="gpt-2", bos_id=BYTE_BOS)
    return HFTokenizer(backend, bos_id=BYTE_BOS, eos_id=BYTE_EOS, add_bos=True)
