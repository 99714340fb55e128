"""Llama 4 image preprocessing: a picture → normalized tiles for the vision encoder, and the image's
run of special tokens in the prompt (SPEC §1, issue 6).

Meta's reference (`llama_models/llama4/preprocess.py` `VariableSizeImageTransform`, and
`chat_format.py` `_encode_image`), step by step:

1. Canvases: every (rows × cols) grid of at most `max_tiles` tiles, as tile_size multiples.
2. Best fit: the canvas needing the *smallest upscaling* of the image without distortion; if none
   can hold it without shrinking, the one needing the least downscaling; ties → smallest area.
3. Resize without distortion to fit that canvas (upscaling capped at one tile), bilinear (PIL).
4. Pad to the canvas, black, image top-left.
5. To [0, 1], normalize with mean = std = 0.5 (→ [-1, 1]).
6. Cut into row-major tiles; when there is more than one, append a global thumbnail (the whole
   image squashed to one tile) last.

Prompt: `<|image_start|>`, then for a multi-tile image each row of tiles as `<|patch|>`×n per tile
separated by `<|tile_x_separator|>` and ended by `<|tile_y_separator|>`, then `<|image|>` and the
thumbnail's `<|patch|>`×n; `<|image_end|>`. n = patches per tile after pixel shuffle (144).
The reference resizes through torchvision's PIL path (`Image.resize(..., BILINEAR)`), used here
directly so that torchvision is not needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.errors import HerdError
from herd.models.llama4 import VisionArgs

IMAGE_TOKENS = ("<|image_start|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
                "<|image_end|>")


@dataclass
class ProcessedImage:
    tiles: torch.Tensor  # (n_tiles [+ 1 thumbnail], 3, tile, tile), normalized
    grid: tuple[int, int]  # (rows, cols) of the canvas, before the thumbnail


def load_image(path: str | Path):
    """Open an image file as RGB (PIL); a transparent image is laid on white, as Meta's
    `convert_image_to_rgb` does. Any unreadable file is one clear error."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: no such image file")
    # A truncated file is an error here, whatever another library set PIL to (llama-models turns
    # LOAD_TRUNCATED_IMAGES on globally, which would feed the model a half-grey picture).
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGBA":
                rgb = Image.new("RGB", img.size, (255, 255, 255))
                rgb.paste(img, mask=img.split()[3])
                return rgb
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise HerdError(f"{path}: not an image file PIL can read (JPEG, PNG, GIF, BMP, WebP, ...)") from None
    except Image.DecompressionBombError as e:
        raise HerdError(f"{path}: refusing to decode: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise HerdError(f"{path}: unreadable or truncated image ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """All canvases of at most `max_tiles` tiles, grouped by aspect ratio in Meta's order (which
    decides ties), as (w, h) pixel sizes — the reference's list is symmetric, so its
    (height, width) docstring and its (width, height) use agree."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for a in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[a / (n // a)].append((a, n // a))
    return [(a * tile, b * tile) for group in by_ratio.values() for a, b in group]


def best_canvas(size: tuple[int, int], canvases: list[tuple[int, int]]) -> tuple[int, int]:
    """(w, h) of the canvas for an image of `size` (w, h): step 2 of the module docstring, computed
    in float32 like the reference so that ties resolve identically."""
    res = torch.tensor(canvases)
    scale_w = res[:, 0] / size[0]
    scale_h = res[:, 1] / size[1]
    scales = torch.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    fits = res[scales == chosen]
    best = fits[torch.argmin(fits[:, 0] * fits[:, 1])] if len(fits) > 1 else fits[0]
    return int(best[0]), int(best[1])


def fit_size(size: tuple[int, int], canvas: tuple[int, int], max_upscale: int) -> tuple[int, int]:
    """(w, h) the image is resized to: as large as fits in `canvas` without distortion, but never
    upscaled past `max_upscale` on a side that is smaller than that (Meta's
    `resize_without_distortion` with `get_max_res_without_distortion`)."""
    w, h = size
    tw, th = min(max(w, max_upscale), canvas[0]), min(max(h, max_upscale), canvas[1])
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.floor(h * sw), th)
    else:
        nw, nh = min(math.floor(w * sh), tw), th
    return max(nw, 1), max(nh, 1)


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB → (3, H, W) float in [-1, 1] (ToTensor, then Normalize(0.5, 0.5))."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
    return (data.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def preprocess_image(img, vision: VisionArgs) -> ProcessedImage:
    """PIL RGB image → tiles (and thumbnail) of vision.image_size pixels, with the canvas grid."""
    from PIL import Image

    tile = vision.image_size
    canvas = best_canvas(img.size, supported_canvases(vision.max_tiles, tile))
    resized = img.resize(fit_size(img.size, canvas, tile), Image.BILINEAR)
    padded = Image.new("RGB", canvas, (0, 0, 0))
    padded.paste(resized)
    x = _to_tensor(padded)
    cols, rows = canvas[0] // tile, canvas[1] // tile
    tiles = x.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        thumb = _to_tensor(img.resize((tile, tile), Image.BILINEAR))
        tiles = torch.cat([tiles, thumb[None]])
    return ProcessedImage(tiles=tiles, grid=(rows, cols))


def image_token_ids(grid: tuple[int, int], vision: VisionArgs, special: dict[str, int]) -> list[int]:
    """The image's run of prompt tokens (module docstring), from the tokenizer's special-token ids."""
    missing = [t for t in IMAGE_TOKENS if t not in special]
    if missing:
        raise HerdError(f"this tokenizer has no image tokens ({missing[0]} missing): not a Llama 4 tokenizer")
    patch = [special["<|patch|>"]] * vision.tokens_per_tile
    ids = [special["<|image_start|>"]]
    rows, cols = grid
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += patch
                if x < cols - 1:
                    ids.append(special["<|tile_x_separator|>"])
            ids.append(special["<|tile_y_separator|>"])
    return ids + [special["<|image|>"]] + patch + [special["<|image_end|>"]]


def encode_with_image(tokenizer, prompt, image_ids: list[int]) -> list[int]:
    """Prompt ids with the image first in the (last) user turn, where Meta's chat format puts an
    image that precedes the text: a plain-text prompt becomes BOS + image + text; a dialog gets the
    image right after the last user message's header."""
    if isinstance(prompt, str):
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return bos + image_ids + tokenizer.encode(prompt, bos=False)
    chat = tokenizer.chat
    if chat is None:
        raise HerdError("this tokenizer has no chat format; pass a plain text prompt with the image")
    messages = list(prompt)
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise HerdError("an image needs a user message to attach to")
    at = users[-1]
    if not hasattr(chat, "encode_message"):
        return _template_with_image(chat, messages, at, image_ids, tokenizer)
    before = chat.encode_dialog(messages[:at], add_generation_prompt=False)
    turn = chat.encode_message(messages[at])
    head = len(chat.header("user"))
    after = chat.encode_dialog(messages[at + 1:], add_generation_prompt=True)
    if chat.bos_id is not None:
        after = after[1:]  # encode_dialog starts every dialog with BOS; only the first part keeps it
    return before + turn[:head] + image_ids + turn[head:] + after


def _template_with_image(chat, messages: list, at: int, image_ids: list[int], tokenizer) -> list[int]:
    """A checkpoint's own chat template (TemplateChatFormat encodes its rendering with special
    tokens allowed): render the user turn with a leading `<|image|>` marker, check that the marker
    is the only difference from the plain rendering, and put the image's tokens in its place — what
    transformers' Llama4Processor does with the `<|image|>` its template emits."""
    marker = tokenizer.special_tokens.get("<|image|>")
    content = messages[at].get("content")
    if marker is None or not isinstance(content, str):
        raise HerdError("an image prompt needs a Llama 4 tokenizer and a text user message")
    plain = chat.encode_dialog(messages, add_generation_prompt=True)
    marked = chat.encode_dialog(messages[:at] + [{**messages[at], "content": "<|image|>" + content}]
                                + messages[at + 1:], add_generation_prompt=True)
    i = next((j for j, (a, b) in enumerate(zip(plain, marked, strict=False)) if a != b), len(plain))
    if len(marked) != len(plain) + 1 or marked[i] != marker or marked[i + 1:] != plain[i:]:
        raise HerdError("cannot place the image in this chat template's rendering")
    return plain[:i] + image_ids + plain[i:]


def prepare_image_prompt(model, tokenizer, prompt, image) -> tuple[list[int], torch.Tensor]:
    """(prompt ids, tiles) for `model` given an image path or PIL image; a text-only model is an
    error, as is a tokenizer without Llama 4's image tokens."""
    vision = getattr(model.args, "vision", None)
    if vision is None:
        raise HerdError("this model is text-only (no vision encoder in the checkpoint); --image needs a "
                        "multimodal Llama 4 checkpoint (Llama4ForConditionalGeneration)")
    if tokenizer is None:
        raise HerdError("this model was loaded without a tokenizer; an image prompt needs one")
    img = load_image(image) if isinstance(image, (str, Path)) else image
    processed = preprocess_image(img, vision)
    patch = tokenizer.special_tokens.get("<|patch|>")
    if patch is not None and patch != vision.image_token_id:
        raise HerdError(f"the tokenizer's <|patch|> is id {patch} but the model's image token is "
                        f"{vision.image_token_id}: tokenizer and checkpoint do not belong together")
    ids = encode_with_image(tokenizer, prompt, image_token_ids(processed.grid, vision, tokenizer.special_tokens))
    return ids, processed.tiles
