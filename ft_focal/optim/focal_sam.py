"""Focal-SAM (Li et al., ICML 2025) - cost 2F + 3B (official), 2F + 2B with ``one_backward``."""
from __future__ import annotations

from ._numerics import add
from ._step import Passes, SharpnessOptimizer, StepState
from ._wrapping import class_table


class FocalSAM(SharpnessOptimizer):
    """Focal-SAM: ``L(w) + sum_c a_c [L^c(w + eps) - L^c(w)]`` with one shared, focal-weighted eps.

    Per-sample coefficient ``a_j = lam * (1 - n_{y_j} / N) ** gamma`` from TRAINING class counts.
    Step (as scongl/Focal-SAM ``train_step.py`` + ``focal_sam.py``):

    1. forward at w, per-sample losses l_j;
    2. ``g1 = grad (1/B) sum_j (1 - a_j) l_j (w)``;
    3. ``g2 = grad (1/B) sum_j a_j l_j (w)`` (second backward of the same graph);
    4. ``eps = rho g2 / (||g2|| + 1e-12)`` (global norm);
    5. ``g3 = grad (1/B) sum_j a_j l_j (w + eps)``;
    6. restore w; base step with ``g1 + g3``.

    ``lam = 0`` is plain ERM; ``gamma = 0, lam = 1`` is exactly SAM; ``gamma = 0`` gives
    ``(1 - lam) grad L(w) + lam grad L(w + eps)``. The official code also has an ``adaptive`` (ASAM)
    switch that its released settings do not use; it is not offered here.

    ``one_backward`` (default ``"auto"``: on when ``model=`` is given and every trainable parameter
    sits in a covered layer, off otherwise, said once at INFO; ``True`` forces it, ``False`` never)
    forms steps 2-3 from ONE backward of the unweighted
    mean loss: every covered layer (Linear, LayerNorm, the cosine head, a learnable scale) runs as an
    ``autograd.Function`` whose backward also gives the a-weighted gradient (closed forms, see
    ``one_backward/__init__.py`` and ``one_backward/rules.py``). Same update (to float rounding) at
    2F + 2B when every trainable parameter sits in a covered layer (LoRA, AdaptFormer, heads);
    otherwise the exact path above is used (warning logged once). The first step is checked against
    the exact path (one more backward) unless ``one_backward_check=False``.
    """

    method_kwargs = ("rho", "gamma", "lam", "class_counts", "one_backward", "one_backward_check")

    def __init__(self, params, base_optimizer_cls, rho=0.05, gamma=0.5, lam=0.8, class_counts=None,
                 one_backward="auto", **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        counts = class_table(class_counts)
        super().__init__(params, base_optimizer_cls, one_backward=one_backward, **kwargs)
        self.rho, self.gamma, self.lam = float(rho), float(gamma), float(lam)
        self.coefficients = self.lam * (1.0 - counts / counts.sum()) ** self.gamma

    def _compute(self, st: StepState, passes: Passes) -> list:
        a = [self.per_sample(st, self.coefficients, i) for i in range(len(st.micro_batches))]
        rest = [None] * len(a) if st.one_backward is not None else [1.0 - ai for ai in a]   # implied by total
        g1, g2 = passes.split(st, rest, a, total=[1.0] * len(a))
        g2 = passes.sync_perturbation(st, g2)
        passes.perturb_sam(st, g2, self.rho)
        del g2
        (g3,) = passes.grad(st, [a], perturbed=True)
        return add(g1, g3)
