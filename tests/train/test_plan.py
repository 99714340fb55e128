"""`herd plan` against published figures: the paper's 405B run (SPEC §3; paper Table 4: 8,192
H100s as TP 8 × PP 16 × DP 64, sequence 8,192, 32 sequences per DP rank = 16M tokens per step,
430 TFLOP/s = 43% MFU; 3.8e25 FLOPs for 405B on 15.6T tokens, §3.2.1) and torchtitan's
performance table (Llama 3.1 8B, FSDP on 8 H100s, local batch 2 × 8,192, selective AC: 82.4 GiB,
5,762 tokens/s/GPU; with torch.compile 6,667 — "33% to 39% MFU")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from herd.errors import HerdError
from herd.models.args import get_preset
from herd.train.config import load_config
from herd.train.parallel import ParallelConfig
from herd.train.plan import H100_BF16_PEAK, H100_MEMORY, GiB, plan

PAPER_405B = ParallelConfig(tp=8, pp=16, dp_shard=64)  # one sequence per micro-batch


def test_paper_405b_layout_fits_an_h100_and_makes_16m_token_steps():
    p = plan(get_preset("llama3-405b"), PAPER_405B, None, 8192, rows_per_dp=32, mfu=0.43)
    assert p.world == 8192
    assert p.tokens_per_step == 64 * 32 * 8192  # Table 4: 16M tokens per batch
    assert p.total_bytes <= H100_MEMORY, p.total_bytes / GiB
    assert p.activations_bytes > 0.5 * p.total_bytes  # pipelining trades activations for weights
    assert 430e12 / H100_BF16_PEAK == pytest.approx(0.43, abs=0.01)  # Table 4's TFLOP/s ↔ MFU pairing
    # halving the pipeline (PP 8, DP 128) doubles each stage's layers and weights; with 1F1B the
    # first stage then holds 8 micro-batches of 16 layers instead of 16 of 8: the same activations
    half = plan(get_preset("llama3-405b"), ParallelConfig(tp=8, pp=8, dp_shard=128, pp_microbatches=32), None,
                8192, rows_per_dp=32)
    assert half.stage_layers == 16 and half.params_bytes > 1.8 * p.params_bytes
    assert half.activations_bytes == pytest.approx(p.activations_bytes, rel=1e-9)
    # §3.2.1: 405B parameters on 15.6T tokens ≈ 3.8e25 FLOPs
    assert p.flops_per_token * 15.6e12 == pytest.approx(3.8e25, rel=0.06)


def test_torchtitan_8b_fsdp_memory_and_mfu():
    args = get_preset("llama3-8b")
    p = plan(args, ParallelConfig(dp_shard=8, activation_checkpoint="selective"), None, 8192, rows_per_dp=2)
    # torchtitan's figure is the allocator's peak reservation (fragmentation included) and its
    # selective AC saves every other matmul: the arithmetic lands within 15%.
    assert p.total_bytes / GiB == pytest.approx(82.4, rel=0.15)
    assert p.optimizer_bytes == pytest.approx(8 * args.num_params() / 8)
    # torchtitan counts attention over the full T×T square (12·L·H·hd·T per token), herd the causal half
    full_square = p.flops_per_token + 3 * 2 * 2 * args.n_layers * args.n_heads * args.hd * 8192 / 2
    assert 5762 * full_square / H100_BF16_PEAK == pytest.approx(0.33, abs=0.015)
    assert 6667 * full_square / H100_BF16_PEAK == pytest.approx(0.39, abs=0.015)


def test_activation_checkpointing_and_tp_shrink_activations():
    args = get_preset("llama3-70b")
    by_mode = {m: plan(args, ParallelConfig(tp=8, dp_shard=4, activation_checkpoint=m), None, 8192).activations_bytes
               for m in ("none", "selective", "full")}
    assert by_mode["none"] > by_mode["selective"] > by_mode["full"]
    no_tp = plan(args, ParallelConfig(dp_shard=32), None, 8192).activations_bytes
    assert no_tp == pytest.approx(8 * by_mode["none"], rel=1e-9)


def test_plan_cli_prints_memory_and_refuses_bad_layouts():
    cmd = [sys.executable, "-m", "herd", "plan", "--model", "llama3-405b", "--parallel.tp=8", "--parallel.pp=16",
           "--parallel.dp_shard=64", "--seq", "8192", "--batch", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for word in ("parameters", "gradients", "optimizer", "activations", "GFLOP/token", "8,192 GPUs"):
        assert word in out
    bad = subprocess.run(cmd[:6] + ["--parallel.tp=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("herd: error: tp=3 must divide n_heads")
    with pytest.raises(HerdError, match="micro-batches"):
        plan(get_preset("llama3-8b"), ParallelConfig(pp=4, dp_shard=2, pp_microbatches=3), None, 8192, rows_per_dp=4)
    # without --batch, a pipelined layout is priced at the fewest sequences it runs (one per stage)
    out = subprocess.run(cmd[:9], capture_output=True, text=True, check=True).stdout
    assert "16 sequences per data-parallel rank in 16 micro-batch(es)" in out


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,world", [("llama3-8b", 128), ("llama3-70b", 512), ("llama3-405b", 8192)])
def test_cluster_configs_follow_the_paper_schedule_and_fit_an_h100(name, world):
    """SPEC §3.4: 4M tokens per step at sequence 4,096, 8M at 8,192 after 252M tokens, 16M after
    2.87T tokens; every phase splits evenly over the data-parallel ranks and fits in memory."""
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    t, d = cfg.train, cfg.parallel.degrees(world)
    shapes = [(0, t.batch_size, t.seq_len), *t.batch_schedule]
    tokens = [b * t.grad_accum * s for _, b, s in shapes]
    assert tokens == [4 * 2**20, 8 * 2**20, 16 * 2**20]
    (s1, _, _), (s2, _, _) = t.batch_schedule
    assert abs(s1 * tokens[0] - 252e6) < tokens[0]
    assert abs(s1 * tokens[0] + (s2 - s1) * tokens[1] - 2.87e12) < tokens[1]
    peak_lr = {"llama3-8b": 3e-4, "llama3-70b": 1.5e-4, "llama3-405b": 8e-5}[name]  # SPEC §1
    assert (cfg.optim.lr, t.steps, cfg.schedule.warmup_steps) == (peak_lr, 1_200_000, 8000)
    dp = d["dp_replicate"] * d["dp_shard"]
    for _, b, s in shapes:
        assert b % dp == 0
        p = plan(get_preset(name), cfg.parallel, world, s, rows_per_dp=b // dp)
        assert p.total_bytes <= H100_MEMORY, (name, s, b, p.total_bytes / GiB)


@pytest.mark.parametrize("argv, match", [
    (["--model", "llama3-8b", "--world", "0"], "--world must be a positive number"),
    (["--model", "llama3-8b", "--world", "-8"], "--world must be a positive number"),
    (["--model", "llama3-8b", "--seq", "100000000000"], "exceeds the model's max_seq_len"),
])
def test_plan_refuses_impossible_sizes(argv, match, capsys):
    from herd.cli import main

    assert main(["plan", *argv]) == 2
    assert match in capsys.readouterr().err


def test_paper_405b_numbers_by_hand():
    # Hand arithmetic from SPEC §1's 405B shape (dim 16384, 126 layers, FFN 53248, 128/8 heads of
    # 128, vocabulary 128256): one block holds q,k,v (16384·128·144), o (16384²), w1,w2,w3
    # (3·16384·53248) and two norms; PP 16 puts 8 layers on stage 0, which also holds the embedding.
    block = 16384 * 128 * 144 + 16384 * 16384 + 3 * 16384 * 53248 + 2 * 16384
    stage = (8 * block + 128256 * 16384) // 8  # ÷ TP 8
    p = plan(get_preset("llama3-405b"), PAPER_405B, None, 8192, rows_per_dp=32)
    assert p.stage_layers == 8 and p.stage_params == stage == 3_450_372_096
    assert p.grads_bytes == 4 * stage / 64 and p.optimizer_bytes == 8 * stage / 64  # sharded over DP 64
    # activations, no checkpointing: 4D + qkv + attention out + 3F bf16 elements per token per layer
    # ÷ TP, one sequence per micro-batch, 16 in flight on the first stage (1F1B), + one micro-batch's
    # logits (bf16 + fp32 + fp32 grad) over the vocabulary ÷ TP
    per_token_layer = (4 * 16384 + 144 * 128 + 128 * 128 + 3 * 53248) * 2 / 8
    assert p.activations_bytes == per_token_layer * 8192 * 8 * 16 + 8192 * 128256 / 8 * 10
    # 6·(N − embedding table) + 12·layers·dim·seq/2 FLOPs per token; 16M tokens over 8,192 GPUs
    n = 126 * block + 2 * 128256 * 16384 + 16384
    assert p.flops_per_token == 6 * (n - 128256 * 16384) + 12 * 126 * 16384 * 4096
    assert p.flops_per_gpu_per_step == p.flops_per_token * 64 * 32 * 8192 / 8192


@pytest.mark.parametrize("preset, cfg, batch, match", [
    # each of these `herd pretrain` refuses (Parallel.check); the plan used to price them anyway
    ("llama3-8b", ParallelConfig(ep=2, dp_shard=2), 1, "needs a mixture-of-experts model"),
    ("llama3-8b", ParallelConfig(pp=4, dp_shard=1), 2, r"at least pp=4 \(give --batch 4 or more\)"),
    ("llama3-8b", ParallelConfig(pp=4, dp_shard=1, pp_microbatches=2), 4, "at least pp=4"),
    ("smollm2-135m", ParallelConfig(pp=2, dp_shard=1), 2, "tied embeddings"),
    ("smollm2-135m", ParallelConfig(tp=3, dp_shard=1), 1, "tied embeddings"),
])
def test_plan_refuses_what_training_refuses(preset, cfg, batch, match):
    with pytest.raises(HerdError, match=match):
        plan(get_preset(preset), cfg, None, 3072, rows_per_dp=batch)
