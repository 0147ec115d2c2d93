"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) - cost 2F + 2B."""
from __future__ import annotations

from ._step import Passes, SharpnessOptimizer, StepState


class SAM(SharpnessOptimizer):
    """Sharpness-aware minimisation.

    ``g = grad L(w)``; ``eps = rho g / (||g|| + 1e-12)`` with the norm taken globally over all
    trainable parameters; the base optimizer steps at w with ``grad L(w + eps)``.

    ``adaptive=True`` is ASAM in the form of davda54/sam (also used by scongl/Focal-SAM):
    ``T = |w| + eta`` elementwise, ``eps = rho T^2 g / (||T g|| + 1e-12)`` for EVERY parameter,
    ``eta = 0`` by default. The ASAM authors' code (SamsungLabs/ASAM) differs: ``eta = 0.01`` and
    only tensors whose name contains "weight" are rescaled (biases use T = 1); set ``eta`` to match
    the former. ASAM wants a ~10x larger rho (0.5 - 2.0).
    """

    method_kwargs = ("rho", "adaptive", "eta")
    allow_scalar_loss = True
    multi_backward = False

    def __init__(self, params, base_optimizer_cls, rho=0.05, adaptive=False, eta=0.0, **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        super().__init__(params, base_optimizer_cls, **kwargs)
        self.rho, self.adaptive, self.eta = float(rho), bool(adaptive), float(eta)

    def _compute(self, st: StepState, passes: Passes) -> list:
        ones = [1.0] * len(st.micro_batches)
        (g,) = passes.grad(st, [ones])
        g = passes.sync_perturbation(st, g)
        passes.perturb_sam(st, g, self.rho, self.adaptive, self.eta)
        del g
        (g_adv,) = passes.grad(st, [ones], perturbed=True)
        return g_adv
