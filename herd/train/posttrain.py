"""Post-training (SPEC §4): SFT, reward modelling and DPO as `Objective`s of the one training loop
(DESIGN principle 7), their data formats, and the reward model.

Data formats (one JSON object per line; a malformed line is an error naming its line number):
- chat JSONL: {"messages": [OpenAI-shaped messages]} with at least one assistant turn (SFT).
- preference JSONL: {"prompt", "chosen", "rejected", optional "edited"} in TRL's conversational
  shape — `prompt` a list of messages, each response a list holding one assistant message — or
  plain strings (a string prompt is one user turn).
- prompt JSONL: {"prompt": str | messages, optional "answer"} (rejection sampling, eval).

Every example goes through the model's own chat format. The tokens of an assistant turn are found
by encoding the dialog up to the turn with the generation prompt (which ends with the assistant
header) and the dialog through the turn: the turn is the difference. Its first stop token (eot /
im_end) ends the content; what follows (a template's trailing newline) is never a target.
- SFT trains on content + stop token (§4.1.3: loss on target tokens only, prompt masked).
- DPO and the reward model read content tokens only: header and end-of-turn tokens are masked out
  of the chosen and rejected log-probabilities (§4.1.4), and special tokens inside a turn too.

Rows: SFT packs several dialogs in one row with document-masked attention. Reward-model and DPO
rows hold one prompt followed by all of its responses; each response attends to the prompt and to
itself only and continues the prompt's RoPE positions, so the prompt is computed once for all of
them (§4.1.2: "several responses of one prompt packed in one row").
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.train import checkpoint as ckpt
from herd.train.loop import Trainer, check_run_dir_usable
from herd.train.objectives import IGNORE, document_mask, document_positions

Messages = list[dict[str, Any]]


# ---- JSONL ---------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error
    naming the file and line."""
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark (Windows editors, Excel exports) was "invalid JSON" on line 1.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise HerdError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: cannot read ({e})") from None
    rows = []
    # JSON Lines ends lines with "\n" only: str.splitlines() also split at U+2028, U+0085, \x1c..., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings, so such a line was "invalid JSON".
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HerdError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise HerdError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise HerdError(f"{path}: no examples (empty file)")
    return rows


def _where(path, n) -> str:
    return f"{path}:{n}"


def as_messages(prompt: Any, where: str) -> Messages:
    """A prompt as messages: a string is one user turn; a list must be OpenAI-shaped messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt) and prompt:
        return _valid_dialog([dict(m) for m in prompt], where)
    raise HerdError(f"{where}: prompt must be a string or a non-empty list of messages with a 'role'")


def _valid_dialog(messages: Messages, where: str) -> Messages:
    """The chat format's own checks (roles, content), here with the file and line they came from
    rather than at encoding time as "message 0: ..."."""
    from herd.tokenizer.chat import validate_messages

    try:
        return validate_messages(messages)
    except HerdError as e:
        raise HerdError(f"{where}: {e}") from None


def as_response(resp: Any, where: str, key: str) -> str:
    """A response as text: a string, one assistant message, or TRL's list of one assistant message."""
    if isinstance(resp, list) and len(resp) == 1:
        resp = resp[0]
    if isinstance(resp, dict):
        if resp.get("role", "assistant") != "assistant":
            raise HerdError(f"{where}: '{key}' must be an assistant message, got role {resp.get('role')!r}")
        resp = resp.get("content")
    if not isinstance(resp, str):
        raise HerdError(f"{where}: '{key}' must be a string or a list holding one assistant message")
    return resp


def load_chats(path) -> list[tuple[str, Messages]]:
    out = []
    for n, obj in read_jsonl(path):
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HerdError(f"{_where(path, n)}: expected {{\"messages\": [...]}} with a non-empty list")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise HerdError(f"{_where(path, n)}: the chat has no assistant turn (nothing to train on)")
        out.append((_where(path, n), _valid_dialog(msgs, _where(path, n))))
    return out


@dataclass
class Preference:
    where: str
    prompt: Messages
    responses: list[str]  # best first: [edited,] chosen, rejected (§4.1.2 ranking)


def load_preferences(path, log: Callable[[str], None] | None = None) -> list[Preference]:
    out, ties = [], []
    for n, obj in read_jsonl(path):
        where = _where(path, n)
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise HerdError(f"{where}: missing '{key}' (preference lines need prompt, chosen, rejected)")
        ranked = [as_response(obj["edited"], where, "edited")] if obj.get("edited") is not None else []
        ranked += [as_response(obj["chosen"], where, "chosen"), as_response(obj["rejected"], where, "rejected")]
        if len(ranked) == 3 and ranked[0] == ranked[1]:
            ranked = ranked[1:]  # an edit that changed nothing (§4.2.1): the chosen response itself
        if len(set(ranked)) < len(ranked):
            # A tie holds no preference: the DPO and ranking losses sit at log 2 with a zero
            # gradient on it (DPO's NLL term alone would train). Real preference sets have some
            # (UltraFeedback's binarized ties): skipped and said, as one refused line would
            # refuse the whole file.
            ties.append(where)
            continue
        out.append(Preference(where, as_messages(obj["prompt"], where), ranked))
    if ties:
        said = f"{len(ties)} preference line(s) whose responses are the same text ({ties[0]}" + \
            (", ...)" if len(ties) > 1 else ")")
        if not out:
            raise HerdError(f"{path}: no preference to learn: all {said}")
        (log or (lambda m: print(m, file=sys.stderr)))(f"{path}: skipped {said}: a tie holds no preference")
    return out


def load_prompts(path) -> list[tuple[str, Messages, dict]]:
    """(where, prompt messages, the whole record) per line — records may carry an `answer`."""
    out = []
    for n, obj in read_jsonl(path):
        where = _where(path, n)
        if "prompt" not in obj and "messages" not in obj:
            raise HerdError(f"{where}: expected a 'prompt' (string or messages)")
        out.append((where, as_messages(obj.get("prompt", obj.get("messages")), where), obj))
    return out


# ---- encoding through the chat format ------------------------------------------------------------
def _chat(tokenizer):
    if tokenizer is None or tokenizer.chat is None:
        raise HerdError("post-training needs a tokenizer with a chat format (this model has none)")
    return tokenizer.chat


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "special_tokens", {}).values()) | set(tokenizer.stop_ids)


def split_turn(tokenizer, prefix: list[int], full: list[int], where: str) -> tuple[list[int], int]:
    """The assistant turn `full[len(prefix):]` cut at its first stop token → (turn ids through the
    stop token, number of content tokens before it)."""
    if full[:len(prefix)] != prefix:
        raise HerdError(f"{where}: the chat format does not encode the dialog as prompt + reply "
                        "(the prompt's tokens are not a prefix of the whole dialog's)")
    turn = full[len(prefix):]
    stop = next((i for i, t in enumerate(turn) if t in tokenizer.stop_ids), None)
    if stop is None:
        raise HerdError(f"{where}: the chat format wrote no end-of-turn token after the reply")
    return turn[:stop + 1], stop


# The most header tokens a reply's first characters can merge with (a header ending in "\n" and a
# reply starting with "\n" are one "\n\n" token in the whole dialog): one or two in practice.
_SEAM_TOKENS = 2


def _merged_seam(tokenizer, head: list[int], ids: list[int], at: int) -> int | None:
    """Where the reply begins in `ids` when the ids the template writes before it, `head` (ending
    with the assistant header), stand at `ids[at:]` but their last token(s) merged with the reply's
    first characters into one token. That token holds reply characters, so it is the reply's (as
    transformers' `return_assistant_tokens_mask` counts a token by the characters it holds). None
    when `head` does not stand there."""
    special = _special_ids(tokenizer)
    n = len(head)
    for r in range(1, min(n, _SEAM_TOKENS) + 1):
        s = at + n - r
        if s >= len(ids) or ids[at:s] != head[:n - r] or (set(head[n - r:]) | {ids[s]}) & special:
            continue
        tail, merged = tokenizer.decode_bytes(head[n - r:]), tokenizer.decode_bytes([ids[s]])
        if len(merged) > len(tail) and merged.startswith(tail):
            return s
    return None


def _reply_start(tokenizer, head: list[int], ids: list[int], at: int) -> int | None:
    """Where the reply begins in `ids` when `head` (the template's ids before the reply, ending with
    the assistant header) stands at `ids[at:]`, exactly or merged at the seam; else None."""
    if ids[at:at + len(head)] == head:
        return at + len(head)
    return _merged_seam(tokenizer, head, ids, at)


def _reply_end(tokenizer, ids: list[int], start: int, where: str) -> int:
    """Index of the reply's end-of-turn token: the first stop token from `start` (message text that
    spells one is encoded as text, so the first one is the template's)."""
    stop = next((i for i in range(start, len(ids)) if ids[i] in tokenizer.stop_ids), None)
    if stop is None:
        raise HerdError(f"{where}: the chat format wrote no end-of-turn token after the reply")
    return stop


def encode_prompt_response(tokenizer, prompt: Messages, response: str, where: str = "example"
                           ) -> tuple[list[int], list[int], list[bool]]:
    """→ (prompt ids ending with the assistant header, reply ids through the stop token, a mask
    that is True on the reply's content tokens: not the stop token, not special tokens; §4.1.4).

    prompt + reply are the whole dialog's ids, except where the reply's first characters merge with
    the header's last token (a reply starting with "\n" after a header ending in "\n"): all the
    responses of a prompt share its ids in a row, so the prompt stays the generation prompt (what
    the model sees when it generates) and the reply is its text after the header encoded on its
    own, as TRL's DPO/reward trainers encode prompt and completion apart."""
    chat = _chat(tokenizer)
    prefix = chat.encode_dialog(prompt, add_generation_prompt=True)
    full = chat.encode_dialog(prompt + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if full[:len(prefix)] == prefix:
        turn, n_content = split_turn(tokenizer, prefix, full, where)
    else:
        start = _merged_seam(tokenizer, prefix, full, 0)
        if start is None:
            raise HerdError(f"{where}: the chat format does not encode the dialog as prompt + reply "
                            "(the prompt's tokens are not a prefix of the whole dialog's)")
        stop = _reply_end(tokenizer, full, start, where)
        # The merged text, less the header's part of it, up to the next special token (special tokens
        # never merge with text, so what follows keeps its ids); spelled control tokens in it were
        # encoded as text, and stay text here (allow_special=False).
        special = _special_ids(tokenizer)
        end = next(i for i in range(start, stop + 1) if full[i] in special)
        header_tail = tokenizer.decode_bytes(prefix[start:])
        text = tokenizer.decode_bytes(full[start:end])[len(header_tail):].decode("utf-8")
        head = tokenizer.encode(text, allow_special=False) if text else []
        turn = head + full[end:stop + 1]
        n_content = len(turn) - 1
    special = _special_ids(tokenizer)
    content = [i < n_content and t not in special for i, t in enumerate(turn)]
    return prefix, turn, content


def encode_chat(tokenizer, messages: Messages, where: str = "example") -> tuple[list[int], list[bool]]:
    """A whole dialog → (ids, is_target) with targets on every assistant turn's content and stop
    token (the tokens the model should produce); system/user turns and headers are not targets.
    The ids are the chat format's for the whole dialog (transformers' `apply_chat_template`)."""
    chat = _chat(tokenizer)
    if not any(m.get("role") == "assistant" for m in messages):
        raise HerdError(f"{where}: the chat has no assistant turn (nothing to train on)")
    full = chat.encode_dialog(messages, add_generation_prompt=False)
    target = [False] * len(full)
    for j, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        upto = chat.encode_dialog(messages[:j + 1], add_generation_prompt=False)
        if full[:len(upto)] != upto:
            raise HerdError(f"{where}: the chat format does not encode this dialog turn by turn")
        # The dialog before the turn, with the generation prompt: the turn's reply follows it.
        head = chat.encode_dialog(messages[:j], add_generation_prompt=True)
        start = _reply_start(tokenizer, head, upto, 0)
        if start is None and j == 0:
            # A dialog that opens with the assistant: a template may write a preamble only once the
            # dialog has a message (SmolLM2's default system prompt), so the empty dialog's generation
            # prompt is not where the reply's prefix starts. The reply follows the last generation
            # header before its end-of-turn token (reply text never holds the header's control tokens).
            last_stop = max((i for i, t in enumerate(upto) if t in tokenizer.stop_ids), default=-1)
            start = next((s for at in range(last_stop, 0, -1)
                          if (s := _reply_start(tokenizer, head, upto, at)) is not None and s <= last_stop), None)
        if start is None:
            raise HerdError(f"{where}: the chat format does not encode the dialog as prompt + reply "
                            f"(the tokens before assistant turn {j} are not those of its prompt)")
        stop = _reply_end(tokenizer, upto, start, where)
        for i in range(start, stop + 1):
            target[i] = True
    return full, target


# ---- batches and the loader ----------------------------------------------------------------------
@dataclass
class SFTBatch:
    """Packed dialogs: inputs (B, T), targets (B, T) = next token or IGNORE, doc_ids (B, T)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor

    def to(self, device) -> SFTBatch:
        return SFTBatch(self.inputs.to(device), self.targets.to(device), self.doc_ids.to(device))


@dataclass
class RankedBatch:
    """Rows of one prompt followed by its ranked responses (best first), for the reward model and DPO.

    inputs (B, T), positions (B, T), mask (B, 1, T, T). Response s ∈ [0, S): example `seg_example[s]`,
    rank `seg_rank[s]` (0 = best), its last token at (seg_row[s], seg_last[s]). Log-prob terms
    n ∈ [0, N): token `lp_token[n]` predicted at (lp_row[n], lp_pos[n]), belonging to response
    `lp_seg[n]`, counted when `lp_content[n]` (content tokens only, §4.1.4)."""

    inputs: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    seg_row: torch.Tensor
    seg_last: torch.Tensor
    seg_example: torch.Tensor
    seg_rank: torch.Tensor
    lp_row: torch.Tensor
    lp_pos: torch.Tensor
    lp_token: torch.Tensor
    lp_seg: torch.Tensor
    lp_content: torch.Tensor

    def to(self, device) -> RankedBatch:
        return RankedBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    @property
    def num_segments(self) -> int:
        return int(self.seg_row.numel())


@dataclass
class EncodedRanked:
    """One prompt and its ranked responses as ids."""

    index: int
    prompt: list[int]
    responses: list[list[int]]
    content: list[list[bool]]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def encode_preferences(tokenizer, prefs: Sequence[Preference], max_len: int, start: int = 0
                       ) -> list[EncodedRanked]:
    """Encode each preference example; example indices count from `start` (keys of DPO's cache)."""
    out = []
    for i, p in enumerate(prefs, start):
        prompt, responses, content = None, [], []
        for r in p.responses:
            prompt, turn, mask = encode_prompt_response(tokenizer, p.prompt, r, p.where)
            responses.append(turn)
            content.append(mask)
        ex = EncodedRanked(i, prompt, responses, content)
        if len(ex) > max_len:
            raise HerdError(f"{p.where}: prompt and responses take {len(ex)} tokens, more than the context of "
                            f"{max_len} (train.seq_len); shorten the example or raise train.seq_len")
        out.append(ex)
    return out


def collate_ranked(examples: Sequence[EncodedRanked], pad_id: int = 0) -> RankedBatch:
    """Rows of prompt + responses with prompt-sharing attention (see the module docstring)."""
    B, T = len(examples), max(len(e) for e in examples)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    seg: dict[str, list[int]] = {k: [] for k in ("row", "last", "example", "rank")}
    lp: dict[str, list[int]] = {k: [] for k in ("row", "pos", "token", "seg", "content")}
    for b, e in enumerate(examples):
        p = len(e.prompt)
        inputs[b, :p] = torch.tensor(e.prompt)
        positions[b, :p] = torch.arange(p)
        mask[b, 0, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        start = p
        for rank, (resp, content) in enumerate(zip(e.responses, e.content, strict=True)):
            n, end = len(resp), start + len(resp)
            inputs[b, start:end] = torch.tensor(resp)
            positions[b, start:end] = torch.arange(p, p + n)
            mask[b, 0, start:end, :p] = True
            mask[b, 0, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
            s = len(seg["row"])
            seg["row"].append(b), seg["last"].append(end - 1), seg["example"].append(e.index), seg["rank"].append(rank)
            # token j of the response is predicted at the previous position: the prompt's last
            # token for j = 0 (shared by all responses), else the response's own token j - 1.
            for j in range(n):
                lp["row"].append(b), lp["pos"].append(p - 1 if j == 0 else start + j - 1)
                lp["token"].append(resp[j]), lp["seg"].append(s), lp["content"].append(int(content[j]))
            start = end
        for t in range(start, T):  # padding sees itself only (a query with no key would give NaN)
            mask[b, 0, t, t] = True
    L = torch.long
    return RankedBatch(inputs, positions, mask,
                       torch.tensor(seg["row"], dtype=L), torch.tensor(seg["last"], dtype=L),
                       torch.tensor(seg["example"], dtype=L), torch.tensor(seg["rank"], dtype=L),
                       torch.tensor(lp["row"], dtype=L), torch.tensor(lp["pos"], dtype=L),
                       torch.tensor(lp["token"], dtype=L), torch.tensor(lp["seg"], dtype=L),
                       torch.tensor(lp["content"], dtype=torch.bool))


def pack_chats(encoded: Sequence[tuple[list[int], list[bool]]], seq_len: int) -> list[list[int]]:
    """Greedy first-fit packing of dialogs (indices) into rows of at most seq_len tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, (ids, _) in enumerate(encoded):
        for r, left in enumerate(room):
            if len(ids) <= left:
                rows[r].append(i)
                room[r] -= len(ids)
                break
        else:
            rows.append([i])
            room.append(seq_len - len(ids))
    return rows


def collate_sft(encoded: Sequence[tuple[list[int], list[bool]]], rows: Sequence[Sequence[int]],
                pad_id: int = 0) -> SFTBatch:
    lengths = [sum(len(encoded[i][0]) for i in row) for row in rows]
    B, T = len(rows), max(lengths)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ids, is_target = encoded[i]
            n = len(ids)
            inputs[b, at:at + n] = torch.tensor(ids)
            doc_ids[b, at:at + n] = d
            # targets[t] is the token at t + 1 when that token is an assistant target
            nxt = torch.tensor(ids[1:])
            keep = torch.tensor(is_target[1:], dtype=torch.bool)
            targets[b, at:at + n - 1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
            at += n
        if at < T:  # padding: each pad token is its own document, attending only itself
            doc_ids[b, at:] = torch.arange(len(row), len(row) + T - at)
    return SFTBatch(inputs, targets, doc_ids)


class ExampleLoader:
    """Batches of in-memory examples in a seeded order that changes every epoch; resumable (its
    state is the (epoch, position) pair) and offers what the loop and `evaluate` use of a loader."""

    def __init__(self, items: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], *,
                 seq_len: int, seed: int = 0, shuffle: bool = True):
        if not items:
            raise HerdError("no training examples")
        self.items, self.collate, self.seed, self.shuffle = list(items), collate, seed, shuffle
        self.batch_size, self.seq_len = batch_size, seq_len
        self.epoch, self.pos = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.items) // self.batch_size))

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, i: int) -> Any:
        """Batch i of the unshuffled order (a fixed set, for evaluation)."""
        return self.collate(self.items[i * self.batch_size:(i + 1) * self.batch_size])

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        if self.pos >= len(self.items):
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order(self.epoch)
        idx = order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return self.collate([self.items[i] for i in idx])

    def set_shape(self, batch_size: int, seq_len: int) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.batch_size = int(state["epoch"]), int(state["pos"]), int(state["batch_size"])


def sft_loader(tokenizer, chats: Sequence[tuple[str, Messages]], *, batch_size: int, seq_len: int,
               seed: int = 0, shuffle: bool = True) -> ExampleLoader:
    """Encode and pack dialogs into rows of ≤ seq_len tokens; each loader item is one packed row."""
    encoded = []
    for where, msgs in chats:
        ids, target = encode_chat(tokenizer, msgs, where)
        if len(ids) > seq_len:
            raise HerdError(f"{where}: the dialog takes {len(ids)} tokens, more than the context of {seq_len} "
                            "(train.seq_len); shorten it or raise train.seq_len")
        encoded.append((ids, target))
    rows = pack_chats(encoded, seq_len)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return ExampleLoader(rows, batch_size, lambda rs: collate_sft(encoded, rs, pad), seq_len=seq_len,
                         seed=seed, shuffle=shuffle)


def ranked_loader(tokenizer, prefs: Sequence[Preference], *, batch_size: int, seq_len: int, seed: int = 0,
                  shuffle: bool = True, start: int = 0) -> ExampleLoader:
    encoded = encode_preferences(tokenizer, prefs, seq_len, start)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return ExampleLoader(encoded, batch_size, lambda es: collate_ranked(es, pad), seq_len=seq_len, seed=seed,
                         shuffle=shuffle)


# ---- log-probabilities and rewards ---------------------------------------------------------------
def response_logps(model: nn.Module, batch: RankedBatch, *, with_nll: bool = False):
    """Per response: summed log-prob of its content tokens (S,), and with `with_nll` also the summed
    NLL and the count of content tokens (for the DPO NLL term)."""
    logits = model(batch.inputs, positions=batch.positions, mask=batch.mask)  # (B, T, V)
    picked = logits[batch.lp_row, batch.lp_pos].float()  # (N, V): only the positions that predict replies
    token_lp = torch.log_softmax(picked, dim=-1).gather(-1, batch.lp_token[:, None])[:, 0]
    token_lp = token_lp * batch.lp_content
    S = batch.num_segments
    sums = torch.zeros(S, dtype=token_lp.dtype, device=token_lp.device).index_add(0, batch.lp_seg, token_lp)
    if not with_nll:
        return sums
    counts = torch.zeros(S, device=token_lp.device).index_add(0, batch.lp_seg, batch.lp_content.float())
    return sums, counts


def ranked_pairs(batch: RankedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, worse) response indices for every pair a ranking implies within one example:
    edited > chosen > rejected gives (e, c), (e, r), (c, r) — §4.1.2."""
    ex, rank = batch.seg_example, batch.seg_rank
    same = ex[:, None] == ex[None, :]
    better = rank[:, None] < rank[None, :]
    i, j = torch.nonzero(same & better, as_tuple=True)
    return i, j


# ---- objectives ----------------------------------------------------------------------------------
class SFT:
    """Cross-entropy on assistant tokens only (§4.1.3), dialogs packed with document masking."""

    def num_terms(self, batch: SFTBatch) -> int:
        return int((batch.targets != IGNORE).sum())

    def loss_sum(self, model: nn.Module, batch: SFTBatch) -> torch.Tensor:
        ids = batch.doc_ids
        logits = model(batch.inputs, positions=document_positions(ids), mask=document_mask(ids))
        keep = batch.targets != IGNORE  # only score assistant positions: skip the vocab softmax elsewhere
        return F.cross_entropy(logits[keep].float(), batch.targets[keep], reduction="sum")


class RewardRanking:
    """Pairwise ranking loss without a margin term, −log σ(r_better − r_worse), summed over every
    pair the ranking implies (§4.1.2). `model` is a `RewardModel`."""

    def num_terms(self, batch: RankedBatch) -> int:
        return int(ranked_pairs(batch)[0].numel())

    def loss_sum(self, model: nn.Module, batch: RankedBatch) -> torch.Tensor:
        r = model.rewards(batch)
        i, j = ranked_pairs(batch)
        return -F.logsigmoid(r[i] - r[j]).sum()


NLL_NORMS = ("tokens", "response", "sum")


def check_dpo_values(beta: Any, nll: Any, nll_norm: Any) -> None:
    """Refuse (HerdError, one line) DPO settings that train something other than DPO: β <= 0 flips or
    zeroes the preference term (and β = NaN made every step's loss NaN, so each was skipped and the
    untrained model exported); a negative NLL weight pushes the chosen replies down."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (number(beta) and beta > 0):
        raise HerdError(f"dpo.beta must be a finite number > 0, got {beta!r}")
    if not (number(nll) and nll >= 0):
        raise HerdError(f"dpo.nll must be a finite number >= 0 (0 = plain DPO), got {nll!r}")
    if nll_norm not in NLL_NORMS:
        raise HerdError(f"dpo.nll_norm must be one of {', '.join(NLL_NORMS)} (got {nll_norm!r})")


@dataclass
class DPO:
    """Direct preference optimization (§4.1.4): −log σ(β[(π_c − ref_c) − (π_r − ref_r)]) with β = 0.1,
    the log-probs summed over each response's content tokens (format tokens masked, §4.1.4), plus
    `nll` × an NLL term on the chosen responses (coefficient 0.2). Reference log-probs are computed
    once (`cache_reference`) and looked up by example index, so the reference model need not stay in
    memory.

    The NLL term is the one the paper cites, RPO (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", eq. 1: the chosen sequence's NLL divided by its length), as TRL computes it for
    `rpo_alpha` (DPOTrainer.concatenated_forward: `nll_loss = F.cross_entropy(chosen logits, chosen
    labels)`, one mean over every chosen completion token of the batch, added to each pair's loss
    before the mean over pairs). `nll_norm` picks the normalization:
      "tokens"   (default) TRL's: mean NLL over all chosen tokens of the (micro-)batch;
      "response" Pang et al.'s: each chosen response's NLL over its own length, mean over pairs
                 (equal to "tokens" when the chosen responses are equally long);
      "sum"      each chosen response's summed NLL (not per token): the scale of the log-ratio sums
                 in the DPO term, so it is ~length × stronger than the per-token forms.
    Either per-token form is a weak anchor next to β·Σ log-ratios: per token of a chosen response,
    DPO pushes with β·σ(−βΔ) ≤ 0.05 (β = 0.1), the NLL with 0.2 / length."""

    beta: float = 0.1
    nll: float = 0.2
    nll_norm: str = "tokens"
    reference: dict[int, tuple[float, float]] = field(default_factory=dict)  # example → (ref_c, ref_r)

    def __post_init__(self):
        check_dpo_values(self.beta, self.nll, self.nll_norm)

    def cache_reference(self, ref_model: nn.Module, loader: ExampleLoader, policy_vocab: int | None = None
                        ) -> None:
        """Reference log-probs for every example of `loader` (its fixed order), stored by index."""
        vocab = ref_model.args.vocab_size
        if policy_vocab is not None and vocab != policy_vocab:
            raise HerdError(f"the reference model's vocabulary ({vocab}) differs from the policy's ({policy_vocab}); "
                            "DPO needs the same tokenizer for both")
        was = ref_model.training
        ref_model.eval()
        with torch.no_grad():
            for i in range(loader.batches_per_epoch):
                b = loader.batch(i).to(ref_model.tok_embeddings.weight.device)
                lp = response_logps(ref_model, b).cpu()
                for ex in b.seg_example.unique().tolist():
                    sel = (b.seg_example == ex).cpu()
                    ranks = b.seg_rank.cpu()[sel]
                    vals = lp[sel]
                    # the chosen/rejected are the last two ranks (an edited response ranks above both)
                    order = ranks.argsort()
                    self.reference[ex] = (float(vals[order[-2]]), float(vals[order[-1]]))
        ref_model.train(was)

    def _chosen_rejected(self, batch: RankedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment indices of each example's chosen and rejected responses, and the example ids."""
        ex, rank = batch.seg_example, batch.seg_rank
        examples = ex.unique()
        chosen, rejected = [], []
        for e in examples.tolist():
            idx = torch.nonzero(ex == e)[:, 0]
            idx = idx[rank[idx].argsort()]
            chosen.append(idx[-2]), rejected.append(idx[-1])
        return torch.stack(chosen), torch.stack(rejected), examples

    def num_terms(self, batch: RankedBatch) -> int:
        return int(batch.seg_example.unique().numel())

    def terms(self, model: nn.Module, batch: RankedBatch) -> dict[str, torch.Tensor]:
        """Per pair: policy and reference log-probs, the DPO loss, and the chosen response's summed
        NLL and content-token count (for the NLL term)."""
        lp, counts = response_logps(model, batch, with_nll=True)
        c, r, examples = self._chosen_rejected(batch)
        missing = [e for e in examples.tolist() if e not in self.reference]
        if missing:
            raise HerdError(f"no cached reference log-probs for example {missing[0]}; call cache_reference first")
        ref = torch.tensor([self.reference[e] for e in examples.tolist()], dtype=lp.dtype, device=lp.device)
        logits = (lp[c] - ref[:, 0]) - (lp[r] - ref[:, 1])
        dpo = -F.logsigmoid(self.beta * logits)
        return {"policy_chosen": lp[c], "policy_rejected": lp[r], "ref_chosen": ref[:, 0],
                "ref_rejected": ref[:, 1], "dpo": dpo, "nll_sum": -lp[c], "chosen_tokens": counts[c]}

    def nll_per_pair(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The NLL term each pair carries (its mean over pairs is what is added to the mean DPO loss)."""
        if self.nll_norm == "tokens":  # TRL: one mean over the batch's chosen tokens, for every pair
            mean = t["nll_sum"].sum() / t["chosen_tokens"].sum().clamp(min=1)
            return mean.expand_as(t["nll_sum"])
        if self.nll_norm == "response":
            return t["nll_sum"] / t["chosen_tokens"].clamp(min=1)
        return t["nll_sum"]

    def loss_sum(self, model: nn.Module, batch: RankedBatch) -> torch.Tensor:
        t = self.terms(model, batch)
        if torch.is_grad_enabled():  # a training step's pairs (evaluation runs without gradients)
            self._note(t)
        if self.nll == 0:
            return t["dpo"].sum()
        return (t["dpo"] + self.nll * self.nll_per_pair(t)).sum()

    def _note(self, t: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            chosen = self.beta * (t["policy_chosen"] - t["ref_chosen"])
            rejected = self.beta * (t["policy_rejected"] - t["ref_rejected"])
            sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum(), (chosen - rejected).sum()])
        self._sums = sums if getattr(self, "_sums", None) is None else self._sums + sums
        self._pairs = getattr(self, "_pairs", 0) + chosen.numel()

    def pop_metrics(self) -> dict[str, float]:
        """TRL's DPOTrainer logs, over the pairs of the training step just taken (every micro-batch):
        rewards/chosen = β(log π(y_w) − log π_ref(y_w)) averaged, rewards/rejected, rewards/accuracies
        (chosen above rejected) and rewards/margins. Empty when no step ran since the last call."""
        if not getattr(self, "_pairs", 0):
            return {}
        values = (self._sums / self._pairs).tolist()
        self._sums, self._pairs = None, 0
        return dict(zip(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"), values,
                        strict=True))


# ---- the reward model ----------------------------------------------------------------------------
REWARD_HEAD = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A decoder with a scalar head instead of its vocabulary projection (§4.1.2): the reward of a
    response is the head applied to the final-norm hidden state of its last token (end of turn).

    Wraps the model from outside: its `output` becomes the identity (so it returns hidden states),
    the original projection is kept aside for exporting the backbone unchanged."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.args = backbone.args
        # not a submodule: exported as is, never trained
        object.__setattr__(self, "_lm_output", backbone.output)
        self.backbone = backbone
        backbone.output = nn.Identity()
        self.score = nn.Linear(backbone.args.dim, 1)
        nn.init.normal_(self.score.weight, std=1.0 / backbone.args.dim ** 0.5)
        nn.init.zeros_(self.score.bias)
        self.to(backbone.tok_embeddings.weight.device)

    @property
    def tok_embeddings(self) -> nn.Module:
        return self.backbone.tok_embeddings

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """tokens (B, T) → a reward at every position (B, T)."""
        return self.score(self.backbone(tokens, **kw).float())[..., 0]

    def rewards(self, batch: RankedBatch) -> torch.Tensor:
        """One reward per response of the batch (S,)."""
        r = self(batch.inputs, positions=batch.positions, mask=batch.mask)
        return r[batch.seg_row, batch.seg_last]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in self.backbone.state_dict().items() if not k.startswith("output.")}
        if not self.args.tie_embeddings:
            sd["output.weight"] = self._lm_output.weight
        return sd


def score_responses(rm: RewardModel, tokenizer, prompt: Messages, responses: Sequence[str],
                    batch_size: int = 8) -> list[float]:
    """Rewards of several responses to one prompt, sharing the prompt in each row: a row holds up
    to `batch_size` responses, and no more than fit the reward model's context with the prompt (K
    long samples used to go into rows of 8 whatever their length, and a row past the context was
    refused after all the sampling even though every sample fits on its own)."""
    max_len = rm.args.max_seq_len
    prompt_ids, rows, row = None, [], []
    for i, text in enumerate(responses):
        prompt_ids, turn, content = encode_prompt_response(tokenizer, prompt, text, f"sample {i}")
        if len(prompt_ids) + len(turn) > max_len:
            raise HerdError(f"sample {i}: prompt and reply take {len(prompt_ids) + len(turn)} tokens, more than "
                            f"the reward model's context of {max_len}; lower --max-new-tokens or shorten the prompt")
        if row and (len(row) == batch_size or len(prompt_ids) + sum(len(t) for t, _ in row) + len(turn) > max_len):
            rows.append(row)
            row = []
        row.append((turn, content))
    if row:
        rows.append(row)
    out: list[float] = []
    with torch.no_grad():
        for row in rows:
            enc = EncodedRanked(0, prompt_ids, [t for t, _ in row], [c for _, c in row])
            b = collate_ranked([enc]).to(rm.tok_embeddings.weight.device)
            out.extend(rm.rewards(b).tolist())
    return out


# ---- loading and saving models for post-training -------------------------------------------------
def resolve_model_spec(spec: str | os.PathLike) -> str:
    """A post-training run directory (holding `model/`) → its exported model; anything else as is."""
    if not str(spec).strip():  # Path("") is ".": the working directory's lone .gguf was loaded as the model
        raise HerdError("the model is empty; give a built-in name, a checkpoint or a run directory")
    p = Path(spec)
    if p.is_dir() and (p / "model").is_dir() and (p / "metrics.jsonl").exists():
        return str(p / "model")
    return str(spec)


def load_trainable(spec: str | os.PathLike, device: str = "cpu"):
    """(model in train mode with fp32 weights and no inference packing, tokenizer) for fine-tuning."""
    import warnings

    from herd.api import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tok = load(resolve_model_spec(spec), device=device, dtype=torch.float32, for_inference=False)
    if tok is None:
        raise HerdError(f"{spec}: no tokenizer next to the checkpoint; post-training needs one")
    return model.train(), tok


def load_reward_model(spec: str | os.PathLike, device: str = "cpu") -> tuple[RewardModel, Any]:
    path = Path(resolve_model_spec(spec))
    head = path / REWARD_HEAD
    if not head.exists():
        raise HerdError(f"{spec}: not a reward model (no {REWARD_HEAD}; train one with `herd reward`)")
    model, tok = load_trainable(path, device)
    rm = RewardModel(model)
    load_reward_head(rm, head)
    return rm.eval(), tok


def load_reward_head(rm: RewardModel, head: Path) -> None:
    """The trained score head of `herd reward` (reward_head.safetensors) into `rm`, or one line."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(head))
        rm.score.load_state_dict({k.removeprefix("score."): v.to(rm.score.weight.device) for k, v in sd.items()})
    except (RuntimeError, OSError) as e:
        raise HerdError(f"{head}: does not fit the model ({str(e).splitlines()[0]})") from None


def export_model(model: nn.Module, tokenizer, out: str | os.PathLike) -> Path:
    """Write the trained model as a Meta-layout checkpoint with its tokenizer (LoRA merged; a
    reward model's backbone plus `reward_head.safetensors`), atomically."""
    from safetensors.torch import save_file

    from herd.checkpoint import write_checkpoint
    from herd.checkpoint.common import atomic_path
    from herd.train.lora import merged_state_dict

    out = Path(out)
    if isinstance(model, RewardModel):
        sd = merged_state_dict(model.backbone)
        sd = {k: v for k, v in sd.items() if not k.startswith("output.")}
        if not model.args.tie_embeddings:
            sd["output.weight"] = model._lm_output.weight
    else:
        sd = merged_state_dict(model)
    if model.args.tie_embeddings:
        sd.pop("output.weight", None)
    sd = {k: v.detach().cpu().float().contiguous() for k, v in sd.items()}
    write_checkpoint(out, "meta", model.args, sd, tokenizer=tokenizer)
    if isinstance(model, RewardModel):
        with atomic_path(out / REWARD_HEAD) as tmp:
            save_file({f"score.{k}": v.detach().cpu().contiguous() for k, v in model.score.state_dict().items()},
                      str(tmp))
    return out


# ---- runs: the one loop with a loaded model and in-memory data ------------------------------------
@dataclass
class DPOConfig:
    beta: float = 0.1  # §4.1.4
    nll: float = 0.2  # weight of the chosen response's NLL term (§4.1.4); 0 = plain DPO
    nll_norm: str = "tokens"  # how the NLL is normalized (see DPO): tokens (TRL), response (Pang et al.), sum

    def validate(self) -> DPOConfig:
        """Checked when the config is built (herd/train/posttrain_cli.py), before any model loads."""
        check_dpo_values(self.beta, self.nll, self.nll_norm)
        return self


def _split_extra(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical weights for the checkpoint's model/, everything else: adapters, the reward head)."""
    sd = model.state_dict()
    extra = {k: v for k, v in sd.items() if ".lora." in k or k.startswith("score.")}
    if isinstance(model, RewardModel):
        base = {k.removeprefix("backbone."): v for k, v in sd.items() if k not in extra}
        if not model.args.tie_embeddings:
            base["output.weight"] = model._lm_output.weight
    else:
        base = {k: v for k, v in sd.items() if k not in extra}
    return base, extra


class PostTrainer(Trainer):
    """Trainer (herd/train/loop.py) on a loaded model, whose checkpoints keep the canonical weights
    in `model/` and the adapters / reward head beside the optimizer state, for an exact resume."""

    def __init__(self, *args, stage: str = "", tokenizer: Any = None, **kwargs):
        self.stage = stage  # "sft", "reward" or "dpo"; kept in every checkpoint, checked on resume
        self.checkpoint_tokenizer = tokenizer  # written into every checkpoint's model/, as into the final export
        super().__init__(*args, **kwargs)

    def save(self) -> Path:
        base, extra = _split_extra(self.model)
        state = self._train_state()
        state["extra_weights"] = {k: v.detach().cpu() for k, v in extra.items()}
        state["stage"] = self.stage
        return ckpt.save_checkpoint(self.run_dir, self.step, self.args, base, state, keep=self.cfg.checkpoint.keep,
                                    tokenizer=self.checkpoint_tokenizer)

    def _checkpoint_weights(self, sd: dict[str, torch.Tensor], state: dict) -> dict[str, torch.Tensor]:
        # A DPO run resumed by `herd sft` would train on under another objective and export a mix.
        saved = state.get("stage")
        if saved and self.stage and saved != self.stage:
            raise HerdError(f"{self.run_dir} is a `herd {saved}` run; resume it with `herd {saved}`, or give "
                            f"`herd {self.stage}` a new --out")
        if isinstance(self.model, RewardModel):
            sd = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("output.")}
        elif self.args.tie_embeddings:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        sd.update(state.get("extra_weights", {}))
        return sd


def _fit_seq_len(cfg, model, log) -> None:
    """Rows never exceed the model's context: a longer train.seq_len is lowered to it."""
    if cfg.train.seq_len > model.args.max_seq_len:
        log(f"train.seq_len {cfg.train.seq_len} lowered to the model's context of {model.args.max_seq_len}")
        cfg.train.seq_len = model.args.max_seq_len


def finetune(stage: str, cfg, model_spec: str, data_path: str, *, val_path: str | None = None,
             lora=None, dpo: DPOConfig | None = None, ref_spec: str | None = None, resume: bool = False,
             log: Callable[[str], None] | None = None, progress: bool = True):
    """One post-training stage — "sft", "reward" or "dpo" — of `model_spec` on `data_path`, through the
    one training loop; the result is exported to <out>/model (LoRA merged; the reward model with its
    head) and, with LoRA, the adapters alone to <out>/lora. Returns (trainer, exported path)."""
    from herd.train.lora import LoRAConfig, apply_lora, save_lora, trainable_parameters

    if stage not in ("sft", "reward", "dpo"):
        raise HerdError(f"unknown post-training stage {stage!r}")
    log = log or (lambda m: print(m, flush=True))
    lora = lora or LoRAConfig()
    t = cfg.train
    # read the data first: a malformed line is reported before the (slow) model load
    read = load_chats if stage == "sft" else functools.partial(load_preferences, log=log)
    train_rows, val_rows = read(data_path), (read(val_path) if val_path else None)
    dpo_objective = DPO(**vars(dpo or DPOConfig())) if stage == "dpo" else None  # checks dpo.* before the load
    for spec in (model_spec, ref_spec):  # `--ref ""` was taken as "no --ref": the policy was its own reference
        if spec is not None:
            resolve_model_spec(spec)
    # ... and the run directory: a model checkpoint or a finished run given as --out was refused only
    # after the models had loaded (and, for dpo, the reference pass had run)
    check_run_dir_usable(t.out_dir, resume)
    model, tok = load_trainable(model_spec, t.device)
    _fit_seq_len(cfg, model, log)
    kw = dict(batch_size=t.batch_size, seq_len=t.seq_len)
    if stage == "sft":
        train = sft_loader(tok, train_rows, seed=t.seed, **kw)
        val = sft_loader(tok, val_rows, shuffle=False, **kw) if val_rows else None
        objective: Any = SFT()
    else:
        train = ranked_loader(tok, train_rows, seed=t.seed, **kw)
        val = ranked_loader(tok, val_rows, shuffle=False, start=len(train_rows), **kw) if val_rows else None
        objective = RewardRanking() if stage == "reward" else dpo_objective
    if stage == "dpo":
        # §4.1.4: the reference is the starting policy unless given; its log-probs are computed
        # once here and cached, so it is freed before training starts.
        ref, ref_tok = load_trainable(model_spec if ref_spec is None else ref_spec, t.device)
        if ref.args.vocab_size != model.args.vocab_size or ref_tok.vocab_size != tok.vocab_size:
            raise HerdError(f"reference model {ref_spec or model_spec} has a vocabulary of {ref.args.vocab_size} "
                            f"tokens, the policy {model.args.vocab_size}: DPO needs the same tokenizer")
        # Same size is not same tokenizer: the reference scores the policy's ids, so a reference whose
        # tokenizer or chat format writes the dialogs differently would give silently wrong log-probs.
        first = train_rows[0]
        dialog = first.prompt + [{"role": "assistant", "content": first.responses[0]}]
        if ref_tok.chat is None or (ref_tok.chat.encode_dialog(dialog, add_generation_prompt=False)
                                    != tok.chat.encode_dialog(dialog, add_generation_prompt=False)):
            raise HerdError(f"reference model {ref_spec or model_spec} encodes the dialogs differently from the "
                            f"policy (another tokenizer or chat format, {first.where}): DPO needs the same tokenizer")
        log(f"caching reference log-probs ({len(train.items)} train"
            f"{f', {len(val.items)} validation' if val else ''} examples)")
        for loader in (train, val) if val else (train,):
            objective.cache_reference(ref, loader, model.args.vocab_size)
        del ref
    # The reward head and LoRA's A matrices are drawn from train.seed, not from whatever the global
    # RNG holds after loading (another run earlier in the process, the reference pass): two runs of one
    # config start from the same weights, and a resumed run matches the uninterrupted one bit for bit.
    torch.manual_seed(t.seed)
    if stage == "reward":
        model = RewardModel(model)
        head = Path(resolve_model_spec(model_spec)) / REWARD_HEAD
        if head.exists():  # `herd reward --model <a reward run>` continues its trained head, not a fresh one
            load_reward_head(model, head)
            log(f"continuing the reward head of {model_spec}")
    if lora.rank > 0:
        apply_lora(model.backbone if isinstance(model, RewardModel) else model, lora)
        n, total = trainable_parameters(model)
        log(f"LoRA rank {lora.rank}: training {n:,} of {total:,} parameters")
    trainer = PostTrainer(cfg, objective=objective, resume=resume, log=log, progress=progress,
                          model=model, data=(train, val), stage=stage, tokenizer=tok)
    trainer.run()
    out = export_model(trainer.model, tok, trainer.run_dir / "model")
    if lora.rank > 0:
        # base: PEFT's base_model_name_or_path in <out>/lora/adapter_config.json (the model it fits)
        save_lora(model.backbone if isinstance(model, RewardModel) else model, trainer.run_dir / "lora",
                  base=str(model_spec))
    return trainer, out


@torch.no_grad()
def preference_stats(model: nn.Module, loader: ExampleLoader, dpo: DPO | None = None) -> dict[str, float]:
    """Mean chosen and rejected log-probs (content tokens) and their margin over a loader's fixed
    order; with `dpo` (cached reference) also the implicit-reward margin and accuracy."""
    was = model.training
    model.eval()
    chosen, rejected, acc = [], [], []
    for i in range(loader.batches_per_epoch):
        b = loader.batch(i).to(model.tok_embeddings.weight.device)
        if dpo is not None:
            t = dpo.terms(model, b)
            chosen += t["policy_chosen"].tolist()
            rejected += t["policy_rejected"].tolist()
            rc = (t["policy_chosen"] - t["ref_chosen"]) - (t["policy_rejected"] - t["ref_rejected"])
            acc += (rc > 0).float().tolist()
        else:
            c, r, _ = DPO()._chosen_rejected(b)
            lp = response_logps(model, b)
            chosen += lp[c].tolist()
            rejected += lp[r].tolist()
    model.train(was)
    n = max(len(chosen), 1)
    out = {"chosen_logp": sum(chosen) / n, "rejected_logp": sum(rejected) / n,
           "margin": (sum(chosen) - sum(rejected)) / n}
    if acc:
        out["reward_accuracy"] = sum(acc) / len(acc)
    return out


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, loader: ExampleLoader) -> float:
    """Fraction of ranked pairs the reward model orders correctly (held-out pairs: chance is 0.5)."""
    rm.eval()
    right = total = 0
    for i in range(loader.batches_per_epoch):
        b = loader.batch(i).to(rm.tok_embeddings.weight.device)
        r = rm.rewards(b)
        bi, wi = ranked_pairs(b)
        right += int((r[bi] > r[wi]).sum())
        total += int(bi.numel())
    return right / max(total, 1)
