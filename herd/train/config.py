"""Typed configs for a training run, loaded from TOML with dotted command-line overrides.

Each component owns a small dataclass (DESIGN principle 8); `RunConfig` only composes them.
A TOML file has one table per component (`[model]`, `[data]`, `[optim]`, `[schedule]`, `[train]`,
`[checkpoint]`, `[parallel]`); overrides look like `train.steps=2000` or `--model.dim=256`. An unknown table or
key is a one-line `HerdError` that lists the valid ones — never silently ignored.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.models.args import ModelArgs, get_preset
from herd.train.parallel import ParallelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib


@dataclass
class ModelConfig:
    """A preset name (herd.models.args.PRESETS or a Llama 4 one) plus the fields to change."""

    preset: str = "debug"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    head_dim: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    attention_bias: bool | None = None  # biases on wq/wk/wv/wo (transformers' LlamaConfig flag)
    mlp_bias: bool | None = None  # biases on w1/w2/w3

    # Llama 4 (herd.models.llama4.LLAMA4_PRESETS, e.g. preset = "llama4-debug") only
    n_experts: int | None = None
    top_k: int | None = None
    moe_every: int | None = None
    moe_ffn_dim: int | None = None
    attention_chunk_size: int | None = None

    def args(self) -> ModelArgs:
        from herd.models.llama4 import LLAMA4_PRESETS

        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name != "preset" and getattr(self, f.name) is not None}
        base = LLAMA4_PRESETS[self.preset] if self.preset in LLAMA4_PRESETS else get_preset(self.preset)
        return base.replace(**changes)


@dataclass
class DataConfig:
    path: str = "data/shards"  # a shards directory (herd.data.shards)
    # When `path` is missing, build it first from this source: "builtin" (the built-in corpus,
    # herd.data.builtin) or "builtin:shakespeare" / "builtin:code" (one domain), "stdlib" (the
    # interpreter's own Python sources), a documents.jsonl, or a text file / directory of .txt files.
    source: str = ""
    # How `source` is tokenized: "bytes" (byte-level ids, no files), a herd tokenizer name
    # ("llama3", ...) or a tokenizer directory/file. A directory that does not exist yet is trained
    # there first on `source` when `tokenizer_vocab_size` is set (Llama 3 style BPE, SPEC §2).
    tokenizer: str = "bytes"
    tokenizer_vocab_size: int = 0
    # Validation split: "documents" holds out whole documents (by hash); "tails" holds out the last
    # `val_fraction` of every document — for corpora with near-duplicate documents (the two
    # Shakespeare editions), so a held-out passage never has its twin in the training split.
    val_split: str = "documents"
    val_fraction: float = 0.05
    val_batches: int = 4  # batches of the validation split per evaluation


# optim.implementation → torch.optim.AdamW's kernel arguments
OPTIM_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


@dataclass
class OptimConfig:
    """AdamW (SPEC §3.4); weight decay only on matrices (2-D parameters)."""

    lr: float = 3e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # torch's AdamW kernels (torchtitan's optimizer.implementation): "fused" updates every tensor in
    # one kernel (CPU too: 3x faster than the default per-tensor loop on the tiny preset), "foreach"
    # batches them, "for-loop" is torch's CPU default; all three compute the same update.
    implementation: str = "fused"


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then `cosine` decay to `min_lr` over `decay_steps`
    (SPEC §3.4), `linear` decay to zero (the annealing stage, §3.4.3) or `constant`."""

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_steps: int = 0  # steps from the start to the end of decay; 0 = train.steps


# §3.4 recipe numbers as data: 405B pre-training (peak 8e-5, 8,000 warm-up steps, cosine to 8e-7
# over 1.2M steps) and annealing (linear to 0).
RECIPES: dict[str, tuple[OptimConfig, ScheduleConfig]] = {
    "llama3-405b": (OptimConfig(lr=8e-5), ScheduleConfig("cosine", warmup_steps=8000, min_lr=8e-7,
                                                         decay_steps=1_200_000)),
    "anneal": (OptimConfig(lr=8e-5), ScheduleConfig("linear", warmup_steps=0, min_lr=0.0)),
}


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # rows per micro-batch
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 50  # validation loss every N steps (and at the end); 0 = only at the end
    out_dir: str = "runs/run"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU; or "float32" / "bfloat16"
    threads: int = 0  # torch CPU threads; 0 = leave as is
    # torch.compile the forward pass and the loss as one graph (one process; distributed runs compile
    # per block with parallel.compile). Fuses the norms, SwiGLU, RoPE and the softmax of the loss
    # around the matmuls; the first step pays the compilation (~30 s for the tiny model on 2 cores).
    compile: bool = False
    # CPU: keep freed memory for reuse instead of page-faulting it in again every step (herd/runtime.py)
    retain_memory: bool = True
    # Start from these weights (a training checkpoint ckpt-N/ or any model checkpoint herd reads)
    # with a fresh optimizer and schedule: continued pre-training stages such as long-context
    # extension (§3.4.2) or annealing on a high-quality mix (§3.4.3). "" = fresh init_weights().
    init_from: str = ""
    peak_flops: float = 0.0  # per device, for MFU; 0 = a figure for the detected device
    # Batch-size / sequence-length schedule, [[from_step, batch_size, seq_len], ...] (SPEC §3.4: the
    # 405B run went 4M tokens at 4K → 8M at 8K after 252M tokens → 16M after 2.87T). Before the first
    # entry (or when empty) micro-batches are batch_size × seq_len.
    batch_schedule: list[tuple[int, int, int]] = field(default_factory=list)

    def shape_at(self, step: int) -> tuple[int, int]:
        """(batch_size, seq_len) of the micro-batches of optimizer step `step` (0-based)."""
        shape = (self.batch_size, self.seq_len)
        for start, batch_size, seq_len in self.batch_schedule:
            if step >= start:
                shape = (batch_size, seq_len)
        return shape


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (and at the end); 0 = only at the end
    keep: int = 3  # keep the newest N checkpoints; 0 = keep all


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # herd/train/parallel.py

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(_section_type(s))]


def _section_type(section: str) -> type:
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}[section]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) a TOML/CLI value against the field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except HerdError:
                continue
        raise HerdError(f"{key}: {value!r} is not a {hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise HerdError(f"{key}: expected a table, got {value!r}")
        kt, vt = typing.get_args(hint)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise HerdError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(hint)[0], key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise HerdError(f"{key}: expected a list of {len(typing.get_args(hint))} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, typing.get_args(hint), strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise HerdError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def set_field(obj: Any, section: str, key: str, value: Any) -> None:
    """Set `section.key` of a config dataclass `obj` to a checked value; an unknown key is one line
    listing the valid ones (DESIGN principle 8). Shared by every typed config (the data pipeline's too)."""
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        valid = ", ".join(f"{section}.{k}" for k in hints)
        raise HerdError(f"unknown config key {section}.{key}; valid keys: {valid}")
    setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a missing, unreadable or invalid file is one line."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HerdError(f"config file {path} not found") from None
    except OSError as e:
        raise HerdError(f"config file {path}: cannot read ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: invalid TOML ({e})") from None


def _apply(cfg: RunConfig, section: str, key: str, value: Any) -> None:
    if section not in SECTIONS:
        raise HerdError(f"unknown config section {section!r}; valid: {', '.join(SECTIONS)}")
    set_field(getattr(cfg, section), section, key, value)


def _parse_value(text: str) -> Any:
    """A CLI value: TOML syntax when it parses (numbers, booleans, lists), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, str, Any]:
    """'--train.steps=2000' or 'train.steps=2000' → ("train", "steps", 2000)."""
    body = item[2:] if item.startswith("--") else item
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise HerdError(f"bad override {item!r}: expected --section.key=value (e.g. --train.steps=100)")
    dotted, text = body.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key.replace("-", "_"), _parse_value(text)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> RunConfig:
    """Defaults ← TOML file (or `data`, a dict of the same shape) ← dotted overrides."""
    cfg = RunConfig()
    table: dict = dict(data or {})
    if path is not None:
        table = read_toml(path)
    for section, values in table.items():
        if not isinstance(values, dict):
            raise HerdError(f"config: {section!r} must be a table; valid sections: {', '.join(SECTIONS)}")
        for key, value in values.items():
            _apply(cfg, section, key, value)
    for item in overrides:
        section, key, value = parse_override(item)
        _apply(cfg, section, key, override_value(_section_type(section), key, value, item)
               if section in SECTIONS else value)
    validate(cfg)
    return cfg


def override_value(config_type: type, key: str, value: Any, item: str) -> Any:
    """The override's text as written when `config_type.key` is a string field. `_parse_value` reads
    a CLI value as TOML so numbers and lists arrive typed, but that also turned `--train.out_dir=2024`
    or `--data.path=123` into an int that the str field then refused (and `--data.path=1e3` would
    have become 1000.0 had it been converted back): a text field takes the text it was given. Shared
    by every override reader (training, post-training's own sections, the data pipeline)."""
    if isinstance(value, str):
        return value
    hint = typing.get_type_hints(config_type).get(key)
    if hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)):
        return item.split("=", 1)[1]
    return value


def validate(cfg: RunConfig) -> None:
    t = cfg.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(t, name) <= 0:
            raise HerdError(f"train.{name} must be positive (got {getattr(t, name)})")
    if not cfg.data.path.strip():  # Path("") is "." (a ValueError traceback when shards were built there)
        raise HerdError("data.path is empty; give the shards directory")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise HerdError(f"train.dtype {t.dtype!r}: choose auto, float32 or bfloat16")
    if cfg.data.val_split not in ("documents", "tails"):
        raise HerdError(f"data.val_split {cfg.data.val_split!r}: choose documents or tails")
    if not 0 <= cfg.data.val_fraction < 1:
        raise HerdError(f"data.val_fraction must be in [0, 1) (got {cfg.data.val_fraction})")
    if cfg.optim.implementation not in OPTIM_KERNELS:
        raise HerdError(f"optim.implementation {cfg.optim.implementation!r}: choose {', '.join(OPTIM_KERNELS)}")
    if cfg.schedule.name not in ("cosine", "linear", "constant"):
        raise HerdError(f"schedule.name {cfg.schedule.name!r}: choose cosine, linear or constant")
    args = cfg.model.args()  # raises on an unknown preset or invalid shape
    if getattr(args, "n_experts", 0) and not args.n_moe_layers:
        # layer i is MoE iff (i + 1) % moe_every == 0: past n_layers none is, and a Llama 4 preset
        # trained as a dense model (router and experts never built) with nothing said
        raise HerdError(f"model.moe_every={args.moe_every} exceeds model.n_layers={args.n_layers}: no layer "
                        "would be a mixture of experts")
    cfg.parallel.validate()
    starts = [s for s, _, _ in t.batch_schedule]
    # strictly increasing: two entries from one step would leave the earlier one silently unused
    if (any(a >= b for a, b in itertools.pairwise(starts))
            or any(min(e) < 0 or min(e[1:]) <= 0 for e in t.batch_schedule)):
        raise HerdError("train.batch_schedule: entries [from_step, batch_size, seq_len] need increasing "
                        "steps and positive sizes")
    for seq_len in [t.seq_len] + [e[2] for e in t.batch_schedule]:
        if seq_len > args.max_seq_len:
            raise HerdError(f"train.seq_len={seq_len} exceeds the model's max_seq_len={args.max_seq_len}")
    _validate_ranges(cfg)


def schedule_warning(cfg: RunConfig) -> str | None:
    """SPEC §3.4: linear warm-up to the peak, then decay until `decay_steps` (0 = train.steps). A
    warm-up longer than that span never reaches optim.lr and leaves no decay, so the run follows
    another schedule than the one written: said once at the start. Not refused: `--train.steps=N`
    shortens any config for a quick run (the issue's contract), and a run stopped early to be
    resumed longer keeps its schedule by setting decay_steps to the full length."""
    s = cfg.schedule
    horizon, what = (s.decay_steps, "schedule.decay_steps") if s.decay_steps else (cfg.train.steps, "train.steps")
    if s.warmup_steps > horizon:
        return (f"schedule.warmup_steps={s.warmup_steps} exceeds {what}={horizon}: the learning rate stays "
                f"below optim.lr and does not decay")
    return None


def _validate_ranges(cfg: RunConfig) -> None:
    """Numbers outside their meaning fail here in one line, not as a torch/NumPy traceback later or,
    worse, as a run that trains on quietly (a negative norm_eps gives NaN from the first step; a
    negative warm-up bends the schedule; val_batches = 0 logged a validation loss of 0)."""
    import math

    t, o, s, m = cfg.train, cfg.optim, cfg.schedule, cfg.model

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    checks = [
        ("data.val_batches", cfg.data.val_batches, cfg.data.val_batches >= 1, ">= 1"),
        ("data.tokenizer_vocab_size", cfg.data.tokenizer_vocab_size, cfg.data.tokenizer_vocab_size >= 0, ">= 0"),
        # lr = 0 trains nothing while looking like a run (loss flat, checkpoints written)
        ("optim.lr", o.lr, finite(o.lr) and o.lr > 0, "a finite number > 0"),
        ("optim.eps", o.eps, finite(o.eps) and o.eps > 0, "> 0"),
        ("optim.betas", list(o.betas), all(finite(b) and 0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, finite(o.weight_decay) and o.weight_decay >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, finite(o.grad_clip) and o.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        ("schedule.warmup_steps", s.warmup_steps, s.warmup_steps >= 0, ">= 0"),
        ("schedule.decay_steps", s.decay_steps, s.decay_steps >= 0, ">= 0 (0 = train.steps)"),
        ("schedule.min_lr", s.min_lr, finite(s.min_lr) and 0 <= s.min_lr <= max(o.lr, 0), "in [0, optim.lr]"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0 = only at the end)"),
        ("train.threads", t.threads, t.threads >= 0, ">= 0 (0 = torch's default)"),
        # NumPy's legacy seeding, which the data order uses, takes 32 bits
        ("train.seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2**32)"),
        ("train.peak_flops", t.peak_flops, finite(t.peak_flops) and t.peak_flops >= 0, ">= 0 (0 = detect)"),
        ("checkpoint.every", cfg.checkpoint.every, cfg.checkpoint.every >= 0, ">= 0 (0 = only at the end)"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep >= 0, ">= 0 (0 = keep all)"),
    ]
    for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        value = getattr(m, name)
        if value is not None:
            checks.append((f"model.{name}", value, finite(value) and value > 0, "> 0"))
    # n_kv_heads = 0 is falsy: ModelArgs would quietly read it as "no GQA" (n_kv_heads = n_heads)
    for name in ("n_kv_heads", "ffn_hidden_dim", "head_dim", "multiple_of", "max_seq_len"):
        value = getattr(m, name)
        if value is not None:
            checks.append((f"model.{name}", value, value > 0, "> 0"))
    for key, value, ok, want in checks:
        if not ok:
            raise HerdError(f"{key} must be {want} (got {value})")
    device_kind(t.device)


def device_kind(device: str) -> str:
    """"cpu", "cuda" or "mps" for a valid device string (whether this machine has it is checked
    when training starts: a GPU run's config is also read on a CPU machine, by `herd plan` or export)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = ""
    if kind not in ("cpu", "cuda", "mps"):
        raise HerdError(f"train.device {device!r}: choose cpu, cuda, cuda:N or mps")
    return kind


def check_device_present(device: str) -> None:
    import torch

    kind = device_kind(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise HerdError(f"train.device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise HerdError(f"train.device {device!r}: MPS is not available here")
