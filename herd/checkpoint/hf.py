"""Hugging Face layout: config.json + model.safetensors (or shards with model.safetensors.index.json).

A mapping at the boundary (DESIGN principle 4): HF names ↔ Meta names, and HF's "rotate half"
RoPE layout ↔ Meta's adjacent pairs, which is a permutation of the rows of wq and wk (and of their
biases, for `attention_bias` models: a bias entry belongs to its weight row).
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.common import (
    check_state_dict,
    config_bool,
    config_int,
    read_json_config,
    read_safetensors_dir,
    write_safetensors_dir,
)
from herd.errors import HerdError
from herd.models.args import (
    AnyRopeScaling,
    DynamicNtkRopeScaling,
    LinearRopeScaling,
    ModelArgs,
    RopeScaling,
    YarnRopeScaling,
)

_PROJECTIONS = {  # Meta module (under layers.N.) → HF module (under model.layers.N.)
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_LAYER_MAP = {  # Meta name (under layers.N.) → HF name (under model.layers.N.)
    # weights, and the biases of attention_bias / mlp_bias models (check_state_dict decides which
    # of those a config asks for)
    **{f"{m}.{w}": f"{h}.{w}" for m, h in _PROJECTIONS.items() for w in ("weight", "bias")},
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    _, idx, rest = name.split(".", 2)
    return f"model.layers.{idx}.{_LAYER_MAP[rest]}"


_FROM_HF = {v: k for k, v in _TOP_MAP.items()}
_FROM_HF_LAYER = {v: k for k, v in _LAYER_MAP.items()}


def from_hf_name(name: str) -> str | None:
    if name in _FROM_HF:
        return _FROM_HF[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _FROM_HF_LAYER:
        return f"layers.{parts[2]}.{_FROM_HF_LAYER[parts[3]]}"
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta adjacent-pair rows → HF half-split rows, per head (transformers' convert script). `w` is
    a weight (rows, cols) or a bias (rows,): a bias entry moves with its row."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- config --------------------------------------------------------------------------------------
def rope_from_hf_config(cfg: dict, source: str, default_theta: float) -> tuple[float, AnyRopeScaling | None]:
    """(rope_theta, scaling or None) from a HF config: transformers 5 nests both under
    `rope_parameters`, older configs have `rope_theta` and `rope_scaling` (with `type` or
    `rope_type`). Shared by the dense and the Llama 4 mappings. Raises KeyError on a missing field.

    Read as transformers 5 reads it (`convert_rope_params_to_dict`, `standardize_rope_params`,
    `_compute_*_parameters`): a non-empty `rope_scaling` replaces `rope_parameters`; a `rope_theta`
    inside the one read wins over a top-level one; for llama3 and yarn a top-level
    `original_max_position_embeddings` wins over the nested one, and without either it is
    `max_position_embeddings`; yarn's beta_fast/beta_slow fall back to 32/1 when absent *or zero*
    (transformers' `or`). llama3, linear and yarn are computed; dynamic NTK is plain RoPE within
    the context (see below), kept as `DynamicNtkRopeScaling` so that writing the model back keeps
    it; every other type (longrope, ...) and partial rotary embeddings are refused: the model would
    compute, silently wrong, with plain RoPE."""
    # transformers' `convert_rope_params_to_dict`: `rope_scaling or rope_parameters`, so an old-style
    # rope_scaling wins when a config has both (herd read rope_parameters, another scaling)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):  # the callers report it as a malformed value
        raise TypeError(f"rope_parameters must be a JSON object, got {rope!r}")
    theta = float(rope["rope_theta"] if "rope_theta" in rope else cfg.get("rope_theta", default_theta))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise HerdError(f"{source}: partial_rotary_factor {partial} is not supported (RoPE on the whole head only)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return theta, None
    if rope_type == "linear":
        return theta, LinearRopeScaling(factor=float(rope["factor"]))
    if rope_type == "dynamic":
        # Dynamic NTK is plain RoPE within the context: transformers (`_compute_dynamic_ntk_parameters`,
        # `dynamic_frequency_update`) raises the base to theta·(factor·L/max_pos − factor + 1)^(d/(d−2))
        # with L = max(seq_len, max_position_embeddings), i.e. exactly theta until a forward reaches
        # past max_position_embeddings. herd's context ends there (max_seq_len is that value;
        # generation, the server and training refuse longer), so herd computes plain RoPE
        # (herd/models/rope.py); the factor is kept so a model written back runs as this one does
        # past max_position_embeddings in transformers. Required, as transformers requires it.
        return theta, DynamicNtkRopeScaling(factor=float(rope["factor"]))
    if rope_type not in ("llama3", "yarn"):
        raise HerdError(f"{source}: RoPE scaling type {rope_type!r} is not supported "
                        "(llama3, linear, yarn, dynamic or none)")
    original = cfg.get("original_max_position_embeddings",
                       rope.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
    if original is None:
        raise KeyError("original_max_position_embeddings")
    if rope_type == "yarn":
        factor = rope.get("factor")
        if factor is None:  # transformers: the context extension the config states (DeepSeek-V3 style)
            factor = cfg["max_position_embeddings"] / original

        def optional(key: str) -> float | None:
            return None if rope.get(key) is None else float(rope[key])

        return theta, YarnRopeScaling(
            factor=float(factor), original_max_position_embeddings=int(original),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            attention_factor=optional("attention_factor"), mscale=optional("mscale"),
            mscale_all_dim=optional("mscale_all_dim"), truncate=bool(rope.get("truncate", True)))
    return theta, RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=int(original))


def hf_rope_scaling(s: AnyRopeScaling) -> dict:
    """The `rope_scaling` object transformers reads back as `s` (fields left unset stay unset)."""
    if isinstance(s, LinearRopeScaling):
        return {"rope_type": "linear", "factor": s.factor}
    if isinstance(s, DynamicNtkRopeScaling):
        return {"rope_type": "dynamic", "factor": s.factor}
    if isinstance(s, YarnRopeScaling):
        out = {"rope_type": "yarn", "factor": s.factor,
               "original_max_position_embeddings": s.original_max_position_embeddings,
               "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}
        out.update({k: getattr(s, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
                    if getattr(s, k) is not None})
        if not s.truncate:
            out["truncate"] = False
        return out
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


def refuse_biases(cfg: dict, source: str) -> None:
    """For Llama 4 (hf_llama4.py): its configs may ask for biases on the attention or MLP
    projections; herd's Llama 4 model has none, and dropping the checkpoint's bias tensors would
    compute a different function. (The dense Llama model takes them: `ModelArgs.attention_bias`.)"""
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise HerdError(f"{source}: {key}=true is not supported (herd's Llama 4 projections have no biases)")


# transformers' LlamaConfig default, what a config.json without the key gets there (herd used 8192,
# which also moved the llama3/yarn RoPE's original context that falls back to it)
HF_LLAMA_MAX_POSITIONS = 2048


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    from herd.checkpoint.hf_llama4 import is_llama4_config, llama4_args_from_hf_config

    if is_llama4_config(cfg):  # MoE/iRoPE: its own mapping (hf_llama4.py)
        return llama4_args_from_hf_config(cfg, source)
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral") and "LlamaForCausalLM" not in (cfg.get("architectures") or []):
        raise HerdError(f"{source}: model_type {cfg.get('model_type')!r} is not a Llama-architecture model")
    if cfg.get("hidden_act", "silu") != "silu":  # the model computes SwiGLU with SiLU and nothing else
        raise HerdError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (Llama uses silu)")
    cfg = {"max_position_embeddings": HF_LLAMA_MAX_POSITIONS, **cfg}
    try:
        theta, scaling = rope_from_hf_config(cfg, source, default_theta=10000.0)
        dim, n_heads = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
        head_dim = None if cfg.get("head_dim") is None else config_int(cfg, "head_dim")
        max_seq_len = config_int(cfg, "max_position_embeddings")
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if window is not None:
            # Mistral is Llama's architecture with its attention limited to the last `sliding_window`
            # keys (v0.1: 4096 of 32768; null from v0.2). Up to the window that limit never acts, so
            # the context is capped there: a longer prompt is refused, never attended wrongly.
            max_seq_len = min(max_seq_len, config_int(cfg, "sliding_window"))
        return ModelArgs(
            dim=dim, n_layers=config_int(cfg, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=config_int(cfg, "num_key_value_heads") if cfg.get("num_key_value_heads") else n_heads,
            vocab_size=config_int(cfg, "vocab_size"), ffn_hidden_dim=config_int(cfg, "intermediate_size"),
            head_dim=None if head_dim in (None, dim // n_heads) else head_dim,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=config_bool(cfg, "tie_word_embeddings", False),
            attention_bias=config_bool(cfg, "attention_bias", False), mlp_bias=config_bool(cfg, "mlp_bias", False),
        )
    except KeyError as e:
        raise HerdError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # "576", "x", null, 0 heads
        raise HerdError(f"{source}: malformed value ({type(e).__name__}: {e})") from None


def hf_config_from_args(args: ModelArgs, extra: dict | None = None) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.hd,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": args.attention_bias, "mlp_bias": args.mlp_bias,
        "torch_dtype": "float32",
    }
    if args.rope_scaling is not None:
        cfg["rope_scaling"] = hf_rope_scaling(args.rope_scaling)
    cfg.update(extra or {})
    return cfg


# ---- weights -------------------------------------------------------------------------------------
def from_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in hf.items():
        meta = from_hf_name(name)
        if meta is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some old exports saved
            raise HerdError(f"unexpected tensor {name!r} in HF checkpoint")
        heads = args.n_heads if ".attention.wq." in meta else args.kv_heads if ".attention.wk." in meta else 0
        # a tensor of the wrong size is left as it is for check_state_dict to name (a view error here)
        if heads and t.ndim in (1, 2) and t.shape[0] == heads * args.hd:
            t = permute_from_hf(t, heads)
        sd[meta] = t
    return sd


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            t = permute_to_hf(t, args.n_heads)
        elif name.endswith(("attention.wk.weight", "attention.wk.bias")):
            t = permute_to_hf(t, args.kv_heads)
        out[to_hf_name(name)] = t.contiguous()
    return out


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def read_hf(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], dict]:
    """→ (args, canonical state dict, the raw config.json)."""
    path = Path(path)
    cfg = read_json_config(path)
    from herd.checkpoint.hf_llama4 import is_llama4_config, read_hf_llama4

    if is_llama4_config(cfg):
        return read_hf_llama4(path, cfg)
    args = args_from_hf_config(cfg, str(path / "config.json"))
    hf = read_safetensors_dir(path)
    sd = check_state_dict(from_hf_state_dict(hf, args), args, str(path))
    return args, sd, cfg


def write_hf(path: str | Path, args: ModelArgs, sd: dict[str, torch.Tensor], *,
             max_shard_bytes: int = 5 * 2**30, config_extra: dict | None = None,
             extra_files: dict[str, str] | None = None) -> None:
    """Write a directory transformers loads; shards above `max_shard_bytes` with an index."""
    from herd.models.llama4 import Llama4Args

    if isinstance(args, Llama4Args):  # MoE/iRoPE: its own mapping (hf_llama4.py)
        from herd.checkpoint.hf_llama4 import write_hf_llama4

        write_hf_llama4(path, args, sd, max_shard_bytes=max_shard_bytes, config_extra=config_extra)
        return
    sd = check_state_dict(sd, args, "model")
    write_safetensors_dir(path, hf_config_from_args(args, config_extra), to_hf_state_dict(sd, args),
                          max_shard_bytes=max_shard_bytes, extra_files=extra_files)
