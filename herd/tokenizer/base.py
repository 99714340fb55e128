"""The one interface every herd tokenizer and chat format has.

Two implementations stand behind `Tokenizer`: `TiktokenTokenizer` (Meta's Llama 3 / Llama 4
`tokenizer.model`, encoded with tiktoken) and `HFTokenizer` (byte-level BPE, or SentencePiece BPE
with byte fallback as in Llama 2 / Mistral, through HF `tokenizers`, read from a GGUF file's metadata
or an HF `tokenizer.json`). Everything downstream — the chat formats,
streaming decode, generation, data tokenization, the checkpoint exporters — talks only to this
interface, so a model never cares which library encodes its text (DESIGN.md principle 5: the BPE
tokenizer is separate from chat formatting).

Conventions every implementation follows:
- ids are plain `int`s; `vocab_size` counts every id, special tokens included.
- `encode` never adds BOS/EOS unless asked, and treats special-token *text* ("<|eot_id|>") as
  ordinary text unless `allow_special=True` — user input can never forge a control token.
- `decode` is lossy only where the bytes are not valid UTF-8 (U+FFFD, like `bytes.decode(...,
  "replace")`); `decode_bytes` is exact.
- token text for `token_to_id` is what the token decodes to: " hello", or a special token's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, Literal

from herd.errors import HerdError

Message = dict[str, Any]  # OpenAI-shaped: {"role", "content", optional "tool_calls"}
ExportLayout = Literal["hf", "meta"]


class ChatFormat(ABC):
    """Turns a dialog of OpenAI-shaped messages into token ids, and a generated reply back into a
    message. Implementations: `Llama3ChatFormat`, `Llama4ChatFormat`, `TemplateChatFormat`."""

    tokenizer: Tokenizer

    @abstractmethod
    def encode_dialog(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                      tools: Sequence[Any] | None = None) -> list[int]:
        """Ids of the whole dialog; with `add_generation_prompt`, ends with the header that asks the
        model for the next assistant turn. Malformed messages raise `HerdError`."""

    @abstractmethod
    def decode_assistant(self, ids: Sequence[int]) -> Message:
        """A generated assistant turn (the ids after the generation prompt, stop token included or
        not) → {"role": "assistant", "content", "tool_calls"?, "stop_reason"}."""

    @property
    def stop_ids(self) -> set[int]:
        return self.tokenizer.stop_ids


class Tokenizer(ABC):
    """What every tokenizer offers. Subclasses fill in the abstract parts."""

    vocab_size: int  # every id, special tokens included
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    stop_ids: set[int]  # generation ends on any of these (end of text, end of turn, end of message)
    add_bos: bool  # whether a raw-text prompt for this model starts with BOS
    chat: ChatFormat | None = None
    special_tokens: dict[str, int]  # name → id for every special (control) token

    @abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Ids of `text`; special-token text is matched as control tokens only if `allow_special`."""

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for (special tokens as their names' UTF-8)."""

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_continuation(self, ids: Iterable[int]) -> str:
        """The text of ids that continue earlier text (generated tokens): their exact bytes, as
        streaming decodes them. The same as `decode`, except that a SentencePiece tokenizer's
        `decode` drops the space its first piece carries (the encoder's dummy prefix) while here it
        stays: a completion whose first token is "▁Paris" is " Paris", as vLLM returns it."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def bad_ids_error(self, ids: Sequence[Any]) -> HerdError:
        """The one-line error for ids that are not tokens of this vocabulary (decode_bytes raises it)."""
        bad = [i for i in ids if not isinstance(i, Integral) or not 0 <= i < self.vocab_size]
        return HerdError(f"token ids must be ints in 0..{self.vocab_size - 1}, got {bad[:5]}")

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of the single token whose text is `token` (" hello", "<|eot_id|>"), else None."""

    @abstractmethod
    def save(self, directory: str | Path, layout: ExportLayout = "hf") -> Path:
        """Write the tokenizer files into `directory` (created if needed) and return it.

        "hf": tokenizer.json + tokenizer_config.json (chat_template, bos/eos/pad tokens) that
        `transformers.AutoTokenizer.from_pretrained(directory)` loads with identical ids.
        "meta": tokenizer.model (tiktoken ranks) for tiktoken tokenizers, tokenizer.json otherwise.
        """

    @abstractmethod
    def write_gguf(self, writer: Any) -> None:
        """Add the `tokenizer.*` key/values to a `gguf.GGUFWriter` (llama.cpp's byte-level "gpt2"
        model: tokens in GPT-2 byte-to-unicode spelling, merges, token types, special ids,
        pre-tokenizer name, chat template) so that reading the file back gives identical ids."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"
