"""ImbSAM (Zhou et al., ICCV 2023) - cost 2F + 3B (official), 2F + 2B with ``one_backward``."""
from __future__ import annotations

from ._numerics import add, sum_optional
from ._step import Passes, SharpnessOptimizer, StepState
from ._wrapping import class_table


class ImbSAM(SharpnessOptimizer):
    """Imbalanced SAM: sharpness-aware only on the tail classes.

    Tail = classes with TRAINING count ``n_c < tail_threshold`` (official default 20); head = the rest.
    With B the whole batch size (head and tail):

    * ``g_head = grad (1/B) sum_{j in head} l_j (w)``
    * ``g_t = tail_weight * grad (1/B) sum_{j in tail} l_j (w)``; ``eps = rho g_t / (||g_t|| + 1e-12)``
    * update with ``g_head + tail_weight * grad (1/B) sum_{j in tail} l_j (w + eps)``.

    Paper vs official code: the paper's objective has no factor on the tail term (``tail_weight=1``,
    the default); the released cool-xuan/Imbalanced_SAM training code multiplies BOTH tail sums by 2
    (``tail_weight=2.0`` reproduces the official runs; on the first sum it cancels in the
    normalisation). The official code adds 1e-16 to the norm; 1e-12 is used here as for every method.

    A batch without tail samples costs 1F + 1B (no perturbation) when its labels are on the CPU
    and ``skip_empty_groups`` (default); on an accelerator the absent group's pass runs with zero
    weights instead of reading the labels on the host (same update). ``one_backward=True``
    (needs ``model=``) gets g_head and g_t from one backward (see ``one_backward/__init__.py``).
    """

    method_kwargs = ("rho", "class_counts", "tail_threshold", "tail_weight", "one_backward",
                     "one_backward_check", "skip_empty_groups")

    def __init__(self, params, base_optimizer_cls, rho=0.05, class_counts=None, tail_threshold=20,
                 tail_weight=1.0, one_backward="auto", skip_empty_groups=True, **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        counts = class_table(class_counts)
        super().__init__(params, base_optimizer_cls, one_backward=one_backward, **kwargs)
        self.rho, self.tail_threshold, self.tail_weight = float(rho), float(tail_threshold), float(tail_weight)
        self.is_tail = (counts < self.tail_threshold).to(float)
        self.skip_empty_groups = bool(skip_empty_groups)

    def _compute(self, st: StepState, passes: Passes) -> list:
        head, tail = split_head_tail(self, st, self.tail_weight)
        total = [None if h is None and t is None else
                 (1.0 if self.tail_weight == 1.0 else sum_optional(h, t)) for h, t in zip(head, tail, strict=True)]
        g_head, g_tail = passes.split(st, head, tail, total=total)
        g_tail = passes.sync_perturbation(st, g_tail)
        passes.perturb_sam(st, g_tail, self.rho)
        del g_tail
        (g_adv,) = passes.grad(st, [tail], perturbed=True)
        return add(g_head, g_adv)


def split_head_tail(opt: SharpnessOptimizer, st: StepState, tail_weight: float = 1.0) -> tuple[list, list]:
    """Per micro-batch head / tail weights. A group absent from a micro-batch is None (its passes
    are skipped) when the labels are on the CPU, where counting them costs no device read; on an
    accelerator both stay tensors (an absent group has zero weights: same update, no host read)."""
    head, tail = [], []
    for i, (_, y) in enumerate(st.micro_batches):
        t = opt.per_sample(st, opt.is_tail, i)
        nt = int(t.sum()) if y.device.type == "cpu" and opt.skip_empty_groups else -1
        head.append(None if nt == t.numel() else (1.0 if nt == 0 else 1.0 - t))
        tail.append(None if nt == 0 else t * tail_weight)
    return head, tail

