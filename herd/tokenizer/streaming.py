"""Streaming decode: text for each generated token as soon as it is complete.

A token is a run of bytes, not characters: an emoji or a CJK character is often split across two
or more tokens, and decoding tokens one at a time would print U+FFFD halves. `IncrementalDecoder`
feeds each token's exact bytes (`decode_bytes`) to Python's incremental UTF-8 decoder, which holds
back an incomplete trailing sequence until the next bytes arrive. Invalid bytes become U+FFFD
exactly as `bytes.decode(..., "replace")` makes them, so the pieces joined equal `decode(all_ids)`.
"""

from __future__ import annotations

import codecs

from herd.tokenizer.base import Tokenizer


class IncrementalDecoder:
    """push(token_id) → the new complete text (maybe ""); flush() → whatever is left at the end."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]), final=False)

    def flush(self) -> str:
        """The held-back tail (a truncated character becomes U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
