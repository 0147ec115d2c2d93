"""ERM: the plain base optimizer behind the common ``step(closure, targets)`` call (1F + 1B)."""
from __future__ import annotations

from .base import SharpnessOptimizer, StepState


class ERM(SharpnessOptimizer):
    """``ERM(params, torch.optim.SGD, lr=..., momentum=...)``: one forward and one backward of the
    mean loss, then the base optimizer. Shares the scaler / non-finite skip / accumulation /
    distributed handling of the other methods, so a recipe can switch methods by name."""

    method_kwargs = ()
    allow_scalar_loss = True
    multi_backward = False

    def __init__(self, params, base_optimizer_cls, **kwargs):
        super().__init__(params, base_optimizer_cls, **kwargs)

    def _compute(self, st: StepState) -> list:
        (g,) = self._grad_pass(st, [[1.0] * len(st.micro_batches)])
        return g
