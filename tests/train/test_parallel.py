"""4D parallelism on CPU with gloo (DESIGN principle 10: sharded against unsharded, as torchtitan's
DTensorTestBase does): FSDP (also with tied embeddings), TP (+SP, loss parallel), PP (1F1B, interleaved, GPipe), FSDP×TP,
PP×FSDP, PP×TP, HSDP and FSDP on Llama 4's MoE model train to the same per-step losses, gradient norms and validation loss as one process (fp32,
relative difference ≤ 1e-5); a checkpoint saved under FSDP over 4 ranks resumes under TP×FSDP and
in one process with the same next-step loss.

One group of worker processes per world size runs every layout in turn (process start-up dominates
on a small CPU box); the reference runs in the test process itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from herd.errors import HerdError
from herd.train import dist_checkpoint
from herd.train.config import load_config
from herd.train.loop import Trainer, pretrain
from herd.train.parallel import ParallelConfig, apply_expert_parallel, split_layers

from .conftest import debug_overrides, spawn_ranks

STEPS = 4
# A fixed decay horizon: the LR of a step must not depend on train.steps, so a run stopped after 3
# steps and resumed to 4 follows the 4-step run exactly.
COMMON = {"train.steps": STEPS, "schedule.decay_steps": 10, "train.batch_size": 4, "train.seq_len": 32}

# name → (world size, extra overrides)
LAYOUTS = {
    "fsdp2_ac_full": (2, {"parallel.dp_shard": 2, "parallel.activation_checkpoint": '"full"'}),
    "tp2_ac_selective": (2, {"parallel.tp": 2, "parallel.activation_checkpoint": '"selective"'}),
    "pp2_1f1b": (2, {"parallel.pp": 2}),
    "pp2_interleaved": (2, {"parallel.pp": 2, "parallel.pp_schedule": '"interleaved_1f1b"', "model.n_layers": 4}),
    # the batch shape changes at step 2 (SPEC §3.4's schedule): the stages are rebuilt for it
    "pp2_gpipe_reshape": (2, {"parallel.pp": 2, "parallel.pp_schedule": '"gpipe"', "train.batch_schedule": "[[2, 8, 16]]"}),
    # Llama 4 (MoE with routed experts, NoPE/chunked attention) sharded by FSDP2
    "llama4_fsdp2": (2, {"parallel.dp_shard": 2, "model.preset": '"llama4-debug"', "model.n_experts": 4}),
    # tied embeddings (Llama 3.2 1B/3B, SmolLM2): FSDP2 refused the shared parameter across groups
    "fsdp2_tied": (2, {"parallel.dp_shard": 2, "model.tie_embeddings": "true"}),
    "fsdp4_save3": (4, {"parallel.dp_shard": 4, "train.steps": 3}),
    "tp2_fsdp2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "pp2_fsdp2": (4, {"parallel.pp": 2, "parallel.dp_shard": 2}),
    "pp2_tp2": (4, {"parallel.pp": 2, "parallel.tp": 2}),
    "hsdp_2x2": (4, {"parallel.dp_replicate": 2, "parallel.dp_shard": 2}),
    # bf16 compute through FSDP2's MixedPrecisionPolicy (fp32 master weights and gradient
    # reduction) with TP: the fp32 losses to bf16 accuracy
    "bf16_tp2_fsdp2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2, "train.dtype": '"bfloat16"'}),
}
REL = 1e-5
TOLERANCE = {"bf16_tp2_fsdp2": 2e-3}  # bf16 matmuls: ~8 mantissa bits


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(shards, out, **extra):
    return load_config(overrides=debug_overrides(shards, out, **{**COMMON, **extra}))


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """Runs every layout (and the two reference runs) once; returns name → run directory."""
    root = tmp_path_factory.mktemp("parallel")
    out = {name: root / name for name in LAYOUTS}
    jobs = {2: [], 4: []}
    for name, (world, extra) in LAYOUTS.items():
        jobs[world].append((name, debug_overrides(shards, out[name], **{**COMMON, **extra}), None))
    # a single-process checkpoint of step 3 (Meta weights + AdamW state) continued under FSDP×2
    pretrain(_cfg(shards, root / "single_save3", **{"train.steps": 3}), progress=False, log=lambda m: None)
    out["resume_fsdp2_from_single"] = root / "resume_fsdp2_from_single"
    jobs[2].append(("resume_fsdp2_from_single", debug_overrides(shards, root / "resume_fsdp2_from_single", **{
        **COMMON, "parallel.dp_shard": 2}), str(root / "single_save3")))
    # resume the FSDP×4 checkpoint of step 3 under TP×FSDP (2×2) for step 4, after it is written
    jobs[4].append(("resume_tp2_fsdp2", debug_overrides(shards, root / "resume_tp2_fsdp2", **{
        **COMMON, "parallel.tp": 2, "parallel.dp_shard": 2}), str(out["fsdp4_save3"])))
    spawn_ranks(2, jobs[2])
    spawn_ranks(4, jobs[4])
    shutil.copytree(out["fsdp4_save3"], root / "resume_single")  # back to one process, below
    out["resume_tp2_fsdp2"] = root / "resume_tp2_fsdp2"
    out["single_save3"] = root / "single_save3"
    out["resume_single"] = root / "resume_single"
    Trainer(_cfg(shards, root / "resume_single"), resume=True, progress=False, log=lambda m: None).run()
    for name in ["fsdp4_save3", *LAYOUTS]:
        ref = _reference(name)
        if ref not in out:
            extra = {k: v for k, v in LAYOUTS[name][1].items()
                     if not k.startswith("parallel.") and k not in ("train.steps", "train.dtype")}
            out[ref] = root / ref
            pretrain(_cfg(shards, out[ref], **extra), progress=False, log=lambda m: None)
    return out


def _reference(name: str) -> str:
    """The single-process run a layout is compared with: same model and batches, one process."""
    extra = {k: v for k, v in LAYOUTS[name][1].items()
             if not k.startswith("parallel.") and k not in ("train.steps", "train.dtype")}
    return "single" + "".join(f"_{k}={v}" for k, v in sorted(extra.items())).replace('"', "").replace(" ", "")


def _close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs, name):
    ref = _rows(runs[_reference(name)])
    got = _rows(runs[name])
    assert [r["step"] for r in got] == list(range(1, len(got) + 1)) and len(got) >= 3
    rel = TOLERANCE.get(name, REL)
    for r, g in zip(ref, got, strict=False):
        assert _close(g["loss"], r["loss"], rel), (name, r["step"], g["loss"], r["loss"])
        assert _close(g["grad_norm"], r["grad_norm"], rel), (name, r["step"], g["grad_norm"], r["grad_norm"])
    # the loss moved: these are real updates, not a frozen model agreeing with itself
    assert got[-1]["loss"] < got[0]["loss"] - 0.05
    if "val_loss" in ref[len(got) - 1]:  # evaluated at the reference's last step
        assert _close(got[-1]["val_loss"], ref[len(got) - 1]["val_loss"], rel), (name, got[-1]["val_loss"])


@pytest.mark.parametrize("resumed", ["resume_tp2_fsdp2", "resume_single", "resume_fsdp2_from_single"])
def test_checkpoint_resumes_under_another_layout(runs, resumed):
    """FSDP×4 → TP×FSDP (2×2) and → one process; one process → FSDP×2: the same step-4 loss."""
    ref = _rows(runs["single"])
    assert dist_checkpoint.is_distributed_checkpoint(runs["fsdp4_save3"] / "ckpt-00000003")
    assert not dist_checkpoint.is_distributed_checkpoint(runs["single_save3"] / "ckpt-00000003")
    got = _rows(runs[resumed])
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # steps 1-3 kept from the first run, 4 is new
    assert _close(got[3]["loss"], ref[3]["loss"]), (resumed, got[3]["loss"], ref[3]["loss"])
    assert _close(got[3]["val_loss"], ref[3]["val_loss"])


def test_dcp_checkpoint_exports_to_hf_and_matches_single_process_weights(runs, tmp_path):
    from herd.checkpoint import read_checkpoint
    from herd.train import checkpoint as ckpt

    ckpt_dir = runs["resume_tp2_fsdp2"] / "ckpt-00000004"
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "herd", "export", str(ckpt_dir), str(out), "--to", "hf"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("wrote"), done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "herd", "export", str(runs["single"] / "ckpt-00000004"),
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a distributed (DCP) training checkpoint" in bad.stderr
    ref, _ = ckpt.load_train_state(runs["single"] / "ckpt-00000004")
    # the export, and the Meta-layout model/ a small model's distributed checkpoint also carries
    for loaded in (read_checkpoint(out), read_checkpoint(ckpt_dir / "model")):
        assert set(loaded.state_dict) == set(ref)
        for k, v in ref.items():
            # atol 5e-6: the single process's loss backward (objectives.cross_entropy_sum) and the
            # tensor-parallel run's (torch's, on DTensors) differ in the last bit of an exp; four
            # AdamW steps carry that to ~2e-6 on a weight of ~1e-2 (a wrong shard would be ~1e-3)
            torch.testing.assert_close(loaded.state_dict[k], v, rtol=1e-4, atol=5e-6, msg=k)


def test_bad_layouts_are_one_line_errors(shards, tmp_path):
    with pytest.raises(HerdError, match="needs 4 processes, this run has 1"):
        Trainer(_cfg(shards, tmp_path / "a", **{"parallel.tp": 2, "parallel.dp_shard": 2}), progress=False)
    with pytest.raises(HerdError, match="pp_schedule"):
        _cfg(shards, tmp_path / "b", **{"parallel.pp_schedule": '"zigzag"'})
    with pytest.raises(HerdError, match="unknown config key parallel.tensor"):
        _cfg(shards, tmp_path / "c", **{"parallel.tensor": 2})
    # what needs a GPU says so on CPU (context parallel's ring attention, compile)
    with pytest.raises(HerdError, match="context parallel.*GPUs only"):
        Trainer(_cfg(shards, tmp_path / "d", **{"parallel.cp": 2}), progress=False)
    with pytest.raises(HerdError, match="compile with parallel.tp > 1 is refused"):
        Trainer(_cfg(shards, tmp_path / "f", **{"parallel.compile": "true", "parallel.tp": 2}), progress=False)
    with pytest.raises(HerdError, match="parallel.compile is for GPU runs"):
        Trainer(_cfg(shards, tmp_path / "e", **{"parallel.compile": "true"}), progress=False)
    assert ParallelConfig(tp=2, pp=2).degrees(16) == {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}
    with pytest.raises(HerdError, match="not divisible"):
        ParallelConfig(tp=4).degrees(6)
    assert split_layers(126, 16)[0] == list(range(8)) and sum(map(len, split_layers(126, 16))) == 126
    from herd.models.llama4 import LLAMA4_PRESETS
    from herd.models.llama4 import Transformer as Llama4

    with torch.device("meta"):
        moe_model = Llama4(LLAMA4_PRESETS["llama4-debug"])
    with pytest.raises(HerdError, match="expert parallelism for Llama 4 MoE layers is not implemented"):
        apply_expert_parallel(moe_model, None)
    with pytest.raises(HerdError, match="only 2 layers"):
        split_layers(2, 4)


def test_activation_checkpointing_in_one_process_keeps_the_losses(runs, shards, tmp_path):
    """parallelize without a mesh applies only activation checkpointing (the model's parameter
    names stay, so its checkpoint is an ordinary one)."""
    run = tmp_path / "ac"
    pretrain(_cfg(shards, run, **{"parallel.activation_checkpoint": '"selective"'}), progress=False, log=lambda m: None)
    ref, got = _rows(runs["single"]), _rows(run)
    assert [g["loss"] for g in got] == pytest.approx([r["loss"] for r in ref], rel=REL)
    assert not dist_checkpoint.is_distributed_checkpoint(run / "ckpt-00000004")


def test_compiled_checkpointed_blocks_match_eager_and_really_compile():
    """Per-block torch.compile over selective activation checkpointing (the Trainer enables compile on
    GPUs only; the functions run anywhere): dynamo captures the blocks — no silent fallback to eager —
    and the gradients equal the plain model's."""
    from torch._dynamo.utils import counters

    from herd.models.args import get_preset
    from herd.models.llama3 import Transformer
    from herd.train.objectives import document_mask, document_positions
    from herd.train.parallel import apply_activation_checkpointing, apply_compile

    torch.manual_seed(0)
    args = get_preset("debug")
    ref = Transformer(args)
    ref.init_weights()
    model = Transformer(args)
    model.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(model, "selective")
    apply_compile(model)
    assert list(model.state_dict()) == list(ref.state_dict())  # names unchanged: checkpoints unchanged
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    ids = torch.zeros(2, 32, dtype=torch.long)
    ids[:, 20:] = 1  # two packed documents
    kw = {"positions": document_positions(ids), "mask": document_mask(ids)}
    counters.clear()
    losses = []
    for m in (ref, model):
        loss = torch.nn.functional.cross_entropy(m(tokens, **kw).flatten(0, 1), tokens.flatten())
        loss.backward()
        losses.append(loss.item())
    assert counters["stats"]["calls_captured"] > 0 and counters["stats"]["unique_graphs"] >= 1
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_damaged_dcp_checkpoint_is_one_line_on_export(runs, tmp_path):
    import shutil

    from herd.train.dist_checkpoint import export

    src = runs["resume_tp2_fsdp2"] / "ckpt-00000004"
    damage = {
        "truncated_shard": lambda d: (lambda f: f.write_bytes(f.read_bytes()[:100]))(sorted((d / "dcp").glob("*.distcp"))[0]),
        "missing_shard": lambda d: sorted((d / "dcp").glob("*.distcp"))[0].unlink(),
        "garbage_metadata": lambda d: (d / "dcp" / ".metadata").write_bytes(b"\x00garbage" * 10),
        "garbage_train_state": lambda d: (d / "train_state.pt").write_bytes(b"not a pickle" * 10),
    }
    for name, fn in damage.items():
        d = tmp_path / name / "ckpt-00000004"
        shutil.copytree(src, d)
        fn(d)
        with pytest.raises(HerdError, match="corrupt"):
            export(d, tmp_path / name / "out")
    # a good checkpoint under another directory name is read (complete.json is what makes it whole)
    shutil.copytree(src, tmp_path / "renamed")
    assert export(tmp_path / "renamed", tmp_path / "renamed_out").exists()
