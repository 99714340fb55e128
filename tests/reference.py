"""Helpers that build a herd model and transformers' LlamaForCausalLM with the same weights."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from herd.checkpoint.hf import hf_config_from_args, to_hf_state_dict
from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer


def herd_and_hf(args: ModelArgs, seed: int = 0, std: float = 0.3):
    """(herd Transformer, transformers LlamaForCausalLM), same random weights, both in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=std)  # large weights: differences must not hide in tiny activations
    ref = LlamaForCausalLM(LlamaConfig(**hf_config_from_args(args))).eval()
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(model.state_dict(), args), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    if args.tie_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    return model.eval(), ref


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """The canonical state dict of a freshly initialized model."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model.state_dict()
