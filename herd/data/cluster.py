"""The data pipeline on datatrove's executors: the same steps as `herd data run`, one datatrove job
per step, chained with `depends=` (SPEC §3.1 ran on a cluster; so does this).

    from datatrove.executor import SlurmPipelineExecutor   # or LocalPipelineExecutor
    from herd.data.cluster import datatrove_executors
    from herd.data.pipeline import load_pipeline_config

    cfg = load_pipeline_config("configs/data/builtin.toml")
    last = datatrove_executors(cfg, tasks=256, executor=SlurmPipelineExecutor,
                               logging_dir="/shared/logs/builtin", partition="cpu", time="04:00:00",
                               job_name="herd-data")
    last.run()     # submits every job, each depending on the one before

Each phase becomes a job of `tasks` tasks; task `rank` runs the phase on units rank,
rank + tasks, ... (`pipeline.run_units`); each global step and the final publish is a one-task
job (`pipeline.run_global`). `run.work_dir` and `run.out` must be on a filesystem every node sees.
A task that dies is re-run by the executor (datatrove skips completed ranks; herd's per-unit
markers skip finished units inside a rank), and since every unit's result is a pure function
of its inputs the output is the same as a single-machine run — the test runs this module with
datatrove's `LocalPipelineExecutor` and compares.
"""

from __future__ import annotations

from pathlib import Path

from herd.data.pipeline import PipelineConfig, open_run, run_global, run_units, steps_for


class _Task:
    """A datatrove pipeline step (any callable `(data, rank, world_size)`) running one herd step.
    Holds only the config: picklable for datatrove's worker processes and cluster jobs."""

    def __init__(self, cfg: PipelineConfig, kind: str, name: str):
        self.cfg, self.kind, self.name = cfg, kind, name

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        ctx = open_run(self.cfg)  # reloads the plan written by the driver
        if self.kind == "phase":
            run_units(ctx, self.name, rank, world_size)
        elif rank == 0:
            run_global(ctx, self.name)
        return data

    def __repr__(self) -> str:  # datatrove logs the pipeline
        return f"herd data {self.kind} {self.name!r}"


def datatrove_executors(cfg: PipelineConfig, *, tasks: int, executor=None, logging_dir: str | Path,
                        restart: bool = False, **executor_kw):
    """Plan the run here (the driver), then build one datatrove executor per step, each depending
    on the previous; returns the last (its `.run()` runs or submits the whole chain)."""
    if executor is None:
        from datatrove.executor import LocalPipelineExecutor as executor
    open_run(cfg, restart=restart)  # writes WORK/plan.json, which every task reloads
    chain = None
    steps = [(k, n) for k, n, _, _ in steps_for(cfg)] + [("global", "publish")]
    for i, (kind, name) in enumerate(steps):
        chain = executor(pipeline=[_Task(cfg, kind, name)], tasks=tasks if kind == "phase" else 1,
                         logging_dir=str(Path(logging_dir) / f"{i:02d}-{name}"), depends=chain, **executor_kw)
    return chain
