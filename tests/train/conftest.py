"""Fixtures for the training tests: small byte-level shards of real text (the interpreter's own
Python sources, always installed) and configs for the `debug` preset."""

from __future__ import annotations

import os
import shutil
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.data.shards import python_stdlib_files, shards_from_texts, text_documents


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """~740K byte tokens in ~3,300 documents (stdlib files split at blank lines), 10% held out."""
    texts = list(text_documents(python_stdlib_files(limit=30), split_on_blank_lines=True))
    return shards_from_texts(texts, tmp_path_factory.mktemp("data") / "shards", val_fraction=0.1)


def debug_overrides(shards, out, **extra) -> list[str]:
    items = {"model.preset": '"debug"', "model.vocab_size": 258, "data.path": f'"{shards}"',
             "train.out_dir": f'"{out}"', "train.batch_size": 4, "train.seq_len": 32, "train.threads": 1,
             "train.eval_every": 0, "checkpoint.every": 0, "checkpoint.keep": 0, "data.val_batches": 2,
             "schedule.warmup_steps": 2, "optim.lr": 3e-3}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def _dist_worker(rank: int, world: int, port: int, jobs: list) -> None:
    """One gloo rank running `jobs` in order: (fn, arg, None) calls fn(arg) (a module-level function);
    (name, overrides, resume_from) trains the run `overrides` describe, first copying the run
    directory `resume_from` into place when it is given."""
    from herd.train.config import load_config
    from herd.train.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        for job, arg, resume_from in jobs:
            if callable(job):
                job(arg)
                continue
            resume = resume_from is not None
            if resume and rank == 0:
                shutil.copytree(resume_from, load_config(overrides=arg).train.out_dir)
            dist.barrier()
            Trainer(load_config(overrides=arg), resume=resume, progress=False, log=lambda m: None).run()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, jobs: list) -> None:
    """Run `jobs` (see _dist_worker) on `world` gloo processes on this machine."""
    mp.spawn(_dist_worker, args=(world, free_port(), jobs), nprocs=world, join=True)
