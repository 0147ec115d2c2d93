"""Skipped (non-finite) updates under other trainers: counted, warned about once, and a stop after
`max_bad_steps` in a row, as ft_focal's own loop does (ft_focal/training/trainer.py, `train.max_bad_steps`).

The ft_focal optimizers skip an update whose loss or gradients are NaN / inf in any pass (weights
and optimizer state stay as after the last good update; docs/design.md). A trainer that does not
look would log such steps as if they trained and never stop; `SkipGuard.record` after each step
makes them visible.
"""
from __future__ import annotations

import logging

from ft_focal.config import TrainConfig
from ft_focal.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BAD_STEPS = TrainConfig.max_bad_steps   # the same default as ft_focal's own loop


class NonFiniteUpdates(UserError):
    """`max_bad_steps` consecutive updates were skipped for non-finite loss or gradients."""


class SkipGuard:
    """Counts skipped updates (`skipped_steps` in all, `streak` in a row) for trainer `where`."""

    def __init__(self, where: str, max_bad_steps: int = DEFAULT_MAX_BAD_STEPS) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be at least 1, got {max_bad_steps}")
        self.where, self.max_bad_steps = where, int(max_bad_steps)
        self.skipped_steps = 0
        self.streak = 0
        self._warned = False

    def record(self, skipped: bool, step: int) -> None:
        """After update `step` (1-based): count it; warn at the first skip; raise NonFiniteUpdates
        once `max_bad_steps` updates in a row were skipped."""
        if not skipped:
            self.streak = 0
            return
        self.skipped_steps += 1
        self.streak += 1
        if not self._warned:
            self._warned = True
            logger.warning("%s: update %d skipped: non-finite loss or gradients (weights unchanged); skipped updates "
                           "are logged with loss NaN and counted, %d in a row stop training", self.where, step,
                           self.max_bad_steps)
        if self.streak >= self.max_bad_steps:
            raise NonFiniteUpdates(
                f"training stopped at update {step}: {self.streak} consecutive updates had non-finite loss or "
                f"gradients (limit max_bad_steps={self.max_bad_steps}); the model holds the weights of the last good "
                f"update: check the data for NaN / inf and try a lower learning rate")
