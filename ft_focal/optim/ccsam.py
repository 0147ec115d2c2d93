"""CC-SAM (Zhou et al., CVPR 2023): class-conditional sharpness-aware minimisation."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _numerics as nm
from ._numerics import add
from ._step import Passes, SharpnessOptimizer, StepState, Weighting
from ._wrapping import class_table


class CCSAM(SharpnessOptimizer):
    """One perturbation per class c present in the batch, from that class's own loss.

    ``scope="network"`` (the paper; all trainable parameters, k = their number of entries)::

        L^c = (1/B) sum_{j: y_j = c} l_j
        rho_c = rho * (||w|| / (2 ||grad L^c(w)||))^(1/2) * k^(-1/4) * max(n_c - 1, 1)^(-1/4)
        eps_c = sqrt(k) * rho_c * grad L^c(w) / ||grad L^c(w)||
        update: (1 - flat_ratio) grad L(w) + flat_ratio * sum_c grad L^c(w + eps_c)

    with global norms (+1e-12 in each denominator). ``rho`` (default 1.0 = the paper's formula) is the
    official code's ``noise_ratio`` multiplier. Cost: 1F + K_b B at w (``grad L(w)`` is the sum of
    the class gradients) + K_b (F + B) perturbed, K_b = classes in the batch; memory: K_b gradient
    copies of the perturbed parameters.

    ``scope="classifier"`` (the official zzpustc/CC-SAM demo, ``train_cifar.py``): only
    ``classifier_params`` are perturbed, each TENSOR p with its own norms and the class-MEAN loss::

        g_cp = grad_p mean_{j: y_j = c} l_j  (classifier parameters only)
        eps_cp = rho * sqrt(||p||) / sqrt(2 ||g_cp||) * (n_c - 1)^(-1/4) * k^(-1/4) * sqrt(k) * g_cp / ||g_cp||

    with k = number of classifier entries and ``rho`` defaulting to the demo's ``noise_ratio`` 1e-6;
    the update is as above (the backbone receives gradients of both terms). Differences from the
    demo: the perturbed forward is re-run through the whole model (the demo reuses the features; the
    same values unless the model is stochastic, e.g. dropout), and n_c = 1 (the demo divides by zero)
    and n_c = 0 use max(n_c - 1, 1) = 1, as in network scope. Under several processes the class set
    is the union over ranks and the classifier-scope class mean is per rank.
    """

    method_kwargs = ("rho", "class_counts", "scope", "classifier_params", "flat_ratio")

    def __init__(self, params, base_optimizer_cls, class_counts=None, scope="network",
                 classifier_params=None, flat_ratio=0.3, rho=None, **kwargs):
        if scope not in ("network", "classifier"):
            raise ValueError(f"scope must be 'network' or 'classifier', got {scope!r}")
        if scope == "classifier" and not classifier_params:
            raise ValueError("scope='classifier' needs classifier_params= (the head's parameters)")
        if not 0.0 <= flat_ratio <= 1.0:
            raise ValueError(f"flat_ratio must be in [0, 1], got {flat_ratio}")
        self.counts = class_table(class_counts)
        super().__init__(params, base_optimizer_cls, **kwargs)
        self.scope, self.flat_ratio = scope, float(flat_ratio)
        self.rho = float(rho) if rho is not None else (1.0 if scope == "network" else 1e-6)
        if self.rho < 0:
            raise ValueError(f"rho must be non-negative, got {self.rho}")
        self._cls_ids = {id(p) for p in classifier_params} if classifier_params else None

    def _classes(self, st):
        ys = torch.cat([y.reshape(-1).cpu() for _, y in st.micro_batches])
        if ys.numel() and int(ys.max()) >= self.counts.numel():
            raise ValueError(f"label {int(ys.max())} out of range for class_counts of length {self.counts.numel()}")
        present = torch.bincount(ys, minlength=self.counts.numel()).to(torch.float32)
        if st.world > 1:   # every rank loops over the same classes (same collectives)
            present = present.to(st.device)
            dist.all_reduce(present)
            present = present.cpu()
        local = torch.bincount(ys, minlength=self.counts.numel())
        return [int(c) for c in torch.nonzero(present).flatten()], local

    @staticmethod
    def _masks(st, c, scale=1.0):
        out = []
        for _, y in st.micro_batches:
            m = y == c
            out.append(m.to(torch.float64) * scale if bool(m.any()) else None)
        return out

    def _compute(self, st: StepState, passes: Passes) -> list:
        classes, local = self._classes(st)
        if self.scope == "network":
            return self._network(st, passes, classes)
        return self._classifier(st, passes, classes, local)

    def _network(self, st: StepState, passes: Passes, classes: list) -> list:
        grads = passes.grad(st, [self._masks(st, c) for c in classes])
        n = len(st.params)
        g_w = [None] * n
        for g in grads:
            g_w = add(g_w, g)
        k = sum(p.numel() for p in st.params)
        w_norm = float(self._norm(st, st.weights))
        acc = [None] * n
        for c, g in zip(classes, grads, strict=True):
            g = passes.sync_perturbation(st, g)
            gn = float(self._norm(st, g))
            rho_c = self.rho * math.sqrt(w_norm / (2 * gn + 1e-12)) * k ** -0.25 * self._shots(c) ** -0.25
            nm.perturb_(st.weights, g, math.sqrt(k) * rho_c / (gn + 1e-12), st.backup)
            (g_adv,) = passes.grad(st, [self._masks(st, c, self.flat_ratio)], perturbed=True)
            nm.restore_(st.weights, st.backup)
            acc = add(acc, g_adv)
        return add(acc, g_w, alpha=1.0 - self.flat_ratio)

    def _classifier(self, st: StepState, passes: Passes, classes: list, local) -> list:
        idx = [j for j, p in enumerate(st.params) if id(p) in self._cls_ids]
        if not idx:
            raise ValueError("none of classifier_params is a trainable parameter of this optimizer")
        head = [st.params[j] for j in idx]
        k = sum(p.numel() for p in head)
        ws = [Weighting([1.0 - self.flat_ratio] * len(st.micro_batches))]
        ws += [Weighting(self._masks(st, c), denom=max(int(local[c]), 1), inputs=head) for c in classes]
        grads = passes.grad(st, ws)
        g_w, acc = grads[0], [None] * len(st.params)
        for c, g in zip(classes, grads[1:], strict=True):
            g = passes.sync_perturbation(st, g)
            for j in idx:   # each classifier tensor with its own norms
                if g[j] is None:
                    continue
                gn, pn = self._tensor_norms(st, g[j], st.weights[j])
                rho_cp = self.rho * math.sqrt(pn / (2 * gn + 1e-12)) * self._shots(c) ** -0.25 * k ** -0.25
                only = [g[i] if i == j else None for i in range(len(g))]
                nm.perturb_(st.weights, only, rho_cp * math.sqrt(k) / (gn + 1e-12), st.backup)
            (g_adv,) = passes.grad(st, [self._masks(st, c, self.flat_ratio)], perturbed=True)
            nm.restore_(st.weights, st.backup)
            acc = add(acc, g_adv)
        return add(g_w, acc)

    @staticmethod
    def _norm(st, tensors):
        """Global L2 norm (FSDP2 / sharded: summed over the shards of every rank)."""
        return nm.global_norm(tensors, st.device, st.norm_world, st.norm_group)

    def _tensor_norms(self, st, g, w):
        """(||g||, ||w||) of one classifier tensor; a sharded tensor's norms are all-reduced."""
        if st.norm_world == 1:
            return float(g.norm()), float(w.norm())
        return float(self._norm(st, [g])), float(self._norm(st, [w]))

    def _shots(self, c):
        """max(n_c - 1, 1): the formula's (n_c - 1) guarded against n_c <= 1."""
        return max(float(self.counts[c]) - 1.0, 1.0)
