"""Tensor parallel on a model with projection biases (transformers' attention_bias / mlp_bias), two
gloo ranks on CPU against the same model in one process: DTensor's ColwiseParallel shards a bias
with its weight's output rows, RowwiseParallel keeps it whole and adds it once after the reduce
(added on each rank, the wo / w2 bias would count twice). Logits and every gradient must match."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from herd.models.args import ModelArgs
from herd.models.llama3 import Transformer

from .conftest import spawn_ranks

ARGS = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=72, rope_theta=10000.0,
                 max_seq_len=64, attention_bias=True, mlp_bias=True)


def _model() -> Transformer:
    g = torch.Generator().manual_seed(0)  # every rank builds the same weights
    model = Transformer(ARGS)
    model.init_weights(std=0.2, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # init_weights zeroes them: a doubled zero would not show
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _tp_job(_) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from herd.train.parallel import apply_tensor_parallel

    model = _model()
    ref = copy.deepcopy(model)
    apply_tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)),
                          loss_parallel=False)
    assert isinstance(model.layers[0].attention.wo.bias, DTensor)  # the plan did shard this block
    tokens = torch.randint(0, ARGS.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))  # 16 inputs: tp divides the sequence
    losses = []
    for m in (model, ref):
        logits = m(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, ARGS.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        losses.append((logits.detach(), loss.item()))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_tensor_parallel_biases_match_one_process():
    spawn_ranks(2, [(_tp_job, None, None)])
