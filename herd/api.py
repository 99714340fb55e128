"""The Python entry points: `herd.load` a checkpoint by name or path, `herd.generate` text."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from herd.checkpoint.common import model_dir_of, read_model_info
from herd.errors import HerdError, HerdWarning
from herd.hub import BUILTIN_MODELS, fetch_builtin
from herd.inference.cpu_linear import pack_linears
from herd.inference.generate import (
    Completion,
    check_max_new_tokens,
    check_min_tokens,
    check_seed,
    check_stop_ids,
    generate_batch,
    generate_ids,
)
from herd.inference.sampling import SamplingParams

Prompt = str | Sequence[dict]  # raw text, or a dialog of OpenAI-shaped messages
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")


def resolve_model_path(spec: str | Path) -> Path:
    """A built-in model name → its cached file; anything else must be an existing path."""
    if str(spec) in BUILTIN_MODELS:
        return fetch_builtin(str(spec))
    if not str(spec).strip():  # Path("") is ".": the working directory's checkpoint would load silently
        raise HerdError("model path is empty; give a built-in name or a path")
    path = Path(spec).expanduser()
    if not path.exists():
        raise HerdError(f"no model {str(spec)!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}) "
                        "and no such file or directory")
    return model_dir_of(path)  # a training checkpoint ckpt-N/ → its model/


def load_model_tokenizer(path: Path, device, dtype, for_inference: bool = True):
    from herd.checkpoint import build_model, read_checkpoint
    from herd.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata

    ckpt = read_checkpoint(path)
    model = build_model(ckpt.args, ckpt.state_dict, device=device, dtype=dtype).eval()
    ckpt.state_dict.clear()  # the model holds the tensors now; packing below frees the originals
    if for_inference:
        pack_linears(model)  # fp32 CPU only; a no-op elsewhere
    if ckpt.format == "gguf":
        tokenizer = tokenizer_from_gguf_metadata(ckpt.metadata)
    elif any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = load_tokenizer(path)  # present but broken: say so, don't carry on without it
    else:
        tokenizer = None
    if tokenizer is not None and path.is_dir() and read_model_info(path).get("chat_format") is False:
        tokenizer.chat = None  # a base model: prompts are completed as text
    if tokenizer is None:
        warnings.warn(f"{path}: no tokenizer files found; loaded the model without a tokenizer", HerdWarning, stacklevel=3)
    elif tokenizer.vocab_size > ckpt.args.vocab_size:
        raise HerdError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"is {ckpt.args.vocab_size}")
    return model, tokenizer


def load(spec: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         for_inference: bool = True):
    """Load a model and its tokenizer from a built-in name, a checkpoint directory (HF or Meta
    layout) or a .gguf file → (Transformer in eval mode, tokenizer or None).

    for_inference: on CPU in fp32, pre-pack the linear layers whose packed products decode faster on
    this machine (timed at load, herd/inference/cpu_linear.py; 1.5–2× per layer where they win);
    such a model has no backward. Pass False to fine-tune."""
    return load_model_tokenizer(resolve_model_path(spec), device, dtype, for_inference)


def _check_prompt(prompt, where: str) -> None:
    """One prompt is text or a dialog (a non-empty list of message dicts); anything else is one
    HerdError line naming it. Without this, None, a number or bytes failed deep inside with a
    TypeError ('int' object is not iterable), a bare message dict with KeyError: 0, and an empty
    dialog quietly generated from the assistant header alone."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, dict):
        raise HerdError(f"{where} is a single message dict; a dialog is a list of them: [{{'role': ..., "
                        "'content': ...}]")
    if isinstance(prompt, (bytes, bytearray)):
        raise HerdError(f"{where} is bytes; decode it to a str first")
    if isinstance(prompt, Sequence):
        if len(prompt) == 0:
            raise HerdError(f"{where} is an empty dialog; give at least one message")
        for j, m in enumerate(prompt):
            if not isinstance(m, dict):
                what = "None" if m is None else type(m).__name__
                raise HerdError(f"{where}: message {j} is {what}; a dialog is a list of message dicts")
        return
    what = "None" if prompt is None else type(prompt).__name__
    raise HerdError(f"{where} is {what}; give text (a str) or a dialog (a list of message dicts)")


def _prompt_batch(prompt) -> tuple[list[Prompt], bool]:
    """(the prompts, whether `prompt` was one prompt rather than a batch). A batch is a list, tuple
    or other iterable of prompts and may be empty; a list whose first item is a dict is one dialog."""
    if isinstance(prompt, (str, dict)):
        _check_prompt(prompt, "prompt")
        return [prompt], True
    if prompt is None or isinstance(prompt, (bytes, bytearray)) or not hasattr(prompt, "__iter__"):
        _check_prompt(prompt, "prompt")  # raises: None, a number, bytes, ...
    if not isinstance(prompt, Sequence):
        prompt = list(prompt)  # a generator, a NumPy array of str, ...
    if len(prompt) > 0 and isinstance(prompt[0], dict):
        _check_prompt(prompt, "prompt")
        return [prompt], True
    for i, p in enumerate(prompt):
        _check_prompt(p, f"prompt {i}")
    return list(prompt), False


def _check_encoded(ids: list[list[int]], single: bool) -> None:
    """A prompt that encodes to no tokens (empty text with a tokenizer that adds no BOS) is named
    here, by its place in the batch; text that encodes to BOS alone is a fine unconditional start."""
    for i, row in enumerate(ids):
        if len(row) == 0:
            where = "prompt" if single else f"prompt {i}"
            raise HerdError(f"{where} is empty: it encodes to no tokens (this tokenizer adds no BOS); give some text")


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Text is a raw completion prompt (BOS added where the tokenizer wants one); a list of
    messages goes through the tokenizer's chat format with the assistant header appended."""
    if tokenizer is None:
        raise HerdError("this model was loaded without a tokenizer; pass token ids instead of text")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None and getattr(tokenizer, "add_bos", True))
    if tokenizer.chat is None:
        raise HerdError("this tokenizer has no chat format; pass a plain text prompt")
    return tokenizer.chat.encode_dialog(list(prompt), add_generation_prompt=True)


def _image_list(images) -> list:
    """One prompt's images: None → [], a single path or PIL image → [it], a list as is."""
    if images is None:
        return []
    if isinstance(images, (str, Path)) or not isinstance(images, (list, tuple)):
        return [images]
    return list(images)


def with_images(model, tokenizer, prompts: list[Prompt], images: list | None = None):
    """(the model to generate with, every prompt's ids). A row with images (given in `images[i]`,
    or as image parts of its dialog) gets their token runs in its prompt
    (herd/models/image_processing.py); all rows' tiles, in row order, are bound to the model for
    the batched prefill, whose `<|patch|>` slots are filled row by row in the same order."""
    from herd.models.image_processing import prompt_images

    if images is not None and not isinstance(images, (list, tuple)):
        raise HerdError("images for a batch: a list with one entry per prompt (None, an image or a list)")
    per_row = [[] for _ in prompts] if images is None else [_image_list(x) for x in images]
    if len(per_row) != len(prompts):
        raise HerdError(f"images: one entry per prompt is needed, got {len(per_row)} for {len(prompts)} prompts")
    if not any(per_row) and not any(prompt_images(p) for p in prompts):
        return model, [encode_prompt(tokenizer, p) for p in prompts]
    from herd.models.image_processing import prepare_images_prompt
    from herd.models.vision import WithImages

    ids, tiles = [], []
    for p, imgs in zip(prompts, per_row, strict=True):
        if imgs or prompt_images(p):
            row = prepare_images_prompt(model, tokenizer, p, imgs)
            ids.append(row.ids)
            tiles.append(row.tiles)
        else:
            ids.append(encode_prompt(tokenizer, p))
    return WithImages(model, torch.cat(tiles).to(model.tok_embeddings.weight.device)), ids


def with_image(model, tokenizer, prompt: Prompt, image):
    """(the model to generate with, prompt ids) for one prompt and its image(s) (a path or PIL
    image, or a list of them), as `with_images` does for a batch."""
    model, (ids,) = with_images(model, tokenizer, [prompt], [image])
    return model, ids


def _one_prompt_images(image, images) -> list:
    if image is not None and images is not None:
        raise HerdError("give image= or images=, not both")
    return _image_list(image if image is not None else images)


def reserved_ids(tokenizer) -> tuple[int, ...]:
    """The ids of a tokenizer's reserved (never used) special tokens, which generation suppresses."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    return tuple(sorted(i for name, i in specials.items() if "reserved" in name))


def _sampling(temperature, top_p, top_k, seed, tokenizer=None, **more) -> SamplingParams:
    """SamplingParams checks every value (one HerdError line naming it); `more`: min_p, min_tokens
    and the penalties, as vLLM's SamplingParams takes them."""
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          suppress=reserved_ids(tokenizer) if tokenizer is not None else (), **more)


def _stop_ids(tokenizer, stop_token_ids) -> list[int]:
    """The tokenizer's stop ids and the caller's extra ones (vLLM's stop_token_ids)."""
    extra = set(check_stop_ids(stop_token_ids, "stop_token_ids"))
    return sorted(extra if tokenizer is None else set(tokenizer.stop_ids) | extra)


def generate(model, tokenizer, prompt: Prompt | list[Prompt], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             compile: bool = False, image=None, images=None, min_p: float = 0.0, min_tokens: int = 0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
             stop_token_ids: Sequence[int] = ()) -> str | list[str]:
    """Complete one prompt (→ str) or a batch of prompts (→ list[str]) of any lengths.
    compile: decode through torch.compile (worth it on a GPU; the first call compiles).
    Pictures for a multimodal Llama 4 (paths or PIL images): for one prompt, `image=` one or
    `images=[...]` several, placed in order before the text of the (last) user turn; for a batch,
    `images=[row0, row1, ...]` with one entry per prompt (None, an image or a list). A dialog can
    also place them itself: content parts `{"type": "image", "image": path}` where they go, or
    `{"type": "image"}` slots filled from `images` in order.
    min_p, min_tokens, presence/frequency/repetition_penalty and stop_token_ids as vLLM's
    SamplingParams: min_p in [0, 1] (0 = off), min_tokens new tokens before any stop token (0 ..
    max_new_tokens), penalties in [-2, 2] / > 0 (1 = off), extra ids that end the text."""
    prompts, single = _prompt_batch(prompt)
    if single:
        per_row = [_one_prompt_images(image, images)]
    elif image is not None:
        raise HerdError("image= goes with one prompt; for a batch pass images=[...] with one entry per prompt")
    else:
        per_row = images
    sampling = _sampling(temperature, top_p, top_k, seed, tokenizer, min_p=min_p, min_tokens=min_tokens,
                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                         repetition_penalty=repetition_penalty)
    stop_ids = _stop_ids(tokenizer, stop_token_ids)
    if not prompts:
        # An empty batch is an empty answer, as vLLM's LLM.generate([]) gives; the arguments are
        # still checked, so a bad value shows on the first call whatever the batch holds.
        check_max_new_tokens(max_new_tokens)
        check_seed(seed)
        check_min_tokens(min_tokens, max_new_tokens)
        with_images(model, tokenizer, prompts, per_row)  # images= must be empty too
        return []
    model, ids = with_images(model, tokenizer, prompts, per_row)
    _check_encoded(ids, single)
    outs: list[Completion] = generate_batch(model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                            stop_ids=stop_ids, compile=compile)
    decode = getattr(tokenizer, "decode_continuation", tokenizer.decode)  # as stream() gives them
    texts = [decode(c.ids) for c in outs]
    return texts[0] if single else texts


def stream(model, tokenizer, prompt: Prompt, *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
           completion: Completion | None = None, compile: bool = False, image=None,
           images=None, min_p: float = 0.0, min_tokens: int = 0, presence_penalty: float = 0.0,
           frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
           stop_token_ids: Sequence[int] = ()) -> Iterator[str]:
    """Yield text pieces as they are generated; never a broken UTF-8 character. If `completion`
    is given it collects the generated ids and the finish reason. `image`/`images` as in
    `generate` for one prompt; min_p, min_tokens, the penalties and stop_token_ids as there."""
    from herd.tokenizer.streaming import IncrementalDecoder

    completion = completion if completion is not None else Completion()
    decoder = IncrementalDecoder(tokenizer)
    _check_prompt(prompt, "prompt")  # one prompt: a batch (a list of prompts) is generate's
    sampling = _sampling(temperature, top_p, top_k, seed, tokenizer, min_p=min_p, min_tokens=min_tokens,
                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                         repetition_penalty=repetition_penalty)
    stop = set(_stop_ids(tokenizer, stop_token_ids))
    model, ids = with_image(model, tokenizer, prompt, _one_prompt_images(image, images))
    _check_encoded([ids], True)
    for (token,) in generate_ids(model, [ids], max_new_tokens=max_new_tokens,
                                 sampling=sampling, stop_ids=sorted(stop),
                                 compile=compile):
        if token in stop:
            completion.stop_token, completion.finish_reason = token, "stop"
            break
        completion.ids.append(token)
        if piece := decoder.push(token):
            yield piece
    if tail := decoder.flush():
        yield tail
