"""Hugging Face Llama 4 text checkpoints (`Llama4ForCausalLM`, config `model_type` "llama4_text")
↔ herd's Llama 4 model (herd/models/llama4.py), at the boundary (DESIGN principle 4).

Differences from the dense HF mapping (hf.py):
- No q/k row permutation: HF's Llama 4 applies RoPE as a complex product over adjacent pairs
  (`apply_rotary_emb`), which is Meta's layout, i.e. herd's.
- MoE layers: HF `feed_forward.router.weight` (E, D) is Meta's `router_DE` transposed; HF fuses the
  experts' gate and up matrices as `experts.gate_up_proj` (E, D, 2F), gate first, and stores
  `experts.down_proj` (E, F, D) — Meta's w1 | w3 and w2 with the same (in, out) orientation.
- Dense layers keep `feed_forward.{gate,up,down}_proj` (HF names them under feed_forward, not mlp).
- Multimodal `Llama4ForConditionalGeneration` directories (model_type "llama4"): the text model's
  names carry a `language_model.` prefix; the vision tower (`vision_model.*`,
  `multi_modal_projector.linear_1`) maps name for name onto Meta's `vision_embeddings.*` and
  `vision_projection` (herd/models/vision.py). Its q/k rows need no permutation either (HF's
  vision RoPE is the same complex product). A directory whose config has a vision_config loads as
  `Llama4Multimodal`; without one, vision tensors present are an error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.common import (
    check_layer_count,
    check_shapes,
    config_bool,
    config_int,
    read_json_config,
    read_safetensors_dir,
    write_safetensors_dir,
)
from herd.checkpoint.hf import hf_rope_scaling, refuse_biases, rope_from_hf_config
from herd.errors import HerdError
from herd.models.llama4 import Llama4Args, VisionArgs

_ATTN = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
         "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
         "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
_DENSE = {"feed_forward.w1.weight": "feed_forward.gate_proj.weight",
          "feed_forward.w3.weight": "feed_forward.up_proj.weight",
          "feed_forward.w2.weight": "feed_forward.down_proj.weight"}
_SHARED = {"feed_forward.shared_expert.w1.weight": "feed_forward.shared_expert.gate_proj.weight",
           "feed_forward.shared_expert.w3.weight": "feed_forward.shared_expert.up_proj.weight",
           "feed_forward.shared_expert.w2.weight": "feed_forward.shared_expert.down_proj.weight"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


# Vision tower: Meta name ↔ HF name (Meta's prefix VE below; HF's vision_model.).
_VE = "vision_embeddings.vision_encoder."
_VISION_TOP = {_VE + "conv1._linear.weight": "vision_model.patch_embedding.linear.weight",
               _VE + "class_embedding": "vision_model.class_embedding",
               _VE + "positional_embedding_vlm": "vision_model.positional_embedding_vlm",
               _VE + "ln_pre.weight": "vision_model.layernorm_pre.weight",
               _VE + "ln_pre.bias": "vision_model.layernorm_pre.bias",
               _VE + "ln_post.weight": "vision_model.layernorm_post.weight",
               _VE + "ln_post.bias": "vision_model.layernorm_post.bias",
               "vision_embeddings.vision_adapter.mlp.c_fc.weight": "vision_model.vision_adapter.mlp.fc1.weight",
               "vision_embeddings.vision_adapter.mlp.c_proj.weight": "vision_model.vision_adapter.mlp.fc2.weight",
               "vision_projection.weight": "multi_modal_projector.linear_1.weight"}
_VISION_LAYER = {f"{m}.{w}": f"{h}.{w}" for m, h in (
    ("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"), ("attn.wv", "self_attn.v_proj"),
    ("attn.wo", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
    ("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")) for w in ("weight", "bias")}
_VISION_FROM_TOP = {v: k for k, v in _VISION_TOP.items()}
_VISION_FROM_LAYER = {v: k for k, v in _VISION_LAYER.items()}
_VISION_HF_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


def vision_to_hf_name(name: str) -> str:
    if name in _VISION_TOP:
        return _VISION_TOP[name]
    idx, rest = name[len(_VE + "transformer.resblocks."):].split(".", 1)
    return f"vision_model.model.layers.{idx}.{_VISION_LAYER[rest]}"


def vision_from_hf_name(name: str) -> str | None:
    name = name.removeprefix("model.")
    if name in _VISION_FROM_TOP:
        return _VISION_FROM_TOP[name]
    if name.startswith("vision_model.model.layers."):
        idx, rest = name[len("vision_model.model.layers."):].split(".", 1)
        if idx.isdigit() and rest in _VISION_FROM_LAYER:
            return f"{_VE}transformer.resblocks.{idx}.{_VISION_FROM_LAYER[rest]}"
    return None


def vision_args_from_hf_config(cfg: dict, source: str = "config.json") -> VisionArgs:
    v = cfg["vision_config"]
    try:
        dim, ratio = int(v["hidden_size"]), float(v.get("pixel_shuffle_ratio", 0.5))
        inter = int(v.get("intermediate_size", 5632))
        out = int(v.get("vision_output_dim", 7680))
        # transformers sizes the adapter's first linear by intermediate_size and its second and the
        # projector by projector_*_dim / vision_output_dim; Meta's model has one width for each.
        if round(dim / ratio ** 2) != inter:
            raise HerdError(f"{source}: vision intermediate_size {inter} must equal hidden_size/pixel_shuffle_ratio² "
                            f"({round(dim / ratio ** 2)}) as in the released models")
        if int(v.get("projector_input_dim", out)) != out or int(v.get("projector_output_dim", out)) != out:
            raise HerdError(f"{source}: vision projector_input_dim, projector_output_dim and vision_output_dim "
                            "must be equal (as in the released models)")
        theta, _ = rope_from_hf_config(v, source, default_theta=10000.0)
        return VisionArgs(image_size=int(v.get("image_size", 448)), patch_size=int(v.get("patch_size", 14)),
                          dim=dim, n_layers=int(v["num_hidden_layers"]), n_heads=int(v["num_attention_heads"]),
                          mlp_ratio=inter / dim, output_dim=out, pixel_shuffle_ratio=ratio, rope_theta=theta,
                          image_token_id=int(cfg.get("image_token_index", 200092)),
                          max_tiles=int(v.get("max_patches", 16)))
    except KeyError as e:
        raise HerdError(f"{source}: vision_config is missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise HerdError(f"{source}: vision_config has a malformed value ({type(e).__name__}: {e})") from None


def hf_vision_config(v: VisionArgs) -> dict:
    return {"model_type": "llama4_vision_model", "hidden_size": v.dim, "num_hidden_layers": v.n_layers,
            "num_attention_heads": v.n_heads, "intermediate_size": v.mlp_dim, "image_size": v.image_size,
            "patch_size": v.patch_size, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
            "vision_output_dim": v.output_dim, "projector_input_dim": v.output_dim,
            "projector_output_dim": v.output_dim, "hidden_act": "gelu", "num_channels": 3, "norm_eps": v.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
            # the image processor's setting (preprocessor_config.json's max_patches), kept with the model
            "max_patches": v.max_tiles}


def is_llama4_config(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") in ("llama4_text", "llama4") or any(a.startswith("Llama4") for a in archs)


# ---- config --------------------------------------------------------------------------------------
def _int_or(value, default: int) -> int:
    return default if value is None else int(value)


def _temperature_tuning(cfg: dict) -> bool:
    """attn_temperature_tuning as transformers computed it. The released Scout and Maverick
    config.json files (and the fine-tunes saved from them) say `"attn_temperature_tuning": 4`:
    transformers 4.51's Llama4TextConfig defaulted it to the int 4, and its attention tests only
    truthiness (`if self.attn_temperature_tuning and not self.use_rope`, modeling_llama4.py, still so in
    5.x). Refusing the int refused every released Llama 4 checkpoint; a whole number is read as
    transformers read it (0 off, anything else on). Strings and the like stay errors."""
    value = cfg.get("attn_temperature_tuning")
    if isinstance(value, int) and not isinstance(value, bool):
        return value != 0
    return config_bool(cfg, "attn_temperature_tuning", True)


def _heads(cfg: dict, n_heads: int) -> tuple[int, int]:
    """(n_kv_heads, head_dim) with transformers' Llama4TextConfig defaults: a key that is *absent*
    takes the class default (num_key_value_heads 8, head_dim 128, configuration_llama4.py), one
    that is null is derived (n_heads; hidden_size // n_heads), as its __post_init__ does. herd used
    to derive both when absent, so a config.json without head_dim (transformers: 128) was refused
    with a shape mismatch against weights transformers itself loads."""
    kv = cfg.get("num_key_value_heads", 8)
    hd = cfg.get("head_dim", 128)
    return (n_heads if kv is None else config_int(cfg, "num_key_value_heads", 8),
            config_int(cfg, "hidden_size") // n_heads if hd is None else config_int(cfg, "head_dim", 128))


def llama4_args_from_hf_config(cfg: dict, source: str = "config.json") -> Llama4Args:
    vision = None
    if cfg.get("model_type") == "llama4" or "text_config" in cfg:
        if cfg.get("vision_config"):
            vision = vision_args_from_hf_config(cfg, source)
        cfg = cfg.get("text_config") or {}
    refuse_biases(cfg, source)
    if cfg.get("hidden_act", "silu") != "silu":  # the experts and dense layers compute SwiGLU with SiLU
        raise HerdError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported (Llama 4 uses silu)")
    try:
        n_layers = config_int(cfg, "num_hidden_layers")
        # Absent or null: transformers' defaults (1 here, 4 for the NoPE interval below). A 0 is kept
        # so that Llama4Args refuses it: `or` used to turn it into the default silently.
        step = _int_or(cfg.get("interleave_moe_layer_step"), 1)
        moe_layers = cfg.get("moe_layers")
        if moe_layers:
            # transformers takes an explicit list over the step; herd's model knows only "every
            # step-th layer", which a regular list (e.g. [1, 3] of 4 layers: step 2) still is.
            step = int(moe_layers[0]) + 1
        elif moe_layers is not None and step <= n_layers:
            # An explicit empty list: every layer dense (`layer_idx in config.moe_layers` is never
            # true in Llama4TextDecoderLayer), whatever the step says; it used to be refused as "not
            # every n-th layer". A step past the last layer says the same to herd's model.
            step = n_layers + 1
        # compared lazily: a config of 10**9 layers listed them all (a step < 1 is Llama4Args' to refuse)
        every = range(step - 1, n_layers, step) if step > 0 else range(0)
        if moe_layers is not None and (len(moe_layers) != len(every)
                                       or any(int(i) != j for i, j in zip(moe_layers, every, strict=True))):
            raise HerdError(f"{source}: moe_layers {moe_layers} is not every n-th layer (layers n-1, 2n-1, ...); "
                            "unsupported")
        interval: int | None = _int_or(cfg.get("no_rope_layer_interval"), 4)
        # no_rope_layers[i] is 1 where layer i *uses* RoPE (transformers' naming). An explicit list
        # wins over the interval in transformers; herd's model knows only "every n-th layer is
        # NoPE", so the list's period is read off it (all ones: no NoPE layer) and checked.
        no_rope = [int(x) for x in cfg.get("no_rope_layers") or []][:n_layers]
        if no_rope:
            interval = no_rope.index(0) + 1 if 0 in no_rope else None
        def uses_rope(n: int) -> list[int]:
            """Whether each of the first n layers uses RoPE; only as many as a list given in the config
            holds (a shorter list cannot match), not all n_layers: 10**9 layers made a list of them."""
            return [int(not interval or (i + 1) % interval != 0) for i in range(min(n, n_layers))]

        if no_rope and (len(no_rope) != n_layers or no_rope != uses_rope(len(no_rope))):
            raise HerdError(f"{source}: no_rope_layers {no_rope} is not every n-th layer NoPE (unsupported)")
        theta, scaling = rope_from_hf_config(cfg, source, default_theta=500000.0)
        # Llama 4's mappings (HF and Meta) write llama3's fields and dynamic NTK's factor only
        if scaling is not None and scaling.kind not in ("llama3", "dynamic"):
            raise HerdError(f"{source}: RoPE scaling type {scaling.kind!r} is not supported for Llama 4 "
                            "(llama3, dynamic or none)")
        n_heads = config_int(cfg, "num_attention_heads")
        n_kv_heads, head_dim = _heads(cfg, n_heads)
        chunk = cfg.get("attention_chunk_size", 8192)
        # transformers attends by `layer_types`, which it derives as chunked on the RoPE layers when
        # there is a chunk size; a saved list that says otherwise would be computed differently.
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if all(t == "full_attention" for t in layer_types):
                chunk = None
            elif len(layer_types) != n_layers or list(layer_types) != [
                    "chunked_attention" if u and chunk is not None else "full_attention"
                    for u in uses_rope(len(layer_types))]:
                raise HerdError(f"{source}: layer_types {layer_types} is not chunked attention on exactly the "
                                "RoPE layers (unsupported)")
        return Llama4Args(
            dim=config_int(cfg, "hidden_size"), n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv_heads, head_dim=head_dim,
            vocab_size=config_int(cfg, "vocab_size"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=config_int(cfg, "max_position_embeddings", 131072),
            tie_embeddings=config_bool(cfg, "tie_word_embeddings", False),
            n_experts=config_int(cfg, "num_local_experts"), top_k=config_int(cfg, "num_experts_per_tok", 1),
            moe_every=step, moe_ffn_dim=config_int(cfg, "intermediate_size"),
            ffn_hidden_dim=config_int(cfg, "intermediate_size_mlp", 16384),
            nope_every=interval, attention_chunk_size=None if chunk is None else int(chunk),
            qk_norm=config_bool(cfg, "use_qk_norm", True),
            attn_temperature_tuning=_temperature_tuning(cfg),
            floor_scale=float(cfg.get("floor_scale", 8192)), attn_scale=float(cfg.get("attn_scale", 0.1)),
            vision=vision,
        )
    except KeyError as e:
        raise HerdError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise HerdError(f"{source}: malformed value ({type(e).__name__}: {e})") from None


def hf_config_from_llama4_args(args: Llama4Args, extra: dict | None = None) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:  # llama3, or dynamic NTK (plain RoPE in herd; kept for transformers)
        rope = {**hf_rope_scaling(args.rope_scaling), "rope_theta": args.rope_theta}
    cfg = {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.hd, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_parameters": rope,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "num_local_experts": args.n_experts, "num_experts_per_tok": args.top_k,
        "interleave_moe_layer_step": args.moe_every, "intermediate_size": args.moe_ffn_dim,
        "intermediate_size_mlp": args.ffn_hidden_dim,
        "no_rope_layer_interval": args.nope_every or args.n_layers + 1,
        "attention_chunk_size": args.attention_chunk_size, "use_qk_norm": args.qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning,
        # transformers types floor_scale as int (the released configs say 8192)
        "floor_scale": int(args.floor_scale) if float(args.floor_scale).is_integer() else args.floor_scale,
        "attn_scale": args.attn_scale, "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
    }
    if args.nope_every is None:
        # No NoPE layer. transformers types the interval as an int, so n_layers + 1 stands for
        # "none" above, but read back that is nope_every=n_layers + 1, not None: the HF round trip
        # changed the args (same logits, unequal Llama4Args). The explicit list (all layers RoPE),
        # which transformers prefers over the interval, reads back as None.
        cfg["no_rope_layers"] = [1] * args.n_layers
    if args.vision is not None:  # Llama4ForConditionalGeneration: the text config nests
        cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
               "text_config": cfg, "vision_config": hf_vision_config(args.vision),
               "image_token_index": args.vision.image_token_id, "tie_word_embeddings": args.tie_embeddings,
               "torch_dtype": cfg["torch_dtype"]}
    cfg.update(extra or {})
    return cfg


# ---- weights -------------------------------------------------------------------------------------
def expected_llama4_shapes(args: Llama4Args) -> dict[str, tuple[int, ...]]:
    d, hd, E, f = args.dim, args.hd, args.n_experts, args.moe_ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (args.n_heads * hd, d),
                       p + "attention.wk.weight": (args.kv_heads * hd, d),
                       p + "attention.wv.weight": (args.kv_heads * hd, d),
                       p + "attention.wo.weight": (d, args.n_heads * hd),
                       p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)})
        if args.is_moe_layer(i):
            shapes.update({p + "feed_forward.router_DE": (d, E),
                           p + "feed_forward.experts.w1": (E, d, f), p + "feed_forward.experts.w3": (E, d, f),
                           p + "feed_forward.experts.w2": (E, f, d),
                           p + "feed_forward.shared_expert.w1.weight": (f, d),
                           p + "feed_forward.shared_expert.w3.weight": (f, d),
                           p + "feed_forward.shared_expert.w2.weight": (d, f)})
        else:
            F = args.ffn_hidden_dim
            shapes.update({p + "feed_forward.w1.weight": (F, d), p + "feed_forward.w3.weight": (F, d),
                           p + "feed_forward.w2.weight": (d, F)})
    if args.vision is not None:
        shapes.update(expected_vision_shapes(args.vision, d))
    return shapes


def expected_vision_shapes(v: VisionArgs, text_dim: int) -> dict[str, tuple[int, ...]]:
    """The vision tower's names and shapes, read off the module built on the meta device (free)."""
    from herd.models.vision import VisionEmbeddings

    with torch.device("meta"):
        sd = VisionEmbeddings(v).state_dict(prefix="vision_embeddings.")
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    shapes["vision_projection.weight"] = (text_dim, v.output_dim)
    return shapes


def check_llama4_state_dict(sd: dict[str, torch.Tensor], args: Llama4Args, source: str) -> dict[str, torch.Tensor]:
    """Names and shapes against `args`, one-line HerdError on the first problem (expert-count
    mismatches named as such); returns the dict with a tied output.weight dropped."""
    sd = dict(sd)
    if args.tie_embeddings:
        sd.pop("output.weight", None)

    def expert_hint(k: str, got: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
        if ".experts." in k and got[1:] == shape[1:]:
            return f"expert count mismatch: {k} holds {got[0]} experts, config says num_local_experts={args.n_experts}"
        if k.endswith("router_DE") and got[0] == shape[0]:
            return f"expert count mismatch: {k} routes to {got[1]} experts, config says num_local_experts={args.n_experts}"
        return None

    check_layer_count(sd, args.n_layers, source)
    return check_shapes(sd, expected_llama4_shapes(args), source,
                        f"this {args.n_layers}-layer Llama 4 config", expert_hint)


def _hf_layer_name(rest: str) -> str | None:
    return _ATTN.get(rest) or _DENSE.get(rest) or _SHARED.get(rest)


_FROM_LAYER = {v: k for m in (_ATTN, _DENSE, _SHARED) for k, v in m.items()}
_FROM_TOP = {v: k for k, v in _TOP.items()}


def from_hf_llama4_state_dict(hf: dict[str, torch.Tensor], args: Llama4Args,
                              source: str = "HF checkpoint") -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name.startswith(_VISION_HF_PREFIXES):
            meta = vision_from_hf_name(name)
            if meta is None or args.vision is None:
                why = "no vision_config in the config" if args.vision is None else "unknown vision tensor"
                raise HerdError(f"{source}: unexpected tensor {name!r} ({why})")
            sd[meta] = t
            continue
        name = name.replace("language_model.model.", "model.").replace("language_model.lm_head.", "lm_head.")
        name = name.replace("model.language_model.", "model.")
        if name in _FROM_TOP:
            sd[_FROM_TOP[name]] = t
            continue
        parts = name.split(".", 3)
        if len(parts) != 4 or parts[:2] != ["model", "layers"]:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise HerdError(f"{source}: unexpected tensor {name!r} in HF Llama 4 checkpoint")
        p, rest = f"layers.{parts[2]}.", parts[3]
        if rest in _FROM_LAYER:
            sd[p + _FROM_LAYER[rest]] = t
        elif rest == "feed_forward.router.weight":
            sd[p + "feed_forward.router_DE"] = t.t()
        elif rest == "feed_forward.experts.gate_up_proj":
            if t.ndim != 3 or t.shape[-1] % 2:
                raise HerdError(f"{source}: {name} has shape {tuple(t.shape)}, expected (experts, dim, 2·ffn)")
            w1, w3 = t.chunk(2, dim=-1)
            sd[p + "feed_forward.experts.w1"], sd[p + "feed_forward.experts.w3"] = w1, w3
        elif rest == "feed_forward.experts.down_proj":
            sd[p + "feed_forward.experts.w2"] = t
        else:
            raise HerdError(f"{source}: unexpected tensor {name!r} in HF Llama 4 checkpoint")
    return check_llama4_state_dict(sd, args, source)


def to_hf_llama4_state_dict(sd: dict[str, torch.Tensor], args: Llama4Args) -> dict[str, torch.Tensor]:
    sd = check_llama4_state_dict(sd, args, "model")
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith(("vision_embeddings.", "vision_projection.")):
            out[vision_to_hf_name(name)] = t.contiguous()
            continue
        if name in _TOP:
            out[_TOP[name]] = t.contiguous()
            continue
        _, idx, rest = name.split(".", 2)
        p = f"model.layers.{idx}."
        if (hf := _hf_layer_name(rest)) is not None:
            out[p + hf] = t.contiguous()
        elif rest == "feed_forward.router_DE":
            out[p + "feed_forward.router.weight"] = t.t().contiguous()
        elif rest == "feed_forward.experts.w1":
            out[p + "feed_forward.experts.gate_up_proj"] = torch.cat(
                [t, sd[f"layers.{idx}.feed_forward.experts.w3"]], dim=-1).contiguous()
        elif rest == "feed_forward.experts.w2":
            out[p + "feed_forward.experts.down_proj"] = t.contiguous()
        elif rest != "feed_forward.experts.w3":  # fused into gate_up_proj with w1
            raise HerdError(f"no HF Llama 4 name for {name!r}")
    if args.vision is not None:  # Llama4ForConditionalGeneration nests the text model
        out = {(k if k.startswith(("vision_model.", "multi_modal_projector.")) else
                "language_model." + k): t for k, t in out.items()}
    return out


# ---- directories ---------------------------------------------------------------------------------
def read_hf_llama4(path: str | Path, cfg: dict | None = None) -> tuple[Llama4Args, dict[str, torch.Tensor], dict]:
    """→ (args, herd state dict, the raw config.json) of a HF Llama 4 directory."""
    path = Path(path)
    if cfg is None:
        cfg = read_json_config(path)
    args = llama4_args_from_hf_config(cfg, str(path / "config.json"))
    hf = read_safetensors_dir(path)
    return args, from_hf_llama4_state_dict(hf, args, str(path)), cfg


def write_hf_llama4(path: str | Path, args: Llama4Args, sd: dict[str, torch.Tensor], *,
                    max_shard_bytes: int = 5 * 2**30, config_extra: dict | None = None) -> None:
    """Write a directory `Llama4ForCausalLM.from_pretrained` loads; shards with an index above
    `max_shard_bytes`."""
    write_safetensors_dir(path, hf_config_from_llama4_args(args, config_extra), to_hf_llama4_state_dict(sd, args),
                          max_shard_bytes=max_shard_bytes)
