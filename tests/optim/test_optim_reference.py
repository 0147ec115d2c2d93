"""Independent reference computations for the optimizer tests (float64).

Everything here is written from docs/algorithms.md with ``torch.autograd.grad`` on explicitly formed
losses and ``torch.func.functional_call`` at explicitly formed weights - no code of ft_focal.optim.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


def mlp(seed=0, d_in=5, hidden=7, n_cls=4, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, n_cls)]
    return nn.Sequential(*layers).double()


def batch(seed=1, n=12, d_in=5, labels=(0, 0, 0, 1, 1, 2, 3, 3, 0, 1, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels[:n])
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), y


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load(model, w):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in w:
                p.copy_(w[n])


def closure_for(model, x, y):
    def closure():
        return F.cross_entropy(model(x), y, reduction="none")
    return closure


def losses_at(model, w, x, y):
    """Per-sample losses with the trainable weights replaced by ``w`` (model is not modified)."""
    full = {n: p.detach() for n, p in model.named_parameters()}
    full.update(w)
    return F.cross_entropy(functional_call(model, full, (x,)), y, reduction="none")


def grad(model, w, x, y, wts, B=None, only=None):
    """grad of sum_j wts_j l_j(w) / B (B defaults to len(y)) w.r.t. w (or the names in only)."""
    leaves = {k: v.clone().requires_grad_(only is None or k in only) for k, v in w.items()}
    B = len(y) if B is None else B
    loss = (losses_at(model, leaves, x, y) * wts).sum() / B
    keys = [k for k in leaves if only is None or k in only]
    gs = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
    out = {k: torch.zeros_like(w[k]) for k in w}
    out.update({k: (g if g is not None else torch.zeros_like(w[k])) for k, g in zip(keys, gs, strict=True)})
    return out


def norm(g):
    return torch.sqrt(sum((v ** 2).sum() for v in g.values()))


def axpy(a, b, s=1.0):
    return {k: a[k] + s * b[k] for k in a}


def scal(a, s):
    return {k: s * v for k, v in a.items()}


def sam_eps(g, rho, w=None, adaptive=False, eta=0.0):
    if adaptive:
        t = {k: w[k].abs() + eta for k in w}
        n = norm({k: t[k] * g[k] for k in g})
        return {k: rho * t[k] ** 2 * g[k] / (n + 1e-12) for k in g}
    n = norm(g)
    return {k: rho * g[k] / (n + 1e-12) for k in g}


class RefSGD:
    """torch.optim.SGD semantics (dampening 0), written out."""

    def __init__(self, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        self.lr, self.mom, self.wd, self.nesterov, self.buf = lr, momentum, weight_decay, nesterov, {}

    def step(self, w, g):
        out = {}
        for k in w:
            d = g[k] + self.wd * w[k]
            if self.mom:
                self.buf[k] = d.clone() if k not in self.buf else self.mom * self.buf[k] + d
                d = d + self.mom * self.buf[k] if self.nesterov else self.buf[k]
            out[k] = w[k] - self.lr * d
        return out


# ----------------------------------------------------------------- method references
def ref_erm(model, w, x, y):
    return grad(model, w, x, y, torch.ones(len(y), dtype=torch.float64))


def ref_sam(model, w, x, y, rho, adaptive=False, eta=0.0):
    one = torch.ones(len(y), dtype=torch.float64)
    eps = sam_eps(grad(model, w, x, y, one), rho, w, adaptive, eta)
    return grad(model, axpy(w, eps), x, y, one)


def focal_coef(counts, gamma, lam, y):
    c = torch.tensor(counts, dtype=torch.float64)
    return (lam * (1 - c / c.sum()) ** gamma)[y]


def ref_focal(model, w, x, y, rho, gamma, lam, counts):
    a = focal_coef(counts, gamma, lam, y)
    g1 = grad(model, w, x, y, 1 - a)
    g2 = grad(model, w, x, y, a)
    g3 = grad(model, axpy(w, sam_eps(g2, rho)), x, y, a)
    return axpy(g1, g3)


def tail_mask(counts, thr, y):
    return (torch.tensor(counts) < thr).to(torch.float64)[y]


def ref_imbsam(model, w, x, y, rho, counts, thr=20, tw=1.0):
    t = tail_mask(counts, thr, y)
    g_head = grad(model, w, x, y, 1 - t)
    g_t = grad(model, w, x, y, tw * t)
    return axpy(g_head, grad(model, axpy(w, sam_eps(g_t, rho)), x, y, tw * t))


def ref_ssesam(model, w, x, y, rho_h, rho_t, counts, thr, switched):
    t = tail_mask(counts, thr, y)
    out = None
    for m, rho in ((1 - t), 0.0 if switched else rho_h), (t, rho_t):
        g = grad(model, w, x, y, m)
        if rho > 0 and m.sum() > 0:
            g = grad(model, axpy(w, sam_eps(g, rho)), x, y, m)
        out = g if out is None else axpy(out, g)
    return out


def ref_ccsam_network(model, w, x, y, counts, rho, flat):
    k = sum(v.numel() for v in w.values())
    wn = norm(w)
    total = scal(ref_erm(model, w, x, y), 1 - flat)
    for c in sorted(set(y.tolist())):
        m = (y == c).to(torch.float64)
        g = grad(model, w, x, y, m)
        gn = norm(g)
        n_c = max(counts[c] - 1, 1)
        rho_c = rho * math.sqrt(wn / (2 * gn)) * k ** -0.25 * n_c ** -0.25
        eps = {kk: math.sqrt(k) * rho_c * g[kk] / gn for kk in g}
        total = axpy(total, grad(model, axpy(w, eps), x, y, m), flat)
    return total


def ref_ccsam_classifier(model, w, x, y, counts, rho, flat, head):
    """The official demo's per-tensor rule on the classifier tensors ``head`` (names)."""
    k = sum(w[n].numel() for n in head)
    total = scal(ref_erm(model, w, x, y), 1 - flat)
    for c in sorted(set(y.tolist())):
        m = (y == c).to(torch.float64)
        g = grad(model, w, x, y, m, B=int(m.sum()), only=head)   # class-mean loss, classifier only
        eps = {n: torch.zeros_like(v) for n, v in w.items()}
        for n in head:
            gn, pn = g[n].norm(), w[n].norm()
            num = rho * torch.sqrt(pn) / torch.sqrt(gn) / math.sqrt(2) / max(counts[c] - 1, 1) ** 0.25 / k ** 0.25
            eps[n] = num * g[n] / gn * math.sqrt(k)
        total = axpy(total, grad(model, axpy(w, eps), x, y, m), flat)
    return total


def run(opt, model, x, y, steps=1, closure=None):
    out = None
    for _ in range(steps):
        out = opt.step(closure or closure_for(model, x, y), targets=y)
    return out


def ref_run(model, w, x, y, gfn, sgd, steps=1):
    for _ in range(steps):
        w = sgd.step(w, gfn(w))
    return w


def max_diff(model, w):
    return max(float((p.detach() - w[n]).abs().max()) for n, p in model.named_parameters() if n in w)
