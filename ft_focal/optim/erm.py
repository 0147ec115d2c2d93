"""ERM: the plain base optimizer behind the common ``step(closure, targets)`` call (1F + 1B)."""
from __future__ import annotations

from ._step import Passes, SharpnessOptimizer, StepState


class ERM(SharpnessOptimizer):
    """``ERM(params, torch.optim.SGD, lr=..., momentum=...)``: one forward and one backward of the
    mean loss, then the base optimizer. Shares the scaler / non-finite skip / accumulation /
    distributed handling of the other methods, so a recipe can switch methods by name."""

    method_kwargs = ()
    allow_scalar_loss = True
    multi_backward = False

    def __init__(self, params, base_optimizer_cls, **kwargs):
        super().__init__(params, base_optimizer_cls, **kwargs)

    def _compute(self, st: StepState, passes: Passes) -> list:
        (g,) = passes.grad(st, [[1.0] * len(st.micro_batches)])
        return g
