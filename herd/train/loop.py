"""The one training loop (DESIGN principle 7): pre-training now; SFT, reward modelling and DPO plug
in their `Objective` (herd/train/objectives.py) and reuse everything here.

One optimizer step = `grad_accum` micro-batches whose summed losses are divided by the number of
loss terms of the *whole* step, so k micro-batches give the gradient of one k-times larger batch;
then global-norm clipping, AdamW (weight decay on matrices only) at the scheduled learning rate
(SPEC §3.4). A non-finite loss or gradient norm, or a step without loss terms, skips the update and
is logged. Every step appends one JSON line to `metrics.jsonl`; checkpoints (herd/train/checkpoint.py)
hold everything needed for a bitwise-exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from herd.data.shards import PackedLoader
from herd.errors import HerdError
from herd.files import atomic_write_text
from herd.models.llama3 import Transformer
from herd.models.llama4 import Llama4Args, moe_layers, router_stats
from herd.models.llama4 import Transformer as Llama4Transformer
from herd.runtime import retain_freed_memory
from herd.train import checkpoint as ckpt
from herd.train import dist_checkpoint
from herd.train.config import OPTIM_KERNELS, OptimConfig, RunConfig, check_device_present, schedule_warning
from herd.train.metrics import MetricSinks, metrics_line, read_metrics
from herd.train.objectives import Compiled, NextTokenLM, Objective
from herd.train.parallel import Parallel
from herd.train.prepare import ensure_shards, tokenizer_files
from herd.train.schedule import lr_at


# ---- pieces usable on their own ------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D parameters (matrices, embeddings) only; norms' gains are not
    decayed. `cfg.implementation` picks torch's kernel (fused / foreach / for-loop)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied embeddings appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.implementation not in OPTIM_KERNELS:
        raise HerdError(f"optim.implementation {cfg.implementation!r}: choose {', '.join(OPTIM_KERNELS)}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **OPTIM_KERNELS[cfg.implementation])


def accumulate_gradients(model: nn.Module, objective: Objective, micro_batches: Sequence[Any],
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         *, denominator: float | None = None) -> tuple[torch.Tensor, int]:
    """Backward over all micro-batches, each summed loss divided by the step's total number of loss
    terms (the correct normalization for unequal micro-batches; torchtune #2307). Gradients are
    accumulated into .grad (the caller zeroes them). Returns (loss sum / denominator, terms).
    `denominator` replaces the local term count when the micro-batches are one data-parallel rank's
    share of the step (herd/train/parallel.py)."""
    total = sum(objective.num_terms(b) for b in micro_batches)
    denom = max(total, 1) if denominator is None else denominator
    loss_sum = torch.zeros((), dtype=torch.float32)
    for b in micro_batches:
        with autocast():
            part = objective.loss_sum(model, b)
        (part / denom).backward()
        loss_sum = loss_sum + part.detach().float().cpu()
    return loss_sum / denom, total


@dataclass
class StepResult:
    loss: float
    terms: int
    grad_norm: float
    skipped: bool


def train_step(model: nn.Module, objective: Objective, micro_batches: Sequence[Any],
               optimizer: torch.optim.Optimizer, grad_clip: float,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, *,
               backward: Callable[..., tuple[torch.Tensor, int]] = accumulate_gradients,
               clip_grad_norm: Callable[..., torch.Tensor] = torch.nn.utils.clip_grad_norm_) -> StepResult:
    """One optimizer step. A distributed run passes its own `backward` (data-parallel shares,
    pipeline schedule) and `clip_grad_norm` (norm over all shards): herd/train/parallel.py."""
    optimizer.zero_grad(set_to_none=True)
    loss, terms = backward(model, objective, micro_batches, autocast)
    loss_f = float(loss)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if terms == 0:
        # Every target ignored (a corrupt batch: e.g. all documents of length 1): the gradient is
        # zero, yet AdamW would still move every weight by its momentum and weight decay, and the
        # loss would read 0.0. A step with nothing to learn from is skipped like a non-finite one.
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), terms, float("nan"), True)
    if not math.isfinite(loss_f):  # a bad batch must not poison the weights: skip the update
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_f, terms, float("nan"), True)
    norm = clip_grad_norm(params, grad_clip if grad_clip > 0 else float("inf"))
    norm_f = float(norm)
    if not math.isfinite(norm_f):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_f, terms, norm_f, True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_f, terms, norm_f, False)


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, loader: PackedLoader, n_batches: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             device: str | torch.device = "cpu") -> float:
    """Mean loss over the first `n_batches` batches of `loader` (a fixed set: comparable across steps)."""
    was_training = model.training
    model.eval()
    total, terms = 0.0, 0
    for i in range(min(n_batches, loader.batches_per_epoch)):
        b = loader.batch(i).to(device)
        with autocast():
            total += float(objective.loss_sum(model, b))
        terms += objective.num_terms(b)
    model.train(was_training)
    return total / max(terms, 1)


def _sum_over_ranks_router_counts(model: nn.Module) -> None:
    """The whole job's tokens per expert: every rank routed its own share of the batch."""
    for moe in moe_layers(model).values():
        if moe.tokens_per_expert is not None:
            torch.distributed.all_reduce(moe.tokens_per_expert)


def peak_flops_for(device: torch.device) -> float:
    """Dense peak FLOP/s for MFU when the config gives none: H100/H200 SXM BF16 989 TFLOP/s, A100 312;
    on CPU, fp32 FMA per thread at ~3 GHz with two FMA units: 16 lanes (AVX-512) → 192 GFLOP/s,
    8 lanes (AVX2) → 96 GFLOP/s. Rough figures: set train.peak_flops for a precise MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return 989e12
        if "A100" in name:
            return 312e12
        return 100e12
    lanes = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    return 2 * 2 * lanes * 3e9 * torch.get_num_threads()


# Model fields that decide the weights' tensors (names and shapes) or how the stored tensors are read
# (tie_embeddings: one table serves as the output head; attention_bias / mlp_bias add tensors). RoPE θ, its scaling, max_seq_len and norm_eps
# change no tensor: a stage may change them and continue the same weights (long-context extension,
# SPEC §3.4). Derived sizes (ffn_dim, hd) rather than the fields behind them, so a checkpoint that
# states its FFN size another way (ffn_hidden_dim vs multiple_of) still matches.
WEIGHT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "hd", "tie_embeddings",
                 "attention_bias", "mlp_bias", "n_experts", "moe_every", "moe_ffn_dim")


def weight_changes(old: Any, new: Any) -> list[str]:
    """"field old → new" for each WEIGHT_FIELDS entry that differs between two model args."""
    if type(old) is not type(new):
        return [f"architecture {type(old).__name__} → {type(new).__name__}"]
    return [f"{f} {getattr(old, f, None)} → {getattr(new, f, None)}" for f in WEIGHT_FIELDS
            if getattr(old, f, None) != getattr(new, f, None)]


# ---- the run ------------------------------------------------------------------------------------
def check_run_dir_usable(out_dir: str, resume: bool | None = None) -> Path:
    """The run directory `out_dir` as a Path, refused in one line when a run cannot use it: empty
    (Path("") is ".", the working directory), a file, holding files a run does not write, or (when
    `resume` is False) holding checkpoints already. Post-training calls it before loading models."""
    if not str(out_dir).strip():
        raise HerdError("train.out_dir is empty; give a run directory (--out)")
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise HerdError(f"run directory {run_dir} is a file; give a directory (--out)")
    ckpt.check_run_dir(run_dir)
    existing = ckpt.latest_checkpoint(run_dir) if resume is False else None
    if existing is not None:
        raise HerdError(f"{run_dir} already holds checkpoints ({existing.name}); "
                        f"pass --resume {run_dir} to continue it or choose another --out")
    return run_dir


class Trainer:
    """Builds model, data, optimizer from a `RunConfig` and runs (or resumes) the loop.

    `resume=True` continues from the newest complete checkpoint in the run directory (and starts
    fresh when there is none); without it, a run directory that already holds checkpoints is refused.
    """

    checkpoint_tokenizer: Any = None  # a tokenizer object written into each checkpoint's model/, if any

    def __init__(self, cfg: RunConfig, *, objective: Objective | None = None, resume: bool = False,
                 log: Callable[[str], None] | None = None, progress: bool = True,
                 model: nn.Module | None = None, data: tuple[Any, Any] | None = None):
        """model: train this (e.g. loaded from a checkpoint for post-training) instead of building
        `cfg.model`; data: (train, val or None) loaders offering PackedLoader's interface (next,
        batch(i), batches_per_epoch, set_shape, state_dict) instead of the config's token shards."""
        self.cfg = cfg
        self.objective = objective or NextTokenLM()
        self.log = log or (lambda msg: print(msg, flush=True))
        self.progress = progress
        t = cfg.train
        self.run_dir = check_run_dir_usable(t.out_dir)
        check_device_present(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.retain_memory and torch.device(t.device).type == "cpu":
            retain_freed_memory()
        # herd/train/parallel.py: joins the torchrun job when WORLD_SIZE > 1 and holds the layout.
        self.parallel = Parallel(cfg.parallel, t.device)
        self.device = self.parallel.device
        resume = resume or self.parallel.restarted  # torchrun --max-restarts: continue from the last checkpoint
        if not self.parallel.is_main:  # rank 0 speaks (logs, progress, metrics) for the job
            self.log, self.progress = (lambda msg: None), False
        use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        # Under FSDP, MixedPrecisionPolicy computes in bf16 and reduces gradients in fp32 instead.
        self.mixed_precision = use_bf16 and self.parallel.sharded
        if self.mixed_precision:
            self.autocast = contextlib.nullcontext
        self.args = cfg.model.args() if model is None else model.args
        self._model_from_config = model is None  # else cfg.model does not describe the model

        existing = ckpt.latest_checkpoint(self.run_dir)
        check_run_dir_usable(t.out_dir, resume)
        if model is None and t.init_from and existing is None and not Path(t.init_from).exists():
            # before the shards are built (minutes for a new corpus), not after
            raise HerdError(f"train.init_from {t.init_from}: no such checkpoint or run directory")

        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        if data is not None:
            self.tokenizer_files: list[Path] = []
            self.train_data, self.val_data = data
        else:
            with self.parallel.rank0_first():  # one rank prepares missing shards, the others then read them
                self._shard_data(cfg)
        self.parallel.check(self.args, t)
        if model is not None:
            if self.parallel.distributed:
                raise HerdError("distributed training of a model passed in is not supported yet; "
                                "let the Trainer build it from cfg.model")
            self.model = model.to(self.device)
        else:
            self._build_model(cfg)
        self.model.train()
        if t.compile:
            if self.parallel.active:
                raise HerdError("train.compile compiles one process's whole forward and loss; with "
                                "parallelism or activation checkpointing use parallel.compile (per block)")
            self.objective = Compiled(self.objective)
            if isinstance(self.args, Llama4Args) and self.args.n_experts:
                self.log("train.compile: the MoE layers split tokens by expert with data-dependent sizes, "
                         "so the graph breaks there and each MoE layer compiles its own pieces")
        self.optimizer = build_optimizer(self.model, cfg.optim)
        if (warning := schedule_warning(cfg)) and self.parallel.is_main:
            self.log(f"warning: {warning}")
        self.step = 0
        self.tokens = 0
        self.metrics_path = self.run_dir / "metrics.jsonl" if self.parallel.is_main else Path(os.devnull)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_partial(self.run_dir):
            self.log(f"removed {stale.name}, a checkpoint whose writing was interrupted")
        if resume and existing is not None:
            self._restore(existing)
        elif self.parallel.is_main:
            if resume:  # start-or-continue (a requeued job's first start); a typo'd name should show here
                self.log(f"no checkpoint in {self.run_dir}: starting a fresh run there")
            atomic_write_text(self.metrics_path, "")
        if self.parallel.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
        # MFU is against the peak of every device in the job
        self.peak_flops = (t.peak_flops or peak_flops_for(self.device)) * self.parallel.world

    def _shard_data(self, cfg: RunConfig) -> None:
        t = cfg.train
        shards = ensure_shards(cfg.data, t.seed, self.log)
        # copied into every checkpoint, so `herd generate --model <checkpoint>` has its tokenizer;
        # byte-level ids have no files, their tokenizer is written instead
        self.tokenizer_files = tokenizer_files(cfg.data.tokenizer)
        if cfg.data.tokenizer == "bytes":
            from herd.tokenizer.byte_ids import byte_tokenizer

            self.checkpoint_tokenizer = byte_tokenizer()
        self.train_data = PackedLoader(shards, batch_size=t.batch_size, seq_len=t.seq_len, split="train",
                                       seed=t.seed, vocab_size=self.args.vocab_size)
        # Every shape of train.batch_schedule must fit the split too. set_shape refuses one that does
        # not, but the loop calls it only when the step comes: a batch too large for the data failed
        # at step 60 (or 342,161) of a run instead of before the first. set_shape keeps the position.
        for start, batch_size, seq_len in t.batch_schedule:
            try:
                self.train_data.set_shape(batch_size, seq_len)
            except HerdError as e:
                raise HerdError(f"train.batch_schedule [{start}, {batch_size}, {seq_len}]: {e}") from None
        self.train_data.set_shape(t.batch_size, t.seq_len)
        try:
            self.val_data: PackedLoader | None = PackedLoader(
                shards, batch_size=t.batch_size, seq_len=t.seq_len, split="val", seed=t.seed,
                vocab_size=self.args.vocab_size)
        except HerdError as e:
            self.log(f"no validation loss: {e}")
            self.val_data = None

    def _build_model(self, cfg: RunConfig) -> None:
        # DESIGN principle 3: build on meta, then materialize and initialize explicitly.
        model_class = Llama4Transformer if isinstance(self.args, Llama4Args) else Transformer
        with torch.device("meta"):
            self.model = model_class(self.args)
        if self.parallel.active:  # TP/SP → AC → compile → FSDP2, or this rank's pipeline stages
            self.model = self.parallel.parallelize(self.model, mixed_precision=self.mixed_precision)
            self.parallel.init_weights(self.model, cfg.train.seed, lambda: model_class(self.args))
        else:
            self.model.to_empty(device=self.device)
            self.model.init_weights()
        if cfg.train.init_from:
            self._init_from(Path(cfg.train.init_from))

    # ---- checkpoints ----
    def _train_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step}, "data": self.train_data.state_dict(),
                "rng": ckpt.rng_state(), "config": self.cfg.to_dict()}

    def save(self) -> Path:
        if self.parallel.distributed:  # every rank writes its shards (torch.distributed.checkpoint)
            return dist_checkpoint.save(self)
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.args, self.model.state_dict(),
                                    self._train_state(), keep=self.cfg.checkpoint.keep,
                                    model_files=self.tokenizer_files, tokenizer=self.checkpoint_tokenizer)
        return path

    def _init_from(self, path: Path) -> None:
        from herd.checkpoint import read_checkpoint
        from herd.checkpoint.common import model_dir_of

        if not path.exists():
            raise HerdError(f"train.init_from {path}: no such checkpoint or run directory")
        src = model_dir_of(path)  # a run directory → its newest checkpoint, ckpt-N/ → its model/
        loaded = read_checkpoint(src)
        diff = weight_changes(loaded.args, self.args)
        if diff:
            raise HerdError(f"train.init_from {path}: model shape differs from the config ({', '.join(diff)})")
        sd = dict(loaded.state_dict)
        if self.args.tie_embeddings:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        try:
            with torch.no_grad():
                if self.parallel.active:
                    self.parallel.load_full_state_dict(self.model, {k: v.float() for k, v in sd.items()})
                else:
                    self.model.load_state_dict({k: v.to(self.device, torch.float32) for k, v in sd.items()})
        except (RuntimeError, ValueError, KeyError) as e:  # a difference weight_changes does not name
            raise HerdError(f"train.init_from {path}: the checkpoint's weights do not fit this run's model "
                            f"({str(e).splitlines()[0]})") from None
        self.log(f"initialized weights from {src}")

    def _restore(self, path: Path) -> None:
        if dist_checkpoint.is_distributed_checkpoint(path) or self.parallel.distributed:
            return dist_checkpoint.restore(self, path)  # any layout, including back to one process
        sd, state = ckpt.load_train_state(path)
        if int(state["step"]) > self.cfg.train.steps:
            raise HerdError(f"{path} is at step {state['step']}, past train.steps = {self.cfg.train.steps}; "
                            f"give --train.steps of at least {state['step']} to continue it")
        self._check_shape(path, state)
        sd = self._checkpoint_weights(sd, state)
        try:
            self.model.load_state_dict({k: v.to(self.device) for k, v in sd.items()}, strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise HerdError(f"{path}: checkpoint does not fit this run's model/optimizer "
                            f"({str(e).splitlines()[0]})") from None
        self._resume_position(state)
        self.log(f"resumed from {path} at step {self.step}")

    def _check_shape(self, path: Path, state: dict[str, Any]) -> None:
        """Name the model fields that differ from the checkpoint's run (load_state_dict's own message
        lists tensors, not the setting to fix)."""
        saved = state.get("config", {}).get("model")
        if not isinstance(saved, dict) or not self._model_from_config:  # a model passed in (post-training)
            return
        try:
            from herd.train.config import ModelConfig

            theirs = ModelConfig(**saved).args()
        except (TypeError, HerdError):
            return
        diff = [f"{f.name} {getattr(theirs, f.name)} → {getattr(self.args, f.name)}"
                for f in dataclasses.fields(theirs) if hasattr(self.args, f.name)
                and getattr(theirs, f.name) != getattr(self.args, f.name)
                and f.name not in ("max_seq_len", "rope_scaling")]  # those change no tensor
        if diff:
            raise HerdError(f"{path}: the checkpoint's model differs from this run's ({'; '.join(diff)}); "
                            "resume with the run's own model settings")

    def _checkpoint_weights(self, sd: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A checkpoint's `model/` weights → this run's model's state dict (subclasses add what
        they keep beside the canonical weights)."""
        if self.args.tie_embeddings:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        return sd

    def _resume_position(self, state: dict[str, Any]) -> None:
        """Data position, RNG states and counters from a checkpoint's train state; metrics logged
        after the checkpoint are dropped, so the resumed run writes them once."""
        self.train_data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if self.parallel.is_main:
            rows = read_metrics(self.metrics_path, self.step)
            atomic_write_text(self.metrics_path, "".join(metrics_line(r) for r in rows))

    # ---- the loop ----
    def run(self) -> list[dict]:
        from tqdm import tqdm

        cfg, t = self.cfg, self.cfg.train
        rows: list[dict] = []
        bar = tqdm(total=t.steps, initial=self.step, disable=None if self.progress else True,
                   dynamic_ncols=True, desc="pretrain")
        sinks = MetricSinks(self.run_dir, start_step=self.step, log=self.log,
                            tensorboard=self.parallel.is_main, png=self.parallel.is_main)
        with open(self.metrics_path, "a") as metrics, sinks:
            while self.step < t.steps:
                lr = lr_at(self.step, cfg.optim.lr, cfg.schedule, t.steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                batch_size, seq_len = t.shape_at(self.step)
                if (batch_size, seq_len) != (self.train_data.batch_size, self.train_data.seq_len):
                    self.train_data.set_shape(batch_size, seq_len)
                start = time.perf_counter()
                batches = [next(self.train_data).to(self.device) for _ in range(t.grad_accum)]
                result = train_step(self.model, self.objective, batches, self.optimizer, cfg.optim.grad_clip,
                                    self.autocast, **self.parallel.step_hooks())
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                step_tokens = sum(b.inputs.numel() for b in batches)
                self.step += 1
                self.tokens += step_tokens
                tps = step_tokens / max(elapsed, 1e-9)
                flops_per_token = self.args.flops_per_token(seq_len, training=True)
                row: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "loss": result.loss, "lr": lr,
                                       "tokens_per_s": tps, "grad_norm": result.grad_norm,
                                       "mfu": tps * flops_per_token / self.peak_flops}
                if self.parallel.distributed and not self.parallel.pipelined:
                    _sum_over_ranks_router_counts(self.model)  # each data-parallel rank routed its own rows
                row.update(router_stats(self.model))  # Llama 4 MoE: tokens per expert this step
                if hasattr(self.objective, "pop_metrics"):  # the objective's own (DPO: TRL's rewards/*)
                    row.update(self.objective.pop_metrics())
                if result.skipped:
                    row["skipped"] = True
                    self.log(f"step {self.step}: " + ("no loss terms (every target ignored)" if result.terms == 0
                             else f"non-finite loss/grad norm ({result.loss}, {result.grad_norm})")
                             + "; update skipped")
                last = self.step == t.steps
                if self.val_data is not None and ((t.eval_every and self.step % t.eval_every == 0) or last):
                    row["val_loss"] = (self.parallel.evaluate if self.parallel.distributed else evaluate)(
                        self.model, self.objective, self.val_data, cfg.data.val_batches, self.autocast, self.device)
                metrics.write(metrics_line(row))
                metrics.flush()
                sinks.add(row)
                rows.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", **({"val": f"{row['val_loss']:.4f}"}
                                                                 if "val_loss" in row else {}))
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or last:
                    self.save()
                    sinks.plot(read_metrics(self.metrics_path, self.step))
        bar.close()
        return rows


def pretrain(cfg: RunConfig, *, resume: bool = False, objective: Objective | None = None,
             log: Callable[[str], None] | None = None, progress: bool = True) -> Trainer:
    """Run (or resume) a pre-training run; returns the finished Trainer."""
    trainer = Trainer(cfg, objective=objective, resume=resume, log=log, progress=progress)
    trainer.run()
    return trainer
