"""A run's per-step metrics: how a row is written to and read back from `metrics.jsonl` (the
record the loop keeps; `metrics_line`, `read_metrics`), and where else they go: TensorBoard event
files under `<run>/tensorboard/` and a loss-curve PNG `<run>/loss.png`.

Both are views that can be rebuilt from `metrics.jsonl`, so neither may stop a run: a missing
library is said once on the log and skipped. On resume the TensorBoard writer purges events logged
after the checkpoint (`purge_step`), the same way the loop truncates `metrics.jsonl`, so the curves
show one clean history. The PNG is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# scalars worth a TensorBoard curve, under these tags
_SCALARS = {"loss": "loss/train", "val_loss": "loss/val", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
            "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu"}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def metrics_line(row: dict) -> str:
    """One `metrics.jsonl` line for `row`. A NaN or infinite loss or grad norm (a diverged or
    skipped step) is written as null: Python's bare `NaN`/`Infinity` is not JSON, and jq, JavaScript
    and most other readers reject the whole file over it. The row's `skipped` says why."""
    return json.dumps(_finite_or_none(row), allow_nan=False) + "\n"


def read_metrics(path: str | os.PathLike, upto_step: int | None = None) -> list[dict]:
    """The rows of a `metrics.jsonl` (up to `upto_step`), skipping a line cut short by a kill.
    Values may be null where the step's number was not finite (see metrics_line)."""
    path = Path(path)
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and (upto_step is None or (row.get("step") or 0) <= upto_step):
                rows.append(row)
    return rows


def _number(value: Any) -> bool:
    """A finite number to plot (null from metrics.jsonl, NaN from the loop's own rows: not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricSinks:
    def __init__(self, run_dir: str | os.PathLike, *, start_step: int = 0,
                 log: Callable[[str], None] = print, tensorboard: bool = True, png: bool = True):
        self.run_dir = Path(run_dir)
        self.log = log
        self.writer: Any = None
        self.png = png
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
            else:
                # steps are logged 1-based; events at or after the first step to come are stale
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                            purge_step=start_step + 1 if start_step > 0 else None)

    def add(self, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, tag in _SCALARS.items():
            value = row.get(key)
            if _number(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.add_scalar("tokens", row.get("tokens", 0), step)

    def plot(self, rows: Sequence[dict]) -> Path | None:
        """Draw train and validation loss over steps into `loss.png` (atomically)."""
        if not self.png or not rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib is not installed: no loss.png (pip install matplotlib)")
            self.png = False
            return None
        train = [(r["step"], r["loss"]) for r in rows if _number(r.get("loss"))]
        val = [(r["step"], r["val_loss"]) for r in rows if _number(r.get("val_loss"))]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train, strict=True), lw=0.8, label="train loss")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / "loss.png"
        tmp = path.with_name(f".loss.png.tmp-{os.getpid()}.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
