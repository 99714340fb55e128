"""LoRA adapters (Hu et al. 2021) for memory-light fine-tuning, applied to a model from outside.

`apply_lora(model, rank, alpha)` freezes every weight and gives each targeted `nn.Linear` a small
trainable adapter: y = W x + (alpha / rank) · B A x, with A (rank, in) Gaussian and B (out, rank)
zero, so training starts from the unchanged model. The adapter is a child module `lora` of the
linear, run by a forward hook: the model code is untouched and the base weights keep their
canonical names (`layers.0.attention.wq.weight`), so base checkpoints still load and averaging
still lines up. `merge_lora` folds B A into W and removes the adapters; `save_lora` / `load_lora`
export the adapters alone (safetensors + adapter.json).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from herd.errors import HerdError

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
PEFT_FILE = "adapter_model.safetensors"  # PEFT's names (peft.utils.constants)
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM → LlamaForCausalLM, as PEFT saves keys


@dataclass
class LoRAConfig:
    """rank 0 disables LoRA (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # names of the nn.Linear modules to adapt
    dropout: float = 0.0

    def validate(self, known_targets: Sequence[str] | None = DEFAULT_TARGETS) -> LoRAConfig:
        """Refuse (HerdError, one line) values that would otherwise train something other than asked:
        a negative rank used to fall through `rank > 0` into full fine-tuning, and a misspelt target
        silently left its layers unadapted. `known_targets`: the names a target may take (None: any;
        apply_lora then checks them against the model itself). Returns self."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise HerdError(f"lora.rank must be a whole number >= 0 (0 = no LoRA), got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not (math.isfinite(self.alpha) and self.alpha > 0):  # NaN fails both
            raise HerdError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:  # NaN fails the comparison
            raise HerdError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.targets
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise HerdError(f"lora.targets must be a list of layer names, got {targets!r}")
        if not targets or any(not t for t in targets):
            raise HerdError(f"lora.targets needs at least one layer name and no empty ones, got {list(targets)}; "
                            f"valid: {', '.join(known_targets or DEFAULT_TARGETS)}")
        if known_targets is not None:
            unknown = [t for t in targets if t not in known_targets]
            if unknown:
                raise HerdError(f"lora.targets: unknown layer {unknown[0]!r}; valid: {', '.join(known_targets)}")
        return self


class LoRAAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as peft: B = 0 makes the start exact
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.t().to(x.dtype)) @ (self.B.t().to(x.dtype) * self.scale)

    def delta(self) -> torch.Tensor:
        """B A scaled: what merging adds to the weight (out, in)."""
        return (self.B @ self.A) * self.scale


def _hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(inputs[0])


def lora_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "lora")}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze `model` and add adapters to the linears named in cfg.targets; returns their names.

    Everything is checked before the model changes: every target must name a linear layer of this
    model, and the rank must not exceed the smaller side of any adapted matrix (a larger rank adds
    parameters without adding capacity: B A can never exceed that rank)."""
    # Any name here: the model decides which exist (a vision tower's linears are not the defaults).
    cfg.validate(known_targets=None)
    if cfg.rank == 0:
        raise HerdError("lora.rank must be positive to add adapters (0 means no LoRA)")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
    missing = [t for t in cfg.targets if t not in leaf_names]
    if missing:
        raise HerdError(f"lora.targets: this model has no linear layer named {missing[0]!r}; "
                        f"valid: {', '.join(leaf_names)}")
    chosen = {name: m for name, m in linears.items()
              if name.rsplit(".", 1)[-1] in cfg.targets and not hasattr(m, "lora")}
    # A tied output (SmolLM2, Llama 3.2) shares its weight with the embedding: merging would move the
    # embedding too, and the export, which keeps the embedding alone, would drop the adapter.
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [name for name, m in chosen.items() if uses[id(m.weight)] > 1]
    if tied:
        raise HerdError(f"lora.targets: {tied[0]!r} shares its weight with another layer (tied embeddings); "
                        f"it cannot take an adapter")
    if chosen:
        name, m = min(chosen.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
        limit = min(m.in_features, m.out_features)
        if cfg.rank > limit:
            raise HerdError(f"lora.rank {cfg.rank} exceeds the smallest adapted matrix ({name}: "
                            f"{m.out_features} x {m.in_features}); use lora.rank <= {limit}")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in chosen.values():
        m.lora = LoRAAdapter(m.in_features, m.out_features, cfg.rank, cfg.alpha, cfg.dropout).to(m.weight.device)
        m._lora_handle = m.register_forward_hook(_hook)
    if not chosen:
        raise HerdError(f"lora.targets {list(cfg.targets)} match no linear layer of this model without an adapter")
    return list(chosen)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its linear's weight and remove it: a plain model again."""
    for m in lora_modules(model).values():
        m.weight += m.lora.delta().to(m.weight.dtype)
        m._lora_handle.remove()
        del m.lora, m._lora_handle
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's canonical state dict with adapters folded in, without changing the model."""
    adapters = lora_modules(model)
    sd = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    with torch.no_grad():
        for name, m in adapters.items():
            key = f"{name}.weight"
            sd[key] = sd[key] + m.lora.delta().to(sd[key].dtype)
    return sd


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


def save_lora(model: nn.Module, out: str | os.PathLike, base: str | None = None) -> Path:
    """adapter.safetensors (names like `layers.0.attention.wq.lora.A`) + adapter.json, atomically,
    and the same adapters in PEFT's layout beside them (see peft_adapter; `base` becomes its
    base_model_name_or_path) when the model has a HF mapping."""
    from safetensors.torch import save_file

    from herd.checkpoint.common import atomic_path

    adapters = lora_modules(model)
    if not adapters:
        raise HerdError("the model has no LoRA adapters to save")
    first = next(iter(adapters.values())).lora
    cfg = {"rank": first.rank, "alpha": first.alpha,
           "targets": sorted({n.rsplit(".", 1)[-1] for n in adapters}), "modules": sorted(adapters)}
    peft = peft_adapter(model, base)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()},
                  str(tmp / ADAPTER_FILE))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1))
        if peft is not None:
            peft_cfg, peft_sd = peft
            save_file(peft_sd, str(tmp / PEFT_FILE), metadata={"format": "pt"})
            (tmp / PEFT_CONFIG).write_text(json.dumps(peft_cfg, indent=1))
    return out


def _hf_args(model: nn.Module):
    """The model's ModelArgs when herd/checkpoint/hf.py maps it (a Llama 3 Transformer), else None."""
    from herd.models.args import ModelArgs
    from herd.models.llama4 import Llama4Args

    args = getattr(model, "args", None)
    return args if isinstance(args, ModelArgs) and not isinstance(args, Llama4Args) else None


def _hf_module(name: str) -> str:
    """`layers.0.attention.wq` → `model.layers.0.self_attn.q_proj` (KeyError/ValueError: no mapping)."""
    from herd.checkpoint.hf import to_hf_name

    return to_hf_name(f"{name}.weight").removesuffix(".weight")


def _q_k_heads(leaf: str, args) -> int | None:
    """wq / wk rows are permuted between Meta's and HF's RoPE layouts (herd/checkpoint/hf.py): a
    delta B A on W's rows needs B's rows permuted the same way (A acts on the input: unchanged)."""
    return {"wq": args.n_heads, "wk": args.kv_heads}.get(leaf)


def peft_adapter(model: nn.Module, base: str | None = None) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(adapter_config.json, adapter_model.safetensors tensors) as PEFT's `save_pretrained` writes
    them for `get_peft_model(LlamaForCausalLM, LoraConfig(...))`; None when the model has no HF
    mapping (not a Llama 3 Transformer)."""
    from herd.checkpoint.hf import permute_to_hf

    args, adapters = _hf_args(model), lora_modules(model)
    if args is None or not adapters:
        return None
    try:
        hf_names = {name: _hf_module(name) for name in adapters}
    except (KeyError, ValueError):
        return None
    sd, first = {}, next(iter(adapters.values())).lora
    for name, m in adapters.items():
        A, B = m.lora.A.detach().float().cpu(), m.lora.B.detach().float().cpu()
        heads = _q_k_heads(name.rsplit(".", 1)[-1], args)
        if heads is not None:
            B = permute_to_hf(B, heads)
        sd[f"{PEFT_PREFIX}{hf_names[name]}.lora_A.weight"] = A.contiguous()
        sd[f"{PEFT_PREFIX}{hf_names[name]}.lora_B.weight"] = B.contiguous()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
           "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "use_rslora": False,
           "use_dora": False, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": sorted({h.rsplit(".", 1)[-1] for h in hf_names.values()})}
    return cfg, sd


def _read_peft(model: nn.Module, path: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory → (LoRAConfig, herd-named adapter tensors) for this model, or HerdError
    for what herd's adapters cannot express (bias, DoRA, per-layer ranks, extra trained modules)."""
    from safetensors.torch import load_file

    from herd.checkpoint.hf import from_hf_name, permute_from_hf

    try:
        cfg = json.loads((path / PEFT_CONFIG).read_text())
        raw = load_file(str(path / PEFT_FILE))
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"{path}: not a PEFT adapter directory ({e})") from None
    args = _hf_args(model)
    checks = {"peft_type": cfg.get("peft_type") == "LORA", "bias": cfg.get("bias", "none") == "none",
              "use_dora": not cfg.get("use_dora"), "rank_pattern": not cfg.get("rank_pattern"),
              "alpha_pattern": not cfg.get("alpha_pattern"), "modules_to_save": not cfg.get("modules_to_save")}
    unsupported = [k for k, ok in checks.items() if not ok]
    if args is None or unsupported:
        why = f"{unsupported[0]}={cfg.get(unsupported[0])!r}" if unsupported else "the model has no HF mapping"
        raise HerdError(f"{path}: PEFT adapter herd cannot load ({why})")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); herd by alpha / r
    sd = {}
    for key, t in raw.items():
        # `...q_proj.lora_A.weight`, or `...q_proj.lora_A.default.weight` with the adapter's name
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        meta = from_hf_name(f"{m[1]}.weight") if m else None
        if meta is None:
            raise HerdError(f"{path}: PEFT tensor {key!r} has no herd counterpart")
        name = meta.removesuffix(".weight")
        heads = _q_k_heads(name.rsplit(".", 1)[-1], args)
        ab = m[2]
        if ab == "B" and heads is not None:
            t = permute_from_hf(t, heads)
        sd[f"{name}.lora.{ab}"] = t
    targets = tuple(sorted({k.split(".lora.")[0].rsplit(".", 1)[-1] for k in sd}))
    return LoRAConfig(rank=rank, alpha=alpha, targets=targets), sd


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters saved at `path` to `model` (which must be the base they were trained on):
    herd's adapter.json directory, or a PEFT LoRA directory (adapter_config.json) made for the HF
    conversion of that base."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists() and (path / PEFT_CONFIG).exists():
        cfg, sd = _read_peft(model, path)
    else:
        try:
            raw = json.loads((path / ADAPTER_CONFIG).read_text())
            sd = load_file(str(path / ADAPTER_FILE))
        except (OSError, json.JSONDecodeError) as e:
            raise HerdError(f"{path}: not a LoRA adapter directory ({e})") from None
        cfg = LoRAConfig(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]))
    apply_lora(model, cfg)
    missing = set(lora_state_dict(model)) ^ set(sd)
    if missing:
        raise HerdError(f"{path}: adapters do not fit this model (e.g. {sorted(missing)[0]})")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch: adapters of another model size
        raise HerdError(f"{path}: adapters do not fit this model ({str(e).splitlines()[-1].strip()})") from None
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied weights counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def config_dict(cfg: LoRAConfig) -> dict:
    d = asdict(cfg)
    d["targets"] = list(cfg.targets)
    return d


def targets_from(value: str | Sequence[str]) -> tuple[str, ...]:
    """`wq,wv` (CLI) or a list (TOML) → a tuple; LoRAConfig.validate judges the names."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(","))
    if not isinstance(value, (list, tuple)):  # tuple(5) would be a TypeError traceback
        raise HerdError(f"lora.targets must be a list of layer names or 'wq,wv', got {value!r}")
    return tuple(value)
