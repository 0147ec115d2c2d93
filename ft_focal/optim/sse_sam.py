"""SSE-SAM (Lyu et al., AAAI 2025): stage-wise head / tail sharpness-aware minimisation."""
from __future__ import annotations

from . import _numerics as nm
from ._numerics import add
from ._step import Passes, SharpnessOptimizer, StepState
from ._wrapping import class_table
from .imbsam import split_head_tail


class SSESAM(SharpnessOptimizer):
    """Head / tail split by TRAINING count (tail: ``n_c < tail_threshold``; the official README uses
    100). Losses are sums over the group divided by the whole batch size B.

    Stage 1 (``epoch < switch_fraction * num_epochs``): update with
    ``grad L_head(w + eps_h) + grad L_tail(w + eps_t)``, each ``eps = rho_g g / (||g|| + 1e-12)`` from
    its own group's gradient at w with its own radius. Cost 3F + 4B on the exact path, 3F + 3B with
    ``one_backward`` (the official code re-runs the forward at w before the tail gradient: 4F + 4B;
    the gradients are the same).
    Stage 2 (from the switch on): the head radius is 0, i.e. ImbSAM without the x2:
    ``grad L_head(w) + grad L_tail(w + eps_t)`` at 2F + 3B, 2F + 2B with ``one_backward`` (the
    official code keeps recomputing the zero-radius pass: 4F + 4B). A zero radius or an empty group never costs a pass.

    Call ``set_epoch(epoch, num_epochs)`` at the start of every epoch (0-based; the official code
    switches when its epoch counter reaches ``switch_fraction * num_epochs``). Without it the
    optimizer stays in stage 1. ``switch_fraction >= 1`` never switches. ``one_backward=True``
    (needs ``model=``) gets both group gradients at w from one backward.
    """

    method_kwargs = ("rho_head", "rho_tail", "class_counts", "tail_threshold", "switch_fraction",
                     "one_backward", "one_backward_check", "skip_empty_groups")

    def __init__(self, params, base_optimizer_cls, rho_head=0.05, rho_tail=0.1, class_counts=None,
                 tail_threshold=100, switch_fraction=0.7, one_backward="auto", skip_empty_groups=True,
                 **kwargs):
        if rho_head < 0 or rho_tail < 0:
            raise ValueError(f"rho_head and rho_tail must be non-negative, got {rho_head}, {rho_tail}")
        counts = class_table(class_counts)
        super().__init__(params, base_optimizer_cls, one_backward=one_backward, **kwargs)
        self.rho_head, self.rho_tail = float(rho_head), float(rho_tail)
        self.tail_threshold, self.switch_fraction = float(tail_threshold), float(switch_fraction)
        self.is_tail = (counts < self.tail_threshold).to(float)
        self.skip_empty_groups = bool(skip_empty_groups)

    @property
    def switched(self) -> bool:
        """True in stage 2 (head radius 0)."""
        return self.num_epochs is not None and self.epoch >= self.switch_fraction * self.num_epochs

    def _extra_state(self):
        return {"switched": self.switched}

    def _compute(self, st: StepState, passes: Passes) -> list:
        head, tail = split_head_tail(self, st)
        total = [None if h is None and t is None else 1.0 for h, t in zip(head, tail, strict=True)]
        g_head, g_tail = passes.split(st, head, tail, total=total)
        rho_head = 0.0 if self.switched else self.rho_head
        return add(self._group_update(st, passes, g_head, head, rho_head),
                   self._group_update(st, passes, g_tail, tail, self.rho_tail))

    def _group_update(self, st: StepState, passes: Passes, g: list, weights: list, rho: float) -> list:
        """grad L_group(w + eps_group), or the gradient at w when rho == 0."""
        if rho == 0:
            return g
        g = passes.sync_perturbation(st, g)
        passes.perturb_sam(st, g, rho)
        del g
        (g_adv,) = passes.grad(st, [weights], perturbed=True)
        nm.restore_(st.weights, st.backup)
        return g_adv
