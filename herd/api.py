"""The Python entry points: `herd.load` a checkpoint by name or path, `herd.generate` text."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from herd.checkpoint.common import model_dir_of, read_model_info
from herd.errors import HerdError
from herd.hub import BUILTIN_MODELS, fetch_builtin
from herd.inference.cpu_linear import pack_linears
from herd.inference.generate import Completion, generate_batch, generate_ids
from herd.inference.sampling import SamplingParams

Prompt = str | Sequence[dict]  # raw text, or a dialog of OpenAI-shaped messages
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")


def resolve_model_path(spec: str | Path) -> Path:
    """A built-in model name → its cached file; anything else must be an existing path."""
    if str(spec) in BUILTIN_MODELS:
        return fetch_builtin(str(spec))
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
        warnings.warn(f"{path}: no tokenizer files found; loaded the model without a tokenizer", stacklevel=3)
    elif tokenizer.vocab_size > ckpt.args.vocab_size:
        raise HerdError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"is {ckpt.args.vocab_size}")
    return model, tokenizer


def load(spec: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         for_inference: bool = True):
    """Load a model and its tokenizer from a built-in name, a checkpoint directory (HF or Meta
    layout) or a .gguf file → (Transformer in eval mode, tokenizer or None).

    for_inference: on CPU in fp32, pre-pack the linear layers for ~1.5× faster generation
    (herd/inference/cpu_linear.py); such a model has no backward. Pass False to fine-tune."""
    return load_model_tokenizer(resolve_model_path(spec), device, dtype, for_inference)


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


def with_image(model, tokenizer, prompt: Prompt, image):
    """(the model to generate with, prompt ids): without an image, the model and the encoded
    prompt; with one (a path or a PIL image), the image's tiles bound to the model for the prefill
    and its tokens placed in the prompt (herd/models/image_processing.py)."""
    if image is None:
        return model, encode_prompt(tokenizer, prompt)
    from herd.models.image_processing import prepare_image_prompt
    from herd.models.vision import WithImages

    ids, tiles = prepare_image_prompt(model, tokenizer, prompt, image)
    return WithImages(model, tiles.to(model.tok_embeddings.weight.device)), ids


def reserved_ids(tokenizer) -> tuple[int, ...]:
    """The ids of a tokenizer's reserved (never used) special tokens, which generation suppresses."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    return tuple(sorted(i for name, i in specials.items() if "reserved" in name))


def _sampling(temperature, top_p, top_k, seed, tokenizer=None) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          suppress=reserved_ids(tokenizer) if tokenizer is not None else ())


def generate(model, tokenizer, prompt: Prompt | list[Prompt], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             compile: bool = False, image=None) -> str | list[str]:
    """Complete one prompt (→ str) or a batch of prompts (→ list[str]) of any lengths.
    compile: decode through torch.compile (worth it on a GPU; the first call compiles).
    image: a picture (path or PIL image) for a single prompt to a multimodal Llama 4."""
    single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], dict))
    prompts = [prompt] if single else list(prompt)
    if image is not None and not single:
        raise HerdError("an image goes with one prompt, not a batch")
    model, first = with_image(model, tokenizer, prompts[0], image)
    ids = [first] + [encode_prompt(tokenizer, p) for p in prompts[1:]]
    outs: list[Completion] = generate_batch(model, ids, max_new_tokens=max_new_tokens,
                                            sampling=_sampling(temperature, top_p, top_k, seed, tokenizer),
                                            stop_ids=sorted(tokenizer.stop_ids), compile=compile)
    texts = [tokenizer.decode(c.ids) for c in outs]
    return texts[0] if single else texts


def stream(model, tokenizer, prompt: Prompt, *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
           completion: Completion | None = None, compile: bool = False, image=None) -> Iterator[str]:
    """Yield text pieces as they are generated; never a broken UTF-8 character. If `completion`
    is given it collects the generated ids and the finish reason. `image` as in `generate`."""
    from herd.tokenizer.streaming import IncrementalDecoder

    completion = completion if completion is not None else Completion()
    decoder = IncrementalDecoder(tokenizer)
    stop = set(tokenizer.stop_ids)
    model, ids = with_image(model, tokenizer, prompt, image)
    for (token,) in generate_ids(model, [ids], max_new_tokens=max_new_tokens,
                                 sampling=_sampling(temperature, top_p, top_k, seed, tokenizer), stop_ids=sorted(stop),
                                 compile=compile):
        if token in stop:
            completion.stop_token, completion.finish_reason = token, "stop"
            break
        completion.ids.append(token)
        if piece := decoder.push(token):
            yield piece
    if tail := decoder.flush():
        yield tail
