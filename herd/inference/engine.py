"""The serving engine: a block-paged KV cache and a scheduler with continuous batching and prefix
sharing (DESIGN principle 6: a serving engine separate from the model; SPEC §4/§5).

- KV cache (`KVPool`, `BlockPool`): keys and values of every layer live in one pool of fixed-size
  blocks of `block_size` positions (PagedAttention). A sequence owns a list of blocks (its block
  table), so memory is taken as it grows and given back the moment it ends — no per-request
  preallocation to the longest possible length.
- Prefix sharing: a full block is named by a hash of its tokens and of every token before it, so
  two requests (or the `n` samples of one request) with a common prompt point at the same blocks,
  reference-counted; the prompt is computed once. SPEC §4: sharing the prompt's KV cache across
  rejection samples doubled the paper's throughput. Blocks nobody references keep their contents
  and hash until their memory is needed (least recently freed first), so a later request with the
  same prefix (a system prompt, a multi-turn dialog) finds them too.
- Scheduler (`Engine.step`): every step admits waiting requests while there is room (batch slots
  and KV blocks), runs one forward for the sequences that decode (one new token each) and one for
  prompts being prefilled (in chunks of at most `max_prefill_tokens` per step, so a long prompt
  never stalls the others for long), samples, applies stop conditions, and retires finished
  sequences, freeing their blocks at once. When the pool runs dry mid-decode the most recently
  admitted request is preempted (its blocks freed, its tokens recomputed later), so the engine
  queues rather than crashes. `cancel` frees a request's blocks immediately.
- Images (Llama 4, herd/models/vision.py): a request may carry the tiles of its images. The vision
  encoder runs once per request, the first time a prefill chunk holds one of its `<|patch|>`
  tokens, and the features replace those tokens' embeddings (in order, as
  `Llama4Multimodal.merge_images` does) before the decoder runs. Every `<|patch|>` has the same
  id, so a block holding image tokens is named by its tokens *and* the digests of the images whose
  features it holds: the same text with another image never finds this request's blocks, while the
  same image again does (and skips the encoder when all its blocks are found).
- Logprobs (`SamplingParams.logprobs`): only for the requests that ask, each sampled token's
  logprob and the top-k of the model's raw distribution (log_softmax of the step's logits, before
  bias, penalties, temperature and top-k/top-p: vLLM V1's "raw_logprobs"), recorded when the token
  is sampled — so a preempted request's recompute, which samples nothing until it is level again,
  never records a step twice. The stop token that ends a sample gets its entry too (vLLM keeps
  it in the output's token ids and logprobs; its usage counts it). Samples of an n>1 request
  share the row's distribution and record each its own token.
  Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's: the server's `echo` with logprobs):
  the prefill of such a request computes every position's logits (not only the last) and records
  each prompt token's logprob after the tokens before it, once — a recompute after preemption
  skips the positions already recorded. Such a request takes no cached prefix blocks (their
  positions would never be computed; vLLM skips its prefix cache for them too), though the blocks
  it computes are shared with later requests as usual.
- Structured outputs (`SamplingParams.grammar`, herd/inference/structured.py): each sample has its
  own llguidance matcher (an n>1 request's samples fork their parent's when they branch off); its
  mask of allowed tokens is applied before the sample is drawn, and the matcher is advanced where
  the token is appended — as logprobs are recorded, so a recompute never advances it twice. A
  sample whose grammar has ended stops ("stop"), as in vLLM.

The model is used through its ordinary `forward(tokens, cache=, positions=, mask=, last_only=True)`:
a step's rows are left-padded to one length, each row gets its own RoPE positions and a mask over
its own gathered keys, and `PagedBatch` — the `Cache` the model writes into — scatters new keys and
values into the rows' blocks and gathers each row's whole context back. Shape letters as in
herd/models/llama3.py; R rows, N pool slots.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from herd.errors import HerdError
from herd.inference.sampling import (
    SamplingParams,
    TokenCounts,
    check_stop_ids,
    is_token_id,
    raw_logprobs,
    sample,
)

DEFAULT_KV_CACHE_BYTES = 1 << 30


class EngineBusy(HerdError):
    """The queue is full: try again later (HTTP 429)."""


# ---- the paged KV cache ---------------------------------------------------------------------------

class BlockPool:
    """Reference-counted KV blocks with a hash table of computed full blocks (prefix caching).

    A block with no reference is free; if its contents are named by a hash it stays findable until
    it is reused. Allocation takes never-named blocks first, then the least recently freed ones."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._hash_of: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self._free_plain:
            b = self._free_plain.popleft()
        elif self._free_cached:
            b, _ = self._free_cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(b)]  # its contents are about to be overwritten
        else:
            raise HerdError("KV cache pool exhausted")  # callers check num_free first
        self.refs[b] = 1
        return b

    def retain(self, b: int) -> None:
        if self.refs[b] == 0:
            del self._free_cached[b]  # only named blocks can be found while free
        self.refs[b] += 1

    def release(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self._hash_of:
                self._free_cached[b] = None
            else:
                self._free_plain.append(b)

    def lookup(self, h: int) -> int | None:
        return self._by_hash.get(h)

    def register(self, b: int, h: int) -> None:
        """Name block b's (computed, full) contents by h, unless that content already has a block."""
        if h not in self._by_hash and b not in self._hash_of:
            self._by_hash[h] = b
            self._hash_of[b] = h


class KVPool:
    """The memory: keys and values of every layer in `num_blocks` blocks of `block_size` slots,
    plus one scratch block that padding positions write into. Layout (L, N, K, d): a slot's keys for
    all heads are contiguous, so scattering new tokens and gathering a context are row copies."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.scratch_block = num_blocks
        shape = (n_layers, (num_blocks + 1) * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def copy_block(self, src: int, dst: int, n: int) -> None:
        """Copy the first n slots of block src into block dst, every layer (copy-on-write)."""
        bs = self.block_size
        self.k[:, dst * bs:dst * bs + n] = self.k[:, src * bs:src * bs + n]
        self.v[:, dst * bs:dst * bs + n] = self.v[:, src * bs:src * bs + n]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PagedBatch:
    """The `Cache` (herd/models/llama3.py) for one forward over R rows, each row one sequence
    computing `n_new` tokens from position `start`, left-padded to T. Also builds the forward's
    inputs: tokens, positions and the attention mask over each row's gathered context.

    Each row's context is gathered right-aligned into S = the longest context, like the left-padded
    KVCache of herd/inference/generate.py: key index S - ctx + p holds position p and the queries
    sit at indices offset .. offset + T with offset = S - T. Llama 4's chunked-attention mask
    (llama4.Transformer._chunk_mask) reads that layout off `offset` and the positions."""

    def __init__(self, pool: KVPool, rows: Sequence[tuple[list[int], list[int], int]], device):
        """rows: (block table, the new tokens, start position of the first new token)."""
        bs = pool.block_size
        self.pool = pool
        n = torch.tensor([len(t) for _, t, _ in rows], device=device)
        start = torch.tensor([s for _, _, s in rows], device=device)
        ctx = start + n  # (R,) positions each row attends to after this step
        R, T, S = len(rows), int(n.max()), int(ctx.max())
        width = max(len(b) for b, _, _ in rows)
        table = torch.full((R, max(width, 1)), pool.scratch_block, dtype=torch.long)
        tokens = torch.zeros(R, T, dtype=torch.long)
        for i, (blocks, new, _) in enumerate(rows):
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            tokens[i, T - len(new):] = torch.tensor(new, dtype=torch.long)
        table, self.tokens = table.to(device), tokens.to(device)
        scratch = pool.scratch_block * bs

        def slots(pos):  # (R, X) positions < ctx → pool slot indices
            return table.gather(1, pos // bs) * bs + pos % bs

        t = torch.arange(T, device=device)
        real = t[None, :] >= (T - n)[:, None]  # (R, T): False on left padding
        pos = torch.where(real, start[:, None] + t[None, :] - (T - n)[:, None], -1)
        self.positions = pos.clamp(min=0)
        self.write = torch.where(real, slots(self.positions), scratch).reshape(-1)  # (R·T,)
        key_pos = torch.arange(S, device=device)[None, :] - (S - ctx)[:, None]  # (R, S): -k on k pads
        self.gather = torch.where(key_pos >= 0, slots(key_pos.clamp(0, width * bs - 1)), scratch).reshape(-1)
        # A query sees its own row's keys up to its position; a padding query sees the last key only
        # (a query row with no visible key would give NaNs).
        last = torch.arange(S, device=device) == S - 1
        mask = ((key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= pos[:, :, None])) | (
            ~real[:, :, None] & last[None, None, :])
        self.mask = mask[:, None]  # (R, 1, T, S)
        self.R, self.T, self.S = R, T, S
        self.offset = S - T  # the queries' key index: each row's last query is its last key

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R, K, T, d = k.shape
        kp, vp = self.pool.k[layer], self.pool.v[layer]  # (N, K, d)
        kp.index_copy_(0, self.write, k.transpose(1, 2).reshape(R * T, K, d))
        vp.index_copy_(0, self.write, v.transpose(1, 2).reshape(R * T, K, d))
        keys = kp.index_select(0, self.gather).view(R, self.S, K, d).transpose(1, 2)  # (R, K, S, d)
        values = vp.index_select(0, self.gather).view(R, self.S, K, d).transpose(1, 2)
        return keys, values

    def advance(self, n: int) -> None:
        pass


# ---- requests and sequences ---------------------------------------------------------------------

class TokenLogprob(NamedTuple):
    """One generated token's logprob and the `top` most likely tokens of the same step, each
    (token id, logprob), most likely first (empty when logprobs=0)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What the engine tells a request's listener after a step: new tokens and text of one sample,
    and its finish reason once it ends ("stop", "length", "cancelled", or "error" when a step that
    ran it failed: see Engine.step)."""

    request_id: int
    index: int  # which of the request's n samples
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # For a request with SamplingParams.logprobs: an entry per token sampled since the last event,
    # in order — token_ids' tokens, then the stop token that ended the sample (not in token_ids).
    logprobs: list[TokenLogprob] | None = None
    # With SamplingParams.prompt_logprobs, in a sample's first event: an entry per prompt token
    # after the first (which has none), each the token's logprob after the tokens before it.
    prompt_logprobs: list[TokenLogprob] | None = None
    # With finish_reason "error" where the request itself is at fault: one line saying why (a
    # structured-output grammar that failed while generating); None for a failed step.
    error: str | None = None
    # vLLM's stop_reason, in a sample's final event: the stop string that ended it, or the id from
    # the request's stop_token_ids; None for EOS (the tokenizer's stop tokens), length, and the rest.
    stop_reason: str | int | None = None


@dataclass
class Output:
    """One sample's whole result (see Engine.generate)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # see Event.stop_reason
    logprobs: list[TokenLogprob] | None = None  # with SamplingParams.logprobs (see Event.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # with SamplingParams.prompt_logprobs


class _Sequence:
    def __init__(self, request: Request, index: int, tokens: list[int]):
        self.request, self.index = request, index
        self.tokens = tokens  # prompt + generated
        self.blocks: list[int] = []
        self.num_computed = 0  # leading tokens whose keys/values are in the blocks
        self.num_named = 0  # leading full blocks whose hashes are known
        self.hashes: list[int] = []
        self.finish_reason: str | None = None
        self.generator = torch.Generator(device=request.device)
        if request.sampling.seed is not None:
            # torch's own wrap (mod 2**64): a negative seed draws as torch.manual_seed(seed) and
            # herd.generate do (mod 2**63 gave seed -1 another stream than herd.generate's)
            self.generator.manual_seed((request.sampling.seed + index) % (1 << 64))
        else:
            self.generator.seed()
        self.text = ""  # decoded so far (when the engine has a tokenizer)
        self.sent_text = 0
        self.sent_tokens = request.prompt_len
        self.decoder = None
        self.closed = False  # its final event has been sent
        self.stopped_on_token = False  # ended by a stop token, which is not kept in `tokens`
        # An entry per sampled token when the request asks for logprobs; kept across preemption.
        self.logprobs: list[TokenLogprob] | None = [] if request.sampling.logprobs is not None else None
        self.sent_logprobs = 0
        self.sent_prompt_logprobs = False
        # With SamplingParams.grammar: this sample's structured-output matcher (structured.py),
        # advanced only where a sampled token is appended (`_after_forward`), so a preempted
        # request's recompute never advances it twice; kept across preemption with the tokens.
        self.matcher = None
        # With penalties: its running token counts (sampling.TokenCounts), made at its first sample.
        self.counts = None
        self.error: str | None = None  # why it ended with "error", when the request is at fault
        self.stop_reason: str | int | None = None  # see Event.stop_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.request.prompt_len

    @property
    def completion_tokens(self) -> int:
        """Tokens the model generated, the stop token that ended the sample included (it was sampled
        and cost a step), as vLLM's and OpenAI's usage count them."""
        return self.num_generated + self.stopped_on_token


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    n: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    listener: Callable[[Event], None] | None
    device: torch.device
    seqs: list[_Sequence] = field(default_factory=list)
    # The ids of stop_ids that a sample they end reports as its stop_reason: the request's own
    # stop_token_ids, less the tokenizer's stop tokens unless ignore_eos — vLLM checks EOS first,
    # and a sample ended by EOS reports None.
    reported_stop_ids: frozenset[int] = frozenset()
    forked: bool = False
    reserved: list[int] = field(default_factory=list)  # blocks set aside for the n-1 forks' copies
    arrival: float = field(default_factory=time.monotonic)
    images: RequestImages | None = None
    # With sampling.prompt_logprobs: the entries for prompt tokens 1.. recorded so far.
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def live(self) -> list[_Sequence]:
        return [s for s in self.seqs if not s.finished]


class RequestImages:
    """A request's images: their tiles until the encoder has run, then the features; where each
    feature goes in the prompt; and a digest per image for the block hashes."""

    def __init__(self, prompt: list[int], images: Sequence[torch.Tensor], image_token_id: int, per_tile: int):
        self.tiles: torch.Tensor | None = torch.cat(list(images))
        self.features: torch.Tensor | None = None  # (n_patch, D), once encoded
        self.patch_pos = [p for p, t in enumerate(prompt) if t == image_token_id]  # feature k goes to patch_pos[k]
        counts = [x.shape[0] * per_tile for x in images]
        if len(self.patch_pos) != sum(counts):
            raise HerdError(f"the prompt has {len(self.patch_pos)} <|patch|> tokens but the images give "
                            f"{sum(counts)} features ({self.tiles.shape[0]} tiles × {per_tile})")
        self.ends = list(itertools.accumulate(counts))  # image j's features end at ends[j]
        # The tiles decide the features exactly (for one model), so they name the image.
        self.digests = [hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
                        for x in images]

    def features_in(self, a: int, b: int) -> tuple[int, int]:
        """[k0, k1): the features whose positions lie in prompt positions [a, b)."""
        return bisect.bisect_left(self.patch_pos, a), bisect.bisect_left(self.patch_pos, b)

    def digests_in(self, a: int, b: int) -> tuple[bytes, ...]:
        """Digests of the images with a feature at a position in [a, b)."""
        k0, k1 = self.features_in(a, b)
        if k0 == k1:
            return ()
        first, last = bisect.bisect_right(self.ends, k0), bisect.bisect_right(self.ends, k1 - 1)
        return tuple(self.digests[first:last + 1])


def _block_hash(parent: int, tokens: Sequence[int], images: tuple[bytes, ...] = ()) -> int:
    if images:  # the <|patch|> ids are the same for every image: its features differ
        return hash((parent, tuple(tokens), images))
    return hash((parent, tuple(tokens)))


# ---- the engine ---------------------------------------------------------------------------------

class Engine:
    """Continuous-batching generation over a paged KV cache. Thread-safe: `submit` and `cancel`
    may be called from any thread while one thread (`start`, or the caller of `step`) runs steps.

    model: a herd Transformer (any weights: fp32, packed, int8/fp8 quantized). tokenizer: needed
    for stop strings and streamed text; without one, events carry token ids only.
    max_batch: most sequences running at once. num_blocks: KV blocks of `block_size` positions
    (default: as many as fit in `kv_cache_bytes`). max_prefill_tokens: prompt tokens computed per
    step (chunked prefill). prefix_sharing: reuse the KV blocks of common prefixes.
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 32, num_blocks: int | None = None,
                 block_size: int = 16, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
                 max_prefill_tokens: int = 512, prefix_sharing: bool = True, max_waiting: int = 4096):
        args = model.args
        if max_batch < 1 or block_size < 1 or max_prefill_tokens < 1:
            raise HerdError("max_batch, block_size and max_prefill_tokens must be positive")
        self.model, self.tokenizer, self.args = model, tokenizer, args
        weight = model.tok_embeddings.weight
        self.device, dtype = weight.device, weight.dtype
        if num_blocks is None:
            per_block = args.kv_cache_bytes_per_token(weight.element_size()) * block_size
            # No more than the whole batch at full context could use.
            num_blocks = max(1, min(kv_cache_bytes // per_block, max_batch * -(-args.max_seq_len // block_size)))
        self.kv = KVPool(args.n_layers, args.kv_heads, args.hd, num_blocks, block_size, dtype, self.device)
        self.blocks = BlockPool(num_blocks)
        self.block_size, self.max_batch = block_size, max_batch
        self.max_prefill_tokens, self.prefix_sharing, self.max_waiting = max_prefill_tokens, prefix_sharing, max_waiting
        self.stop_ids = frozenset(tokenizer.stop_ids) if tokenizer is not None else frozenset()
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order
        self._requests: dict[int, Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "prefix_hit_tokens": 0,
                      "preemptions": 0, "image_encodes": 0}

    # ---- public API ------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], *, max_tokens: int, sampling: SamplingParams = SamplingParams(),
               n: int = 1, stop_strings: Sequence[str] = (), ignore_eos: bool = False,
               listener: Callable[[Event], None] | None = None, images: Sequence[torch.Tensor] = (),
               stop_token_ids: Sequence[int] = ()) -> int:
        """Queue a request; returns its id. `listener` is called (from the engine's thread) with an
        Event for every step that produced something, and once per sample with its finish reason.
        images: for a multimodal Llama 4, each image's preprocessed tiles (its row-major tiles, then
        its thumbnail; herd/models/image_processing.py), in the order of their `<|patch|>` runs in
        the prompt.
        stop_token_ids: vLLM's — more ids that end a sample ("stop"; the id is not in its tokens or
        text, as the tokenizer's stop tokens), even with ignore_eos, which drops only the
        tokenizer's. `sampling.min_tokens` keeps all of them (and stop strings) off until that
        many tokens are out."""
        # int() would truncate a float id (2.7 → 2) into another token: whole numbers only (numpy's too)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not all(is_token_id(t) for t in prompt):
            raise HerdError(f"token ids must be integers, got {next(t for t in prompt if not is_token_id(t))!r}")
        for name, value in (("max_tokens", max_tokens), ("n", n)):
            if not is_token_id(value):
                raise HerdError(f"{name} must be an integer, got {value!r}")
        prompt = [int(t) for t in prompt]
        vocab, context = self.args.vocab_size, self.args.max_seq_len
        if not prompt:
            raise HerdError("empty prompt: give at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise HerdError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
        if len(prompt) >= context:
            raise HerdError(f"prompt of {len(prompt)} tokens does not fit the model's context of {context} "
                            "(at least one position is needed to generate)")
        if max_tokens < 1 or n < 1:
            raise HerdError(f"max_tokens and n must be at least 1, got {max_tokens} and {n}")
        if sampling.min_tokens > max_tokens:  # vLLM's check, before the context clamps max_tokens
            raise HerdError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                            f"got {sampling.min_tokens}")
        stop_token_ids = check_stop_ids(stop_token_ids, "stop_token_ids")
        bad = [t for t in stop_token_ids if not 0 <= t < vocab]
        if bad:  # an id no sample can produce would silently stop nothing
            raise HerdError(f"stop_token_ids: token id {bad[0]} is outside the model's vocabulary of {vocab}")
        if n > self.max_batch:
            raise HerdError(f"n={n} exceeds the engine's batch of {self.max_batch} sequences")
        if stop_strings and self.tokenizer is None:
            raise HerdError("stop strings need a tokenizer")
        if sampling.grammar is not None:
            if self.tokenizer is None:
                raise HerdError("structured outputs (a grammar) need a tokenizer")
            from herd.inference.structured import Matcher

            first = Matcher(sampling.grammar, self.tokenizer, vocab)  # compiled here: a bad grammar is refused now
        bad = [t for t, _ in sampling.logit_bias if t >= vocab]
        if bad:  # refused here, not in a step (where it would end the request with "error")
            raise HerdError(f"logit_bias: token id {bad[0]} is outside the model's vocabulary of {vocab}")
        request_images = self._request_images(prompt, images) if len(images) else None
        max_tokens = min(max_tokens, context - len(prompt))
        bs = self.block_size
        if n > 1 and not self.prefix_sharing:
            # n independent sequences, each with its own copy of the prompt (admission needs all of
            # them at once): checked as the shared case, a request that can never be admitted was
            # accepted and then waited forever at the head of the queue, holding up every other.
            worst = n * (-(-len(prompt) // bs) + -(-max_tokens // bs))
        else:
            worst = -(-len(prompt) // bs) + n * (-(-max_tokens // bs) + 1)
        if worst > self.blocks.num_blocks:
            raise HerdError(f"request may need {worst * bs} KV positions ({len(prompt)} prompt tokens, n={n}, "
                            f"max_tokens={max_tokens}) but the KV cache holds {self.blocks.num_blocks * bs}")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"too many requests queued ({self.max_waiting}); retry later")
            req = Request(next(self._ids), prompt, sampling, max_tokens, n,
                          (frozenset() if ignore_eos else self.stop_ids) | {int(t) for t in stop_token_ids},
                          tuple(s for s in stop_strings if s),
                          listener, self.device, images=request_images,
                          reported_stop_ids=frozenset(int(t) for t in stop_token_ids)
                          - (frozenset() if ignore_eos else self.stop_ids))
            if sampling.prompt_logprobs is not None:
                req.prompt_logprobs = []
            req.seqs.append(self._new_sequence(req, 0, list(prompt)))
            if n > 1 and not self.prefix_sharing:  # n independent sequences, each computing the prompt
                req.seqs += [self._new_sequence(req, i, list(prompt)) for i in range(1, n)]
                req.forked = True
            if sampling.grammar is not None:  # each sample its own matcher (forks copy their parent's)
                for k, s in enumerate(req.seqs):
                    s.matcher = first if k == 0 else first.fork()
            self._requests[req.id] = req
            self._waiting.append(req)
            self._wake.notify()
        return req.id

    def _request_images(self, prompt: list[int], images: Sequence[torch.Tensor]) -> RequestImages:
        vision = getattr(self.args, "vision", None)
        if vision is None or not hasattr(self.model, "image_features"):
            raise HerdError("this model is text-only (no vision encoder): images need a multimodal Llama 4")
        shape = (3, vision.image_size, vision.image_size)
        for x in images:
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != shape or not len(x):
                raise HerdError(f"each image must be its tiles, a tensor of shape (tiles, {', '.join(map(str, shape))})")
        return RequestImages(prompt, images, vision.image_token_id, vision.tokens_per_tile)

    def cancel(self, request_id: int) -> None:
        """Stop a request now: its blocks go back to the pool before this returns."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            for s in req.live:
                self._finish(s, "cancelled")
                s.closed = True
                if req.listener is not None:
                    req.listener(Event(req.id, s.index, [], "", "cancelled", req.prompt_len, s.completion_tokens))
            self._end_unforked(req, "cancelled")
            self._retire(req)

    def _end_unforked(self, req: Request, reason: str) -> None:
        """Before its prompt is computed an n>1 request has one sequence: the samples 1..n-1 that
        never began still get their last event, or a listener counting n of them waits forever."""
        if req.forked or req.listener is None:
            return
        for i in range(len(req.seqs), req.n):
            req.listener(Event(req.id, i, [], "", reason, req.prompt_len, 0))

    def step(self) -> bool:
        """Run one scheduling step; False if there was nothing to do.

        If the step raises (a failing kernel, out of memory, a bug), the requests it was running
        end first with finish_reason "error" and their blocks go back to the pool, then the
        exception propagates; the engine stays usable for every other and later request (as vLLM
        fails only the affected requests rather than the server)."""
        with self._lock:
            try:
                decode, prefill = self._schedule()
            except Exception:
                # Scheduling touches the running requests and the one being admitted: end those
                # (a request that breaks admission would otherwise fail every step, forever).
                self._fail(self._running + list(self._waiting)[:1])
                raise
            if not decode and not prefill:
                return False
            affected = list({id(s.request): s.request for s, _ in decode + prefill}.values())
            try:  # under the same lock as _schedule: a cancel in between would empty a row's blocks
                # A prefill chunk that records prompt logprobs runs alone: its every position's
                # logits (T × vocab floats) are not multiplied by other rows' padding.
                alone = [r for r in prefill if self._wants_all_logits(r[0])]
                prefill = [r for r in prefill if not self._wants_all_logits(r[0])]
                batches = [self._batch(rows) for rows in (decode, prefill, *([r] for r in alone)) if rows]
            except Exception:
                self._fail(affected)
                raise
        try:
            logits = [self._forward(b) for _, b in batches]
            with self._lock:
                for (rows, _), lg in zip(batches, logits, strict=True):
                    self._after_forward(rows, lg)
                self.stats["steps"] += 1
        except Exception:
            with self._lock:
                self._fail(affected)
            raise
        return True

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def start(self) -> Engine:
        """Run steps in a background thread until `shutdown`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, *, cancel: bool = True) -> None:
        """Stop the background thread; with `cancel`, end every request first (blocks freed)."""
        with self._lock:
            if cancel:
                for rid in list(self._requests):
                    self.cancel(rid)
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[Output]]:
        """Submit every prompt, run until all are done; per prompt, its n Outputs. Steps run in
        this thread unless the background thread is running."""
        results: dict[int, list[Output]] = {}
        done = threading.Event()
        pending = [0]

        def listen(ev: Event) -> None:
            out = results[ev.request_id][ev.index]
            out.token_ids += ev.token_ids
            out.text += ev.text
            if ev.logprobs is not None:
                out.logprobs = (out.logprobs or []) + ev.logprobs
            if ev.prompt_logprobs is not None:
                out.prompt_logprobs = ev.prompt_logprobs
            if ev.finish_reason is not None:
                out.finish_reason, out.stop_reason = ev.finish_reason, ev.stop_reason
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        n = kwargs.get("n", 1)
        with self._lock:
            ids = []
            for p in prompts:
                rid = self.submit(p, listener=listen, **kwargs)
                results[rid] = [Output() for _ in range(n)]
                pending[0] += n
                ids.append(rid)
        if self._thread is None:
            try:
                while pending[0] > 0 and self.step():
                    pass
            except BaseException:  # a failed step (or ^C): don't leave this call's other prompts queued
                for rid in ids:
                    self.cancel(rid)
                raise
        else:
            done.wait()
        return [results[i] for i in ids]

    @property
    def blocks_free(self) -> int:
        with self._lock:
            return self.blocks.num_free

    # ---- scheduling ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running) and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # step() already ended the step's requests with "error"
                print("herd engine: a step failed; its requests end with finish_reason 'error', "
                      "the engine goes on", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)

    def _new_sequence(self, req: Request, index: int, tokens: list[int]) -> _Sequence:
        seq = _Sequence(req, index, tokens)
        if self.tokenizer is not None:
            from herd.tokenizer.streaming import IncrementalDecoder

            seq.decoder = IncrementalDecoder(self.tokenizer)
        return seq

    def _num_running(self) -> int:
        return sum(len(r.live) for r in self._running)

    def _prefix_hits(self, seq: _Sequence) -> list[int]:
        """Blocks already holding seq's leading full blocks. The last token is always recomputed:
        its logits are needed to sample."""
        if not self.prefix_sharing or seq.request.prompt_logprobs is not None:
            return []
        bs = self.block_size
        self._name_blocks(seq, (len(seq.tokens) - 1) // bs)
        hits = []
        for h in seq.hashes[:(len(seq.tokens) - 1) // bs]:
            b = self.blocks.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _name_blocks(self, seq: _Sequence, upto: int) -> None:
        bs = self.block_size
        while len(seq.hashes) < upto:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else 0
            images = seq.request.images
            digests = images.digests_in(i * bs, (i + 1) * bs) if images is not None else ()
            seq.hashes.append(_block_hash(parent, seq.tokens[i * bs:(i + 1) * bs], digests))

    def _try_admit(self, req: Request) -> bool:
        seqs = req.live
        fresh = not req.forked and req.n > 1
        if self._num_running() + (req.n if fresh else len(seqs)) > self.max_batch:
            return False
        bs = self.block_size
        plans, need, taken_free = [], 0, set()
        for s in seqs:
            hits = self._prefix_hits(s)
            taken_free |= {b for b in hits if self.blocks.refs[b] == 0}
            plans.append(hits)
            need += -(-len(s.tokens) // bs) - len(hits)
        reserve = (req.n - 1) if fresh and len(req.prompt) % bs else 0
        # Keep one free block per running sequence so that admitting rarely forces a preemption.
        if self.blocks.num_free - len(taken_free) < need + reserve + self._num_running():
            return False
        # Every sequence's hits are retained before any block is allocated: a free hit is only
        # findable while it sits in the pool's free list, where allocating for an earlier sequence
        # would evict it (a preempted n>1 request's samples each find their own generated blocks)
        # and hand it out as fresh while a later sequence still takes it for its computed prefix.
        for hits in plans:
            for b in hits:
                self.blocks.retain(b)
        for s, hits in zip(seqs, plans, strict=True):
            s.blocks = hits + [self.blocks.allocate() for _ in range(-(-len(s.tokens) // bs) - len(hits))]
            s.num_computed = len(hits) * bs
            s.num_named = len(hits)
            self.stats["prefix_hit_tokens"] += s.num_computed
        req.reserved = [self.blocks.allocate() for _ in range(reserve)]
        self._running.append(req)
        return True

    def _schedule(self) -> tuple[list[_Sequence], list[_Sequence]]:
        # Decoding sequences get the block for their next position first, preempting the newest
        # requests (recompute later) when the pool is dry.
        for req in list(self._running):
            for s in req.live:
                if req not in self._running:
                    break
                if len(s.tokens) - s.num_computed == 1 and len(s.tokens) > len(s.blocks) * self.block_size:
                    while self.blocks.num_free == 0:
                        self._preempt(self._running[-1])
                        if req not in self._running:
                            break
                    if req in self._running:
                        s.blocks.append(self.blocks.allocate())
        while self._waiting:
            if self._try_admit(self._waiting[0]):
                self._waiting.popleft()
            elif self._running:
                break
            else:
                # Nothing runs, so nothing will free a block: the head request can never be admitted
                # (a preempted n>1 request whose samples no longer share their prompt's cached blocks
                # may need more than the pool). Ended with "error" rather than waited on forever, with
                # every request behind it stuck and the engine thread spinning.
                stuck = self._waiting[0]
                print(f"herd engine: request {stuck.id} cannot fit in the KV cache ({self.blocks.num_blocks} "
                      "blocks) even with nothing else running; it ends with finish_reason 'error'", file=sys.stderr)
                self._fail([stuck])
        decode, prefill, budget = [], [], self.max_prefill_tokens
        for req in self._running:
            for s in req.live:
                left = len(s.tokens) - s.num_computed
                if left == 1:
                    decode.append((s, 1))
                elif left > 1 and budget > 0:
                    take = min(left, budget)
                    budget -= take
                    prefill.append((s, take))
        return decode, prefill

    def _preempt(self, req: Request) -> None:
        """Give back all of req's blocks and queue it first; its tokens are recomputed on return."""
        self.stats["preemptions"] += 1
        for s in req.live:
            for b in s.blocks:
                self.blocks.release(b)
            s.blocks, s.num_computed, s.num_named = [], 0, 0
        for b in req.reserved:
            self.blocks.release(b)
        req.reserved = []
        self._running.remove(req)
        self._waiting.appendleft(req)

    # ---- running a batch -----------------------------------------------------------------------
    def _batch(self, rows: list[tuple[_Sequence, int]]):
        spec = [(s.blocks, s.tokens[s.num_computed:s.num_computed + n], s.num_computed) for s, n in rows]
        batch = PagedBatch(self.kv, spec, self.device)
        batch.all_logits = any(self._wants_all_logits(s) for s, _ in rows)
        # Rows whose new tokens include image slots: (row, request images, feature range, columns).
        batch.image_rows = []
        for i, (s, n) in enumerate(rows):
            images = s.request.images
            if images is None:
                continue
            a = s.num_computed
            k0, k1 = images.features_in(a, a + n)
            if k0 < k1:
                cols = [batch.T - n + p - a for p in images.patch_pos[k0:k1]]
                batch.image_rows.append((i, images, k0, k1, cols))
        return rows, batch

    @torch.inference_mode()
    def _forward(self, batch: PagedBatch) -> torch.Tensor:
        """(R, V) logits at each row's last new token; (R, T, V), every position, if batch.all_logits."""
        last_only = not batch.all_logits
        if not batch.image_rows:
            logits = self.model(batch.tokens, cache=batch, positions=batch.positions, mask=batch.mask,
                                last_only=last_only)
            return logits[:, -1] if last_only else logits  # each row ends at its last new token
        h = self.model.tok_embeddings(batch.tokens)
        for i, images, k0, k1, cols in batch.image_rows:
            if images.features is None:  # once per request, at its first chunk with an image slot
                images.features = self.model.image_features(images.tiles.to(self.device))
                images.tiles = None
                self.stats["image_encodes"] += 1
            h[i, torch.tensor(cols, device=self.device)] = images.features[k0:k1].to(h.dtype)
        logits = self.model.decode(h, cache=batch, positions=batch.positions, mask=batch.mask, last_only=last_only)
        return logits[:, -1] if last_only else logits

    @staticmethod
    def _wants_all_logits(s: _Sequence) -> bool:
        """Whether s's next chunk holds prompt positions whose logprobs are not yet recorded."""
        req = s.request
        return (req.prompt_logprobs is not None and s.index == 0
                and s.num_computed < req.prompt_len - 1 and len(req.prompt_logprobs) < req.prompt_len - 1)

    def _record_prompt_logprobs(self, s: _Sequence, row: torch.Tensor, n: int) -> None:
        """row (T, V): the logits of a prefill chunk of n tokens from position s.num_computed
        (left-padded to T). Position p predicts prompt token p + 1; positions already recorded
        (before a preemption) are skipped."""
        req = s.request
        k, a, done = req.sampling.prompt_logprobs, s.num_computed, len(req.prompt_logprobs)
        first, last = max(a, done), min(a + n, req.prompt_len - 1)  # positions p in [first, last)
        if first >= last:
            return
        cols = row.shape[0] - n + first - a
        dist = raw_logprobs(row[cols:cols + last - first])  # (m, V)
        targets = torch.tensor(req.prompt[first + 1:last + 1], device=dist.device)
        chosen = dist.gather(1, targets[:, None])[:, 0].tolist()
        if k:
            values, ids = dist.topk(min(k, dist.shape[-1]), dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        else:
            tops = [[] for _ in chosen]
        req.prompt_logprobs += [TokenLogprob(t, lp, top) for t, lp, top in
                                zip(req.prompt[first + 1:last + 1], chosen, tops, strict=True)]

    def _after_forward(self, rows: list[tuple[_Sequence, int]], logits: torch.Tensor) -> None:
        bs = self.block_size
        sample_rows: list[tuple[_Sequence, int]] = []
        if logits.ndim == 3:  # every position's logits (prompt logprobs)
            full, logits = logits, logits[:, -1]
            for i, (s, n) in enumerate(rows):
                if (s.request.prompt_logprobs is not None and s.index == 0 and not s.finished
                        and s.request in self._running):
                    self._record_prompt_logprobs(s, full[i], n)
        for i, (s, n) in enumerate(rows):
            if s.finished or s.request not in self._running:  # cancelled or preempted meanwhile
                continue
            s.num_computed += n
            self.stats["decode_tokens" if n == 1 else "prefill_tokens"] += n
            if self.prefix_sharing:  # name the blocks that are now full and computed
                full = s.num_computed // bs
                self._name_blocks(s, full)
                for j in range(s.num_named, full):
                    self.blocks.register(s.blocks[j], s.hashes[j])
                s.num_named = full
            if s.num_computed == len(s.tokens):
                sample_rows.append((s, i))
        greedy = logits.argmax(dim=-1).tolist() if sample_rows else []
        for s, i in sample_rows:
            req = s.request
            targets = [s]
            if req.n > 1 and not req.forked:  # the prompt is computed: its n samples branch off here
                self._fork(req)
                targets = req.seqs
            sp = req.sampling
            dist = top = None
            if sp.logprobs is not None:  # only rows that ask pay for the log_softmax and top-k
                dist = raw_logprobs(logits[i])
                if sp.logprobs:
                    values, ids = dist.topk(min(sp.logprobs, dist.shape[-1]))
                    top = list(zip(ids.tolist(), values.tolist(), strict=True))
                else:
                    top = []
            for child in targets:
                allowed = None
                if child.matcher is not None:
                    allowed = child.matcher.allowed(logits.shape[-1])[None]
                    if not bool(allowed.any()):  # the grammar failed (a valid token stream never gets here)
                        self._grammar_failed(child)
                        continue
                if child.num_generated < sp.min_tokens and req.stop_ids:
                    # vLLM's MinTokensLogitsProcessor: no stop token (EOS unless ignore_eos, and the
                    # request's stop_token_ids) before min_tokens; masked before bias and penalties,
                    # which cannot bring a -inf back. A grammar that allows nothing else keeps its mask.
                    open_ = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    open_[torch.tensor(sorted(t for t in req.stop_ids if t < len(open_)), dtype=torch.long,
                                       device=logits.device)] = False
                    if allowed is None:
                        allowed = open_[None]
                    elif bool((allowed & open_).any()):
                        allowed = allowed & open_
                if sp.greedy and not sp.suppress and not sp.penalized and allowed is None:
                    token = greedy[i]
                elif sp.penalized:  # the penalties read this sample's own tokens (vLLM: per sequence)
                    # counted incrementally: a recount of prompt and output per step grew with both
                    if child.counts is None:
                        child.counts = TokenCounts(req.prompt)
                    child.counts.sync(child.tokens, logits.shape[-1], logits.device, start=req.prompt_len)
                    token = int(sample(logits[i:i + 1], sp, child.generator, counts=[child.counts],
                                       allowed=allowed)[0])
                else:
                    token = int(sample(logits[i:i + 1], sp, child.generator, allowed=allowed)[0])
                if dist is not None:
                    child.logprobs.append(TokenLogprob(token, float(dist[token]), top))
                if child.matcher is not None and not child.matcher.advance(token):  # once per token, here
                    # llguidance can accept a grammar and fail on it later ("too many expressions
                    # constructed" for a{1000000}): the reply would not follow it, so it is an
                    # error naming the grammar, never a reply that quietly breaks its constraint.
                    self._grammar_failed(child)
                    continue
                self._append(child, token)
                if child.matcher is not None and not child.finished and child.matcher.done:
                    # The grammar has ended and allows nothing more (not even EOS, e.g. with
                    # ignore_eos): the sample stops, as vLLM ends a request whose structured output
                    # is complete.
                    self._finish(child, "stop")
        for req in list(self._running):
            self._flush_events(req)
            if not req.live:
                self._retire(req)

    def _fork(self, req: Request) -> None:
        """The n samples of one request share the prompt's blocks; a partly filled last block is
        copied for each (it is where each writes its own next tokens)."""
        parent = req.seqs[0]
        bs, L = self.block_size, len(parent.tokens)
        for i in range(1, req.n):
            child = self._new_sequence(req, i, list(parent.tokens))
            child.num_computed, child.hashes, child.num_named = L, list(parent.hashes), parent.num_named
            if parent.matcher is not None:  # the same place in the grammar, then its own way
                child.matcher = parent.matcher.fork()
            # In req.seqs before it holds a block, each block in child.blocks as soon as it is
            # held: if this raises midway, ending the request (`_fail`) frees exactly what was taken.
            req.seqs.append(child)
            for b in parent.blocks if L % bs == 0 else parent.blocks[:-1]:
                self.blocks.retain(b)
                child.blocks.append(b)
            if L % bs:
                self.kv.copy_block(parent.blocks[-1], req.reserved[-1], L % bs)
                child.blocks.append(req.reserved.pop())
        req.forked = True

    def _append(self, s: _Sequence, token: int) -> None:
        req = s.request
        if token in req.stop_ids:
            s.stopped_on_token = True
            s.stop_reason = token if token in req.reported_stop_ids else None
            self._finish(s, "stop")
            return
        s.tokens.append(token)
        if s.decoder is not None:
            before = len(s.text)
            s.text += s.decoder.push(token)
            # vLLM: stop strings are looked for once more than min_tokens tokens are out
            if req.stop_strings and s.num_generated > req.sampling.min_tokens and self._cut_at_stop(s, before):
                return
        if s.num_generated >= req.max_tokens or len(s.tokens) >= self.args.max_seq_len:
            self._finish(s, "length")

    def _cut_at_stop(self, s: _Sequence, before: int) -> bool:
        longest = max(len(x) for x in s.request.stop_strings)
        start = max(0, before - longest + 1)
        found = [(i, k) for k, i in enumerate(s.text.find(x, start) for x in s.request.stop_strings) if i >= 0]
        if not found:
            return False
        # The earliest match in the text ends it (list order breaks a tie) and is its stop_reason.
        cut, k = min(found)
        s.text = s.text[:cut]
        s.stop_reason = s.request.stop_strings[k]
        self._finish(s, "stop", flush=False)
        return True

    def _grammar_failed(self, s: _Sequence) -> None:
        why = (s.matcher.error or "it allows no token here").strip().splitlines()[0][:200]
        s.error = f"the structured-output grammar failed while generating: {why}"
        self._finish(s, "error")

    def _finish(self, s: _Sequence, reason: str, *, flush: bool = True) -> None:
        """End a sample and free its blocks now; its last event goes out with the step's events."""
        if s.decoder is not None and flush and reason != "cancelled":
            s.text += s.decoder.flush()
        s.finish_reason = reason
        for b in s.blocks:
            self.blocks.release(b)
        s.blocks = []

    def _held_back(self, s: _Sequence) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        if s.finished or not s.request.stop_strings:
            return 0
        tail = s.text[s.sent_text:]
        for k in range(min(len(tail), max(map(len, s.request.stop_strings)) - 1), 0, -1):
            if any(x.startswith(tail[-k:]) for x in s.request.stop_strings):
                return k
        return 0

    def _flush_events(self, req: Request) -> None:
        for s in req.seqs:
            if s.closed:
                continue
            end = len(s.text) - self._held_back(s)
            ids = s.tokens[s.sent_tokens:]
            text = s.text[s.sent_text:end] if end > s.sent_text else ""
            lps = s.logprobs[s.sent_logprobs:] if s.logprobs is not None else None
            if not ids and not text and not lps and not s.finished:
                continue
            s.sent_tokens += len(ids)
            s.sent_logprobs += len(lps or ())
            prompt_lps = None
            if req.prompt_logprobs is not None and not s.sent_prompt_logprobs:
                prompt_lps, s.sent_prompt_logprobs = req.prompt_logprobs, True
            s.sent_text = max(s.sent_text, end)
            s.closed = s.finished  # the final event is sent once
            if req.listener is not None:
                req.listener(Event(req.id, s.index, ids, text, s.finish_reason, req.prompt_len, s.completion_tokens,
                                   logprobs=lps, prompt_logprobs=prompt_lps,
                                   error=s.error if s.finished else None,
                                   stop_reason=s.stop_reason if s.finished else None))

    def _fail(self, reqs: Sequence[Request]) -> None:
        """End requests hit by a failed step: every sample not yet closed gets a last event with
        finish_reason "error" (whatever tokens it has not streamed are dropped: the step that made
        them did not complete), and all their blocks go back to the pool."""
        for req in reqs:
            if self._requests.get(req.id) is not req:  # cancelled or finished meanwhile
                continue
            for s in req.seqs:
                if s.closed:
                    continue
                if not s.finished:
                    self._finish(s, "error", flush=False)
                s.finish_reason, s.closed = "error", True
                if req.listener is not None:
                    try:
                        req.listener(Event(req.id, s.index, [], "", "error", req.prompt_len, s.completion_tokens))
                    except Exception:  # a broken listener must not keep the others from hearing
                        traceback.print_exc(file=sys.stderr)
            try:
                self._end_unforked(req, "error")
            except Exception:
                traceback.print_exc(file=sys.stderr)
            self._retire(req)

    def _retire(self, req: Request) -> None:
        for b in req.reserved:
            self.blocks.release(b)
        req.reserved = []
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self._requests.pop(req.id, None)
