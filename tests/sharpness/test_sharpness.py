"""Sharpness diagnostics against analytic Hessians and torch.autograd.functional.hessian."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ft_focal.sharpness import (
    collect_per_class_trace,
    dense_hessian,
    exact_hessian_trace,
    first_order_sharpness,
    group_sharpness,
    hessian_vector_product,
    hutchinson_trace,
    shot_group_classes,
    top_hessian_eigenvalues,
)

EIGS = np.array([10.0, 5.0, 3.0, 2.0, 1.0, 0.5])


def _quadratic():
    """Mean loss 0.5 w^T A w over two batches of 2 and 4 samples whose own matrices differ
    (A + D and A - D/2): only the sample-count-weighted average has Hessian A."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    A = Q @ np.diag(EIGS) @ Q.T
    D = rng.normal(size=(6, 6))
    D = D + D.T
    mats = [(torch.tensor(A + D), 2), (torch.tensor(A - D / 2), 4)]
    w = torch.tensor(rng.normal(size=6), requires_grad=True)

    def loss_fn(batch):
        M, n = batch
        return 0.5 * w @ M @ w, n

    return A, w, loss_fn, mats


def test_hvp_averages_by_sample_count():
    A, w, loss_fn, batches = _quadratic()
    v = torch.arange(6, dtype=torch.float64)
    (hv,) = hessian_vector_product(loss_fn, [w], [v], batches)
    np.testing.assert_allclose(hv.numpy(), A @ v.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dense_hessian(loss_fn, [w], batches).numpy(), A, atol=1e-10)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_quadratic_top_eigenvalues(method):
    _, w, loss_fn, batches = _quadratic()
    vals = top_hessian_eigenvalues(loss_fn, [w], batches, k=3, iters=200, tol=1e-10,
                                   method=method)
    np.testing.assert_allclose(vals, EIGS[:3], rtol=1e-6)
    again = top_hessian_eigenvalues(loss_fn, [w], batches, k=3, iters=200, tol=1e-10,
                                    method=method)
    assert vals == again  # deterministic given the seed


def test_quadratic_trace():
    A, w, loss_fn, batches = _quadratic()
    true = EIGS.sum()
    assert exact_hessian_trace(loss_fn, [w], batches) == pytest.approx(true, rel=1e-10)
    mean, se = hutchinson_trace(loss_fn, [w], batches, samples=2000, seed=1)
    # Rademacher variance of v^T A v is 2 * sum_{i != j} A_ij^2
    sd = math.sqrt(2 * ((A ** 2).sum() - (np.diag(A) ** 2).sum()))
    assert se == pytest.approx(sd / math.sqrt(2000), rel=0.1)
    assert abs(mean - true) < 4 * sd / math.sqrt(2000)
    assert hutchinson_trace(loss_fn, [w], batches, samples=20, seed=3) == \
        hutchinson_trace(loss_fn, [w], batches, samples=20, seed=3)


def test_first_order_sharpness_quadratic_and_restore():
    A, w, loss_fn, batches = _quadratic()
    w0 = w.detach().clone()
    rho = 0.1
    g = A @ w0.numpy()
    u = g / np.linalg.norm(g)
    expected = rho * np.linalg.norm(g) + 0.5 * rho ** 2 * u @ A @ u
    assert first_order_sharpness(loss_fn, [w], batches, rho=rho) == pytest.approx(expected,
                                                                                  rel=1e-9)
    assert torch.equal(w.detach(), w0)


def _mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    return model, x, y


def _full_hessian(model, x, y, mask=None):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if mask is not None:
        x, y = x[mask], y[mask]

    def f(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(np.prod(s))
            params[n] = theta[i:i + k].view(s)
            i += k
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat)


def test_mlp_top_eigenvalue_matches_full_hessian():
    model, x, y = _mlp_problem()
    params = list(model.parameters())
    H = _full_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(H).numpy()
    dominant = eig[np.argmax(np.abs(eig))]
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def loss_fn(batch):
        xb, yb = batch
        return F.cross_entropy(model(xb), yb), len(yb)

    np.testing.assert_allclose(dense_hessian(loss_fn, params, batches).numpy(), H.numpy(),
                               atol=1e-10)
    (top,) = top_hessian_eigenvalues(loss_fn, params, batches, k=1, iters=1000, tol=1e-10)
    assert top == pytest.approx(dominant, rel=1e-4)
    lz = top_hessian_eigenvalues(loss_fn, params, batches, k=2, iters=len(eig), method="lanczos")
    np.testing.assert_allclose(lz, np.sort(eig)[::-1][:2], rtol=1e-6)
    assert exact_hessian_trace(loss_fn, params, batches) == pytest.approx(float(eig.sum()),
                                                                          rel=1e-8)


def test_group_sharpness_matches_direct_computation():
    model, x, y = _mlp_problem(0)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    criterion = nn.CrossEntropyLoss(reduction="none")
    groups = {"a": {0}, "bc": {1, 2}, "none": {5}}
    model.train()
    res = group_sharpness(model, params, batches, criterion, groups, k=1, iters=1000, tol=1e-10,
                          trace_samples=5, rho=0.05, seed=0, per_class_trace=[1, 2],
                          per_class_samples=3)
    assert model.training  # mode restored
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    json.dumps(res)
    assert res["a"]["num_samples"] == 4 and res["bc"]["num_samples"] == 6
    assert res["none"]["num_samples"] == 0 and res["none"]["trace"] is None

    for name, classes in (("a", [0]), ("bc", [1, 2])):
        mask = torch.isin(y, torch.tensor(classes))
        eig = torch.linalg.eigvalsh(_full_hessian(model, x, y, mask)).numpy()
        assert res[name]["eigenvalues"][0] == pytest.approx(eig[np.argmax(np.abs(eig))],
                                                            rel=1e-4)
        assert res[name]["loss"] == pytest.approx(float(F.cross_entropy(model(x[mask]).detach(),
                                                                        y[mask])))
        assert res[name]["sam_sharpness"] > 0
    assert set(res["bc"]["per_class_trace"]) == {"1", "2"}
    assert "per_class_trace" not in res["a"]
    assert set(collect_per_class_trace(res)) == {1, 2}

    # deterministic, and a callable returning a fresh iterator works the same
    res2 = group_sharpness(model, params, lambda: iter(batches), criterion, groups, k=1,
                           iters=1000, tol=1e-10, trace_samples=5, rho=0.05, seed=0,
                           per_class_trace=[1, 2], per_class_samples=3)
    assert res2 == res


def test_input_validation():
    _, w, loss_fn, batches = _quadratic()
    with pytest.raises(ValueError, match="one-shot"):
        top_hessian_eigenvalues(loss_fn, [w], iter(batches))
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="require"):
        hutchinson_trace(loss_fn, [frozen], batches)
    with pytest.raises(ValueError, match="method"):
        top_hessian_eigenvalues(loss_fn, [w], batches, method="arnoldi")
    assert shot_group_classes([500, 50, 5, 0]) == {"many": {0}, "medium": {1}, "few": {2, 3}}
