"""Fixtures for checkpoint tests: Meta's reference Llama 3 code from the installed llama-models."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
from torch import nn


class _ColumnParallelLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, gather_output=True, init_method=None, **_):
        super().__init__(in_features, out_features, bias=bias)


class _RowParallelLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, input_is_parallel=False, init_method=None, **_):
        super().__init__(in_features, out_features, bias=bias)


class _VocabParallelEmbedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, init_method=None, **_):
        super().__init__(num_embeddings, embedding_dim)


@pytest.fixture
def meta_reference():
    """(llama_models.llama3.model, llama_models.llama3.args, llama_models.checkpoint), importable on
    one CPU process: at model-parallel world size 1 fairscale's Column/RowParallelLinear and
    VocabParallelEmbedding are exactly nn.Linear / nn.Embedding, so these stand-ins change no
    arithmetic. (llama-models does not install fairscale; its real layers need torch.distributed.)"""
    pytest.importorskip("llama_models")
    initialize = types.ModuleType("fairscale.nn.model_parallel.initialize")
    initialize.get_model_parallel_world_size = lambda: 1
    initialize.get_model_parallel_rank = lambda: 0
    layers = types.ModuleType("fairscale.nn.model_parallel.layers")
    layers.ColumnParallelLinear = _ColumnParallelLinear
    layers.RowParallelLinear = _RowParallelLinear
    layers.VocabParallelEmbedding = _VocabParallelEmbedding
    stubs = {"fairscale": types.ModuleType("fairscale"), "fairscale.nn": types.ModuleType("fairscale.nn"),
             "fairscale.nn.model_parallel": types.ModuleType("fairscale.nn.model_parallel"),
             "fairscale.nn.model_parallel.initialize": initialize, "fairscale.nn.model_parallel.layers": layers}
    stubs["fairscale.nn.model_parallel"].initialize = initialize
    stubs["fairscale.nn.model_parallel"].layers = layers
    uses_stubs = ("llama_models.llama3.model", "llama_models.checkpoint")
    saved = {name: sys.modules.get(name) for name in (*stubs, *uses_stubs)}
    sys.modules.update(stubs)
    for name in uses_stubs:
        sys.modules.pop(name, None)
    try:
        yield (importlib.import_module("llama_models.llama3.model"),
               importlib.import_module("llama_models.llama3.args"),
               importlib.import_module("llama_models.checkpoint"))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
