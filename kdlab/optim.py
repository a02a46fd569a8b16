"""The dataset recipe's learning-rate schedule (``scheduler=recipe``, the default).

Recipes name their schedule (``dataset.recipe.schedule``) so that auto-trained teachers can
follow it whatever scheduler the student uses; ``scheduler=cosine|multistep|constant`` pick
a torch scheduler directly.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

SCHEDULES = ("cosine", "multistep", "constant")


def recipe_scheduler(optimizer: torch.optim.Optimizer, schedule: str, max_epochs: int,
                     milestones: list[int] = (), gamma: float = 0.1):
    """cosine: to 0 over ``max_epochs``; multistep: x ``gamma`` at ``milestones``; constant."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs))
    if schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=gamma)
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"dataset.recipe.schedule must be one of {', '.join(SCHEDULES)}, "
                      f"got {schedule!r}")
