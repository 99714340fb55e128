"""GGUF (llama.cpp) checkpoints, through the `gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from herd.errors import HerdError


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct.error/… on bad bytes
        raise HerdError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


def read_gguf_metadata(source: str | Path | GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values (strings decoded, arrays as lists)."""
    reader = source if isinstance(source, GGUFReader) else open_gguf(source)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and not isinstance(value, list):
            value = list(value)
        meta[key] = value
    return meta
