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

Several images: each image's run stands where the image stands in its message's content (Meta's
`_encode_content` walks the content list; text parts are encoded one by one), and the tiles of all
images are concatenated in the same order, so the model fills the `<|patch|>` slots in turn.

transformers' `Llama4ImageProcessor` (torchvision) gives the same canvases and token runs; its pixels
differ by at most one uint8 level where torchvision's antialiased bilinear rounds unlike PIL, plus
bfloat16 rounding (it normalizes in bf16) — herd follows Meta's float32 PIL path
(tests/models/test_vision.py measures both).
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
            return as_rgb(img)
    except UnidentifiedImageError:
        raise HerdError(f"{path}: not an image file PIL can read (JPEG, PNG, GIF, BMP, WebP, ...)") from None
    except Image.DecompressionBombError as e:
        raise HerdError(f"{path}: refusing to decode: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise HerdError(f"{path}: unreadable or truncated image ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def as_rgb(img):
    """A PIL image as RGB; transparency laid on white (Meta's `convert_image_to_rgb`)."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise HerdError(f"an image must be a file path or a PIL image, got {type(img).__name__}")
    if img.mode == "RGBA":
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(img, mask=img.split()[3])
        return rgb
    return img.convert("RGB")


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


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def prompt_images(prompt) -> list:
    """The image parts of a dialog's messages, in order ([] for a text prompt or plain dialog)."""
    if isinstance(prompt, str):
        return []
    return [p for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), list)
            for p in m["content"] if is_image_part(p)]


def place_images(prompt, n: int):
    """`prompt` with `n` separately given images placed in it: a text prompt is unchanged (its
    images go first, after BOS); a dialog without image parts gets `{"type": "image"}` parts at the
    start of its last user message, where Meta's chat format puts images that precede the text.
    A dialog that has image parts already must have exactly `n` slots without data to fill."""
    if isinstance(prompt, str) or n == 0:
        return prompt
    messages = list(prompt)
    if prompt_images(messages):
        return messages
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise HerdError("an image needs a user message to attach to")
    at = users[-1]
    content = messages[at].get("content")
    parts = [content] if isinstance(content, str) else list(content or [])
    messages[at] = {**messages[at], "content": [{"type": "image"}] * n + parts}
    return messages


def image_sources(prompt, images: list) -> list:
    """Every image of a prompt in order of appearance: a dialog's `{"type": "image", "image": X}`
    parts carry their own (a path or PIL image); `{"type": "image"}` slots take the given `images`
    in order (transformers' convention); a prompt with no image parts takes them all."""
    parts = prompt_images(prompt)
    if not parts:
        return list(images)
    slots = sum("image" not in p for p in parts)
    if slots != len(images):
        raise HerdError(f"the dialog has {slots} image slot(s) without data ({{'type': 'image'}}) but "
                        f"{len(images)} image(s) were given")
    given = iter(images)
    return [p["image"] if "image" in p else next(given) for p in parts]


def _text_only(message: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": [p for p in content if not is_image_part(p)]}


def encode_with_images(tokenizer, prompt, image_ids: list[list[int]]) -> list[int]:
    """Prompt ids with each image's token run where the image appears, as Meta's
    `ChatFormat._encode_content` lays out a message's content list: a text prompt becomes
    BOS + images + text; in a dialog each `{"type": "image"}` part of a message is replaced by its
    image's run, between the message's text parts (each text part encoded on its own)."""
    if isinstance(prompt, str):
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return bos + [t for ids in image_ids for t in ids] + tokenizer.encode(prompt, bos=False)
    chat = tokenizer.chat
    if chat is None:
        raise HerdError("this tokenizer has no chat format; pass a plain text prompt with the image")
    messages = list(prompt)
    from herd.tokenizer.chat import validate_messages

    validate_messages([_text_only(m) if isinstance(m, dict) else m for m in messages])
    for i, m in enumerate(messages):
        if m.get("role") != "user" and prompt_images([m]):
            raise HerdError(f"message {i} ({m.get('role')}): images go in user messages")
    if len(prompt_images(messages)) != len(image_ids):
        raise HerdError(f"the dialog has {len(prompt_images(messages))} image part(s) but {len(image_ids)} "
                        "image(s) were processed")
    if not hasattr(chat, "encode_message"):
        return _template_with_images(chat, messages, image_ids, tokenizer)
    text = [_text_only(m) for m in messages]
    ids = chat.encode_dialog(text, add_generation_prompt=True)
    pos = len(chat.encode_dialog([], add_generation_prompt=False))  # BOS, if the format writes one
    inserts: list[int] = []  # where each image's run goes in `ids`, in order
    for m, t in zip(messages, text, strict=True):
        enc = chat.encode_message(t)
        if ids[pos:pos + len(enc)] != enc:
            raise HerdError("cannot place the images: the chat format encodes this dialog unlike its messages")
        if isinstance(m.get("content"), list) and prompt_images([m]):
            at = pos + len(chat.header(m["role"]))
            for part in m["content"]:
                if is_image_part(part):
                    inserts.append(at)
                else:
                    at += len(tokenizer.encode(part if isinstance(part, str) else part["text"]))
            if at != pos + len(enc) - 1:  # the text parts end right before the eot
                raise HerdError("cannot place the images in this message's encoding")
        pos += len(enc)
    out, prev = [], 0
    for at, run in zip(inserts, image_ids, strict=True):
        out += ids[prev:at] + run
        prev = at
    return out + ids[prev:]


def encode_with_image(tokenizer, prompt, image_ids: list[int]) -> list[int]:
    """One image: first in the (last) user turn of a dialog, or after BOS of a text prompt."""
    return encode_with_images(tokenizer, place_images(prompt, 1), [image_ids])


def _template_with_images(chat, messages: list, image_ids: list[list[int]], tokenizer) -> list[int]:
    """A checkpoint's own chat template (TemplateChatFormat encodes its rendering with special
    tokens allowed): render each image part as an `<|image|>` marker in its message's text, and
    put the images' token runs in the markers' places — what transformers' Llama4Processor does
    with the `<|image|>` its Llama 4 template emits for `{"type": "image"}` content."""
    marker = tokenizer.special_tokens.get("<|image|>")
    if marker is None:
        raise HerdError("an image prompt needs a Llama 4 tokenizer (no <|image|> token)")

    def flat(m: dict, image_text: str) -> dict:
        content = m.get("content")
        if not isinstance(content, list):
            return m
        return {**m, "content": "".join(image_text if is_image_part(p) else p if isinstance(p, str) else p["text"]
                                        for p in content)}

    # The markers are found by encoding the rendering with special tokens allowed, so text that spells
    # any control token ("<|image|>" would become a marker) is refused rather than encoded as one.
    from herd.tokenizer.chat import _content_texts

    names = [n for n in tokenizer.special_tokens if n]
    if any(n in text for m in messages for text in _content_texts(flat(m, "")) for n in names):
        raise HerdError("the prompt's text spells a control token of this chat format (such as <|image|>); "
                        "cannot place the images")
    rendered = chat.render([flat(m, "<|image|>") for m in messages], add_generation_prompt=True)
    marked = tokenizer.encode(rendered, allow_special=True)
    at = [i for i, t in enumerate(marked) if t == marker]
    if len(at) != len(image_ids):
        raise HerdError("cannot place the images in this chat template's rendering")
    out, prev = [], 0
    for i, run in zip(at, image_ids, strict=True):
        out += marked[prev:i] + run
        prev = i + 1
    return out + marked[prev:]


@dataclass
class ImagePrompt:
    ids: list[int]
    tiles: torch.Tensor  # every image's tiles (each: row-major tiles, then its thumbnail), in prompt order
    grids: list[tuple[int, int]]


def require_vision(model) -> VisionArgs:
    vision = getattr(model.args, "vision", None)
    if vision is None:
        raise HerdError("this model is text-only (no vision encoder in the checkpoint); --image needs a "
                        "multimodal Llama 4 checkpoint (Llama4ForConditionalGeneration)")
    return vision


def prepare_images_prompt(model, tokenizer, prompt, images=()) -> ImagePrompt:
    """Prompt ids and tiles for `model`: `images` (paths or PIL images) placed as `place_images`
    says, plus any images carried by the dialog's own image parts. A text-only model is an error,
    as is a tokenizer without Llama 4's image tokens."""
    vision = require_vision(model)
    if tokenizer is None:
        raise HerdError("this model was loaded without a tokenizer; an image prompt needs one")
    patch = tokenizer.special_tokens.get("<|patch|>")
    if patch is not None and patch != vision.image_token_id:
        raise HerdError(f"the tokenizer's <|patch|> is id {patch} but the model's image token is "
                        f"{vision.image_token_id}: tokenizer and checkpoint do not belong together")
    images = list(images)
    sources = image_sources(prompt, images)
    prompt = place_images(prompt, len(images))
    processed = [preprocess_image(load_image(s) if isinstance(s, (str, Path)) else as_rgb(s), vision)
                 for s in sources]
    if not processed:
        raise HerdError("no image in the prompt")
    ids = encode_with_images(tokenizer, prompt,
                             [image_token_ids(p.grid, vision, tokenizer.special_tokens) for p in processed])
    return ImagePrompt(ids, torch.cat([p.tiles for p in processed]), [p.grid for p in processed])


def prepare_image_prompt(model, tokenizer, prompt, image) -> tuple[list[int], torch.Tensor]:
    """(prompt ids, tiles) for one image (a path or PIL image) given beside the prompt."""
    p = prepare_images_prompt(model, tokenizer, prompt, [image])
    return p.ids, p.tiles
