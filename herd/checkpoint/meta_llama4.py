"""Meta's Llama 4 layout: `params.json` + `consolidated.NN.pth`, as Meta publishes Scout/Maverick
(read by llama-models' `llama4/model.py` load hooks and transformers' `convert_llama4_weights_to_hf`).

Published tensor names differ from the module names herd (and llama-models' modules) use:

| herd / llama-models module                  | published (per model-parallel rank)                       |
|---------------------------------------------|-----------------------------------------------------------|
| attention.wq / wk / wv                      | attention.wqkv.weight: this rank's q, k, v rows stacked     |
| attention_norm.weight                       | attention.wqkv.layer_norm_weight                          |
| ffn_norm.weight (MoE layer / dense layer)   | feed_forward.norm.weight / feed_forward.mlp.layer_norm_weight |
| feed_forward.experts.w1, w3 (E, D, F)        | feed_forward.experts.moe_w_in_eD_F, moe_w_swiglu_eD_F (E·D, F) |
| feed_forward.experts.w2 (E, F, D)            | feed_forward.experts.moe_w_out_eF_D (E·F, D)               |
| feed_forward.shared_expert.w1 / w3 / w2      | feed_forward.w_in_shared_FD / w_swiglu_FD / w_out_shared_DF |
| feed_forward.w1, w3 / w2 (dense layer)       | feed_forward.mlp.fc1_weight (w1 and w3 rows stacked) / mlp.fc2_weight |
| feed_forward.router_DE, vision_*             | the same                                                  |

Model parallelism (fairscale): column-parallel weights split on their output dim (wq/wk/wv, w1/w3,
the experts' F, the vocabulary of tok_embeddings and output, the vision q/k/v, fc and the
projector), row-parallel ones on their input dim (wo, w2, the experts' w2 F, the vision o/c_proj),
norms, the router and row-parallel biases replicated. Routing statistics the released files carry
(`global_gate_stats_3E`, ...) are training state, dropped on reading.

params.json: Meta's keys (`moe_args`, `vision_args`, `nope_layer_interval`, `use_qk_norm`, ...);
widths follow Meta's rule (`ffn_exp`, `ffn_dim_multiplier`, `multiple_of`, and the MoE's
`auto_scale_F` halving). What Meta's keys cannot say exactly goes in a nested `"herd"` object,
which Meta's pydantic ModelArgs ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from herd.checkpoint.common import atomic_path
from herd.checkpoint.hf_llama4 import check_llama4_state_dict
from herd.errors import HerdError
from herd.models.args import DynamicNtkRopeScaling, RopeScaling
from herd.models.llama4 import Llama4Args, VisionArgs

PARAMS = "params.json"
_DROPPED = ("global_gate_stats_3E", "running_gate_stats_3E", "expert_activation_DE", "._extra_state",
            "rope.freqs", "freqs_cis")
_VE = "vision_embeddings.vision_encoder."


def is_llama4_params(params: dict) -> bool:
    p = params.get("model", params)
    return any(k in p for k in ("moe_args", "nope_layer_interval", "vision_args", "attention_chunk_size"))


# ---- config --------------------------------------------------------------------------------------
def _meta_widths(dim: int, ffn_exp: float, mult: float | None, multiple_of: int, capacity_factor: float = 1.0,
                 auto_scale: bool = True) -> tuple[int, int]:
    """(expert width, dense width) by Meta's rule (llama4/moe.py MoE.__init__, model.py
    TransformerBlock): 2/3 of ffn_exp·dim (4·dim dense) times ffn_dim_multiplier, the experts'
    divided by capacity_factor + 1 (auto_scale_F), rounded up to multiple_of."""
    def up(h: int) -> int:
        return h + (-h % multiple_of)

    moe = int(float(mult or 1.0) * int(2 * int(ffn_exp * dim) / 3))
    if auto_scale:
        moe = int(moe / (capacity_factor + 1))
    dense = int(2 * int(4 * dim) / 3)
    if mult is not None:
        dense = int(mult * dense)
    return up(moe), up(dense)


def llama4_args_from_params(params: dict, source: str = PARAMS) -> Llama4Args:
    p = params.get("model", params)
    extra = p.get("herd") or {}
    try:
        moe = p.get("moe_args")
        if not moe:
            raise HerdError(f"{source}: a Llama 4 params.json without moe_args (a dense Llama 4) is not supported")
        dim, n_heads = int(p["dim"]), int(p["n_heads"])
        moe_w, dense_w = _meta_widths(dim, float(p.get("ffn_exp") or 4.0), p.get("ffn_dim_multiplier"),
                                      int(p.get("multiple_of", 256)), float(moe.get("capacity_factor", 1.0)),
                                      bool(moe.get("auto_scale_F", True)))
        scaling = None
        if "rope_scaling" in extra:
            s = extra["rope_scaling"]
            if s is not None and not isinstance(s, dict):
                raise HerdError(f"{source}: herd.rope_scaling must be an object or null")
            kind = None if s is None else s.get("rope_type", "llama3")  # herd wrote llama3's without a type
            if kind == "dynamic":
                scaling = DynamicNtkRopeScaling(factor=float(s["factor"]))
            elif kind == "llama3":
                scaling = RopeScaling(**{k: s[k] for k in (
                    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
            elif kind is not None:
                raise HerdError(f"{source}: herd.rope_scaling type {kind!r} is not supported for Llama 4 "
                                "(llama3, dynamic)")
        elif p.get("use_scaled_rope"):
            # Meta's ModelArgs defaults (only Scout scales: factor 16, high_freq_factor 1), and its
            # apply_scaling's fixed low_freq_factor 1 and 8192-token original context.
            scaling = RopeScaling(factor=float(p.get("rope_scaling_factor") or 16.0), low_freq_factor=1.0,
                                  high_freq_factor=float(p.get("rope_high_freq_factor") or 1.0),
                                  original_max_position_embeddings=8192)
        vision = None
        if p.get("vision_args"):
            v = p["vision_args"]
            size, patch = v["image_size"], v["patch_size"]
            if size["height"] != size["width"] or patch["height"] != patch["width"]:
                raise HerdError(f"{source}: non-square vision image_size/patch_size is not supported")
            vision = VisionArgs(image_size=int(size["height"]), patch_size=int(patch["height"]), dim=int(v["dim"]),
                                n_layers=int(v["n_layers"]), n_heads=int(v["n_heads"]),
                                mlp_ratio=float(v["mlp_ratio"]), output_dim=int(v["output_dim"]),
                                pixel_shuffle_ratio=float(v["pixel_shuffle_ratio"]),
                                image_token_id=int(extra.get("image_token_id", 200092)),
                                max_tiles=int(extra.get("max_tiles", 16)))
        n_experts = int(moe["num_experts"])
        # The released instruct models' contexts (transformers' converter: 10M for 16 experts, 1M
        # for 128) when our own block does not say.
        default_ctx = 10485760 if n_experts == 16 else 1048576
        return Llama4Args(
            dim=dim, n_layers=int(p["n_layers"]), n_heads=n_heads, n_kv_heads=int(p.get("n_kv_heads") or n_heads),
            # Meta's Llama 4 attention always uses dim // n_heads
            head_dim=int(extra.get("head_dim", dim // n_heads)), vocab_size=int(p["vocab_size"]),
            norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 500000.0)),
            rope_scaling=scaling, max_seq_len=int(extra.get("max_seq_len", default_ctx)),
            tie_embeddings=bool(extra.get("tie_embeddings", False)),
            n_experts=n_experts, top_k=int(moe.get("top_k", 1)), moe_every=int(moe.get("interleave_moe_layer_step", 1)),
            moe_ffn_dim=int(extra.get("moe_ffn_dim", moe_w)), ffn_hidden_dim=int(extra.get("ffn_hidden_dim", dense_w)),
            nope_every=None if p.get("nope_layer_interval") is None else int(p["nope_layer_interval"]),
            attention_chunk_size=None if p.get("attention_chunk_size") is None else int(p["attention_chunk_size"]),
            # Meta's ModelArgs defaults: both off unless params.json turns them on
            qk_norm=bool(p.get("use_qk_norm", False)),
            attn_temperature_tuning=bool(p.get("attn_temperature_tuning", False)),
            floor_scale=float(p.get("floor_scale", 8192.0)), attn_scale=float(p.get("attn_scale", 0.1)),
            vision=vision)
    except KeyError as e:
        raise HerdError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HerdError(f"{source}: malformed value ({e})") from None


def _sizing_keys(args: Llama4Args) -> dict:
    """ffn_exp / ffn_dim_multiplier / multiple_of for which Meta's rule gives our two widths; the
    released values (4, 1.2, 2048) when they do, else the first small combination that does, else
    the released values (the exact widths are in the herd block; Meta's code then cannot load it)."""
    for mult in (1.2, 1.0, 1.3, 1.5, 2.0):
        for multiple_of in (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            if _meta_widths(args.dim, 4.0, mult, multiple_of) == (args.moe_ffn_dim, args.ffn_hidden_dim):
                return {"ffn_exp": 4.0, "ffn_dim_multiplier": mult, "multiple_of": multiple_of}
    return {"ffn_exp": 4.0, "ffn_dim_multiplier": 1.2, "multiple_of": 2048}


def params_from_llama4_args(args: Llama4Args) -> dict:
    s = args.rope_scaling
    # Meta's flag and factor mean llama3 scaling; dynamic NTK (plain RoPE within the context, which
    # is what Meta's code then runs) is in the herd object alone
    llama3 = isinstance(s, RopeScaling)
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "use_scaled_rope": llama3, **_sizing_keys(args),
        "moe_args": {"num_experts": args.n_experts, "capacity_factor": 1.0, "auto_scale_F": True,
                     "top_k": args.top_k, "interleave_moe_layer_step": args.moe_every},
        "attention_chunk_size": args.attention_chunk_size, "nope_layer_interval": args.nope_every,
        "use_qk_norm": args.qk_norm, "attn_temperature_tuning": args.attn_temperature_tuning,
        "floor_scale": args.floor_scale, "attn_scale": args.attn_scale,
    }
    if llama3:
        params.update(rope_scaling_factor=s.factor, rope_high_freq_factor=s.high_freq_factor)
    scaling = None if s is None else {"rope_type": s.kind, "factor": s.factor}
    if llama3:
        scaling = {"factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    herd: dict = {"moe_ffn_dim": args.moe_ffn_dim, "ffn_hidden_dim": args.ffn_hidden_dim, "head_dim": args.hd,
                  "max_seq_len": args.max_seq_len, "tie_embeddings": args.tie_embeddings, "rope_scaling": scaling}
    if args.vision is not None:
        v = args.vision
        params["vision_args"] = {"image_size": {"height": v.image_size, "width": v.image_size},
                                 "patch_size": {"height": v.patch_size, "width": v.patch_size},
                                 "dim": v.dim, "n_layers": v.n_layers, "n_heads": v.n_heads, "mlp_ratio": v.mlp_ratio,
                                 "output_dim": v.output_dim, "pixel_shuffle_ratio": v.pixel_shuffle_ratio}
        herd.update(image_token_id=v.image_token_id, max_tiles=v.max_tiles)
    params["herd"] = herd
    return params


# ---- model parallelism over module names ---------------------------------------------------------
def split_dim(name: str) -> int | None:
    """The dim `name` (a herd / llama-models module name) is split on across model-parallel ranks."""
    if name.startswith("vision_"):
        if name == "vision_projection.weight" or name.endswith(
                ("conv1._linear.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wq.bias",
                 "attn.wk.bias", "attn.wv.bias", "mlp.c_fc.weight", "mlp.c_fc.bias")):
            return 0
        if name.endswith(("attn.wo.weight", "mlp.c_proj.weight")):
            return 1
        return None
    if name.endswith(("experts.w1", "experts.w3")):
        return 2
    if name.endswith("experts.w2"):
        return 1
    if name in ("tok_embeddings.weight", "output.weight") or name.endswith(
            ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "w1.weight", "w3.weight")):
        return 0
    if name.endswith(("attention.wo.weight", "w2.weight")):
        return 1
    return None


def _ffn_prefix(name: str) -> tuple[str, str] | None:
    parts = name.split(".", 2)
    return (f"{parts[0]}.{parts[1]}.", parts[2]) if len(parts) == 3 and parts[0] == "layers" else None


def _to_published(sd: dict[str, torch.Tensor], args: Llama4Args) -> dict[str, torch.Tensor]:
    """One rank's module-named tensors → published names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        split = _ffn_prefix(name)
        if split is None:
            out[name] = t
            continue
        p, rest = split
        moe = args.is_moe_layer(int(p.split(".")[1]))
        if rest == "attention.wq.weight":
            out[p + "attention.wqkv.weight"] = torch.cat(
                [t, sd[p + "attention.wk.weight"], sd[p + "attention.wv.weight"]])
        elif rest in ("attention.wk.weight", "attention.wv.weight", "feed_forward.w3.weight"):
            continue  # stacked with wq / w1
        elif rest == "attention_norm.weight":
            out[p + "attention.wqkv.layer_norm_weight"] = t
        elif rest == "ffn_norm.weight":
            out[p + ("feed_forward.norm.weight" if moe else "feed_forward.mlp.layer_norm_weight")] = t
        elif rest in ("feed_forward.experts.w1", "feed_forward.experts.w3"):
            key = "moe_w_in_eD_F" if rest.endswith("w1") else "moe_w_swiglu_eD_F"
            out[p + "feed_forward.experts." + key] = t.reshape(-1, t.shape[-1])
        elif rest == "feed_forward.experts.w2":
            out[p + "feed_forward.experts.moe_w_out_eF_D"] = t.reshape(-1, t.shape[-1])
        elif rest.startswith("feed_forward.shared_expert."):
            key = {"w1": "w_in_shared_FD", "w3": "w_swiglu_FD", "w2": "w_out_shared_DF"}[rest.split(".")[2]]
            out[p + f"feed_forward.{key}.weight"] = t
        elif rest == "feed_forward.w1.weight":
            out[p + "feed_forward.mlp.fc1_weight"] = torch.cat([t, sd[p + "feed_forward.w3.weight"]])
        elif rest == "feed_forward.w2.weight":
            out[p + "feed_forward.mlp.fc2_weight"] = t
        else:
            out[name] = t
    return out


def _from_published(sd: dict[str, torch.Tensor], args: Llama4Args, ranks: int,
                    source: str) -> dict[str, torch.Tensor]:
    """One rank's published tensors → module names (llama-models' load hooks); module names pass."""
    out: dict[str, torch.Tensor] = {}
    hd, D = args.hd, args.dim
    q_rows, kv_rows = args.n_heads * hd // ranks, args.kv_heads * hd // ranks
    for name, t in sd.items():
        if any(d in name for d in _DROPPED):
            continue
        split = _ffn_prefix(name)
        p, rest = split if split else ("", name)
        if rest == "attention.wqkv.weight":
            if t.shape[0] != q_rows + 2 * kv_rows:
                raise HerdError(f"{source}: {name} has {t.shape[0]} rows, expected {q_rows + 2 * kv_rows} "
                                f"(n_heads {args.n_heads}, n_kv_heads {args.kv_heads}, {ranks} shard(s))")
            q, k, v = t.split([q_rows, kv_rows, kv_rows])
            out.update({p + "attention.wq.weight": q, p + "attention.wk.weight": k, p + "attention.wv.weight": v})
        elif rest == "attention.wqkv.layer_norm_weight":
            out[p + "attention_norm.weight"] = t
        elif rest in ("feed_forward.norm.weight", "feed_forward.mlp.layer_norm_weight"):
            out[p + "ffn_norm.weight"] = t
        elif rest.startswith("feed_forward.experts.moe_w_"):
            E = args.n_experts
            if t.ndim != 2 or t.shape[0] % E:
                raise HerdError(f"{source}: expert count mismatch: {name} of shape {tuple(t.shape)} does not hold "
                                f"num_experts={E} experts")
            key = {"moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3", "moe_w_out_eF_D": "w2"}.get(rest.split(".")[-1])
            if key is None:
                raise HerdError(f"{source}: unexpected tensor {name!r}")
            if key == "w2":
                out[p + "feed_forward.experts.w2"] = t.view(E, -1, t.shape[-1])
            else:
                if t.shape[0] != E * D:
                    raise HerdError(f"{source}: expert count mismatch: {name} has {t.shape[0]} rows, "
                                    f"num_experts={E} × dim={D} expected")
                out[p + f"feed_forward.experts.{key}"] = t.view(E, D, -1)
        elif rest in ("feed_forward.w_in_shared_FD.weight", "feed_forward.w_swiglu_FD.weight",
                      "feed_forward.w_out_shared_DF.weight"):
            key = {"w_in_shared_FD": "w1", "w_swiglu_FD": "w3", "w_out_shared_DF": "w2"}[rest.split(".")[1]]
            out[p + f"feed_forward.shared_expert.{key}.weight"] = t
        elif rest == "feed_forward.mlp.fc1_weight":
            w1, w3 = t.chunk(2, dim=0)
            out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = w1, w3
        elif rest == "feed_forward.mlp.fc2_weight":
            out[p + "feed_forward.w2.weight"] = t
        else:
            out[name] = t
    return out


def merge_llama4_shards(shards: list[dict[str, torch.Tensor]], args: Llama4Args,
                        source: str = "checkpoint") -> dict[str, torch.Tensor]:
    n = len(shards)
    ranks = [_from_published(s, args, n, f"{source} shard {i}") for i, s in enumerate(shards)]
    names = list(ranks[0])
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if any(name not in r for r in ranks[1:]):
            raise HerdError(f"{source}: model-parallel shards disagree on weight {name!r}")
        parts = [r[name] for r in ranks]
        dim = split_dim(name)
        if dim is None or n == 1:
            if n > 1 and any(not torch.equal(q, parts[0]) for q in parts[1:]):
                raise HerdError(f"{source}: replicated weight {name!r} differs between model-parallel shards")
            out[name] = parts[0]
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def split_llama4_shards(sd: dict[str, torch.Tensor], args: Llama4Args, n: int) -> list[dict[str, torch.Tensor]]:
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "moe_ffn_dim": args.moe_ffn_dim,
             "ffn_hidden_dim": args.ffn_hidden_dim, "vocab_size": args.vocab_size}
    if args.vision is not None:
        sizes.update(vision_n_heads=args.vision.n_heads, vision_mlp=args.vision.mlp_dim,
                     vision_output_dim=args.vision.output_dim)
    bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
    if bad:
        raise HerdError(f"cannot split into {n} model-parallel shards: {', '.join(bad)} not divisible")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in sd.items():
        dim = split_dim(name)
        pieces = [t] * n if dim is None else list(t.chunk(n, dim=dim))
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece
    return [_to_published(s, args) for s in shards]


# ---- directories ---------------------------------------------------------------------------------
def read_meta_llama4(path: str | Path, params: dict) -> tuple[Llama4Args, dict[str, torch.Tensor], dict]:
    from herd.checkpoint.meta import load_pth, shard_paths

    path = Path(path)
    args = llama4_args_from_params(params, str(path / PARAMS))
    shards = [load_pth(f) for f in shard_paths(path)]
    sd = merge_llama4_shards(shards, args, str(path))
    return args, check_llama4_state_dict(sd, args, str(path)), params


def write_meta_llama4(path: str | Path, args: Llama4Args, sd: dict[str, torch.Tensor], *,
                      model_parallel: int = 1, dtype: torch.dtype | None = None,
                      extra_files: dict[str, str] | None = None) -> None:
    """params.json + consolidated.NN.pth under the published names, atomically. The output weight
    is always written (Meta's model has no tied embeddings)."""
    from herd.checkpoint.meta import _own_storage

    sd = check_llama4_state_dict(sd, args, "model")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    shards = split_llama4_shards(sd, args, model_parallel)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / PARAMS).write_text(json.dumps(params_from_llama4_args(args), indent=2))
        for i, shard in enumerate(shards):
            torch.save({k: _own_storage(v) for k, v in shard.items()}, tmp / f"consolidated.{i:02d}.pth")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
