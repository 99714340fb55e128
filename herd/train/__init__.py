"""Training (DESIGN "train/"): one loop for every objective, typed configs, LR schedules,
exact-resume checkpoints and checkpoint averaging (SPEC §3.4).

    from herd.train import load_config, pretrain
    pretrain(load_config("configs/debug.toml", ["train.steps=20", "train.out_dir=runs/x"]))
"""

from herd.train.average import average_checkpoints, average_state_dicts
from herd.train.config import RunConfig, load_config
from herd.train.loop import Trainer, accumulate_gradients, build_optimizer, pretrain, train_step
from herd.train.objectives import NextTokenLM, Objective, document_mask, document_positions
from herd.train.schedule import lr_at

__all__ = ["NextTokenLM", "Objective", "RunConfig", "Trainer", "accumulate_gradients", "average_checkpoints",
           "average_state_dicts", "build_optimizer", "document_mask", "document_positions", "load_config",
           "lr_at", "pretrain", "train_step"]
