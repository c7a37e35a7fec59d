"""Optimiser and learning-rate schedule shared by stage 1 and stage 2, and the non-finite loss guard.

AdamW with weight decay off for biases and norms; warm-up then cosine decay laid out over
the configured epochs, so a run stopped early and resumed follows the same schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from hymirec_udfs.core.config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite.

    Attributes:
        step: the optimizer step that produced it (1-based: step K follows K-1 updates).
        user_ids: users of the offending batch (on the ranks where it was non-finite).
        checkpoint_path: the last good checkpoint, or None when none was written.
    """

    def __init__(self, message: str, step: int, user_ids: list[str], checkpoint_path: Optional[str]) -> None:
        super().__init__(message)
        self.step = step
        self.user_ids = user_ids
        self.checkpoint_path = checkpoint_path


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = max(0, warmup)
        self.total = max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms, scales and queries excluded)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and not name.endswith(("queries", "indicator"))
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.lr)
