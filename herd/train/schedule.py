"""Learning-rate schedules (SPEC §3.4): linear warm-up, then cosine decay to a floor, or linear
decay to zero for annealing (§3.4.3). Pure functions of the step, so the "scheduler state" in a
checkpoint is just the step number and resume is exact."""

from __future__ import annotations

import math

from herd.train.config import ScheduleConfig


def lr_at(step: int, peak_lr: float, sched: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run.

    After the warm-up this is transformers' get_cosine_schedule_with_warmup (with min_lr: its
    get_cosine_with_min_lr_schedule_with_warmup) and get_linear_schedule_with_warmup step for step:
    the decay ends at step `decay_steps or total_steps`, one past the last update, so an annealing
    run's last update uses peak/(total - warmup) and the line reaches 0 right after it (an update at
    LR 0 would change nothing). The warm-up is one step ahead of theirs: peak·(step+1)/warmup (torch's
    LinearLR(start_factor=1/warmup)), so no step is spent at LR 0 (tests/train/test_loop_invariants.py)."""
    warmup = sched.warmup_steps
    if step < warmup:  # linear warm-up from peak/warmup to peak
        return peak_lr * (step + 1) / warmup
    if sched.name == "constant":
        return peak_lr
    end = sched.decay_steps or total_steps
    span = max(1, end - warmup)
    progress = min(1.0, (step - warmup) / span)
    if sched.name == "linear":  # §3.4.3 annealing: linearly to 0
        return peak_lr * (1.0 - progress)
    # cosine from peak to min_lr (405B: 8e-5 → 8e-7 over 1.2M steps)
    return sched.min_lr + 0.5 * (peak_lr - sched.min_lr) * (1.0 + math.cos(math.pi * progress))
