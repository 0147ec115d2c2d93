"""Per-layer rules of the one-backward step: each gives, in ONE backward, the gradient of its
parameters under the total weighting AND under the part weighting.

The optimizer back-propagates ``sum_j t_j l_j / B`` once. A covered layer receives, for sample j,
the output gradient ``delta_j`` of that loss; the part weighting's gradient of its parameters is the
same sum with ``delta_j`` scaled by ``r_j = part_j / total_j`` (see one_backward/__init__.py). Each rule is
an ``autograd.Function`` whose backward returns the ordinary gradients for the parameters and the
part gradients for *twins*: ``p.detach().requires_grad_()`` leaves that share p's storage (no copy),
so autograd accumulates the part gradient in ``twin.grad`` with no hooks and no side effects, which
keeps ``torch.compile`` graphs whole.

Rules (closed forms, no module is re-run):
  linear:     y = x W^T + b. grad W = delta^T x; part W = (r delta)^T x, both from ONE (batched)
              GEMM: the narrower of x and delta is stacked with its r-weighted copy ([2, N, k]).
  layer_norm: y = xhat w + b. [delta xhat, delta] ([N, 2D]) reduced by [1; r] ([2, N]) in one GEMM.
  scale:      y = s u (s a learnable scalar). per-sample sums of delta u, summed and r-weighted.
  cosine:     y = scale <f/|f|, W_c/|W_c|>: the linear rule on the normalised features and weights;
              the twin goes through the same normalisation, so autograd applies its closed form.
Under autocast the GEMMs run in the autocast dtype, as autograd's own weight-gradient GEMMs do;
LayerNorm runs in float32, as autocast runs it.

Magnitudes (the first-step check only, one_backward/__init__.py ``OneBackward.compare``): each rule
also takes *magnitude twins*; when given, their gradient is the sum of the ABSOLUTE per-sample
terms of the part gradient, ``M = sum_j |r_j| |J_j^T delta_j|`` elementwise: the same GEMM / sum on
absolute values (linear: ``(|r| |delta|)^T |x|``; layer_norm: ``|r|`` against ``[|delta xhat|, |delta|]``;
scale: ``sum_j |r_j| sum |delta_j u_j|``; cosine: the linear one in normalised coordinates, carried
back through ``|J|^T`` of the normalisation, ``abs_normalize``). Rounding error of a sum scales with
``M``, not with the (possibly cancelling) result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_weights(ratio: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """[1; r] shaped [2, 1, .., B (at 1 + dim), .., 1]: broadcast against a ``t`` of ``ndim`` dims
    with the batch at ``dim``, ``t * pair`` is [t; r t] ([2, *t.shape]) in one multiply."""
    shape = [2] + [1] * ndim
    shape[1 + dim] = ratio.shape[0]
    return torch.stack([torch.ones_like(ratio), ratio]).view(shape)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, twin_w, twin_b, pair, mag_w=None, mag_b=None):
        ctx.save_for_backward(x, weight, pair)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, pair = ctx.saved_tensors
        need_x, need_w, need_b, need_tw, need_tb = ctx.needs_input_grad[:5]
        mw = mb = None
        if ctx.needs_input_grad[6] or ctx.needs_input_grad[7]:
            weighted = (grad * pair[1]).abs()
            if ctx.needs_input_grad[6]:
                mw = weighted.reshape(-1, grad.shape[-1]).t().mm(x.abs().reshape(-1, x.shape[-1]))
            if ctx.needs_input_grad[7]:
                mb = weighted.reshape(-1, grad.shape[-1]).sum(0)
        gx = gw = gb = pw = pb = None
        if need_x:
            gx = grad.matmul(weight)
        n_in, n_out = x.shape[-1], grad.shape[-1]
        both_d = None
        if need_w or need_tw:
            # one batched GEMM; the wide operand is broadcast (stride 0), not copied
            if n_in <= n_out:   # x is the narrow operand: delta^T [x; r x] -> [2, out, in]
                narrow = (x * pair).reshape(2, -1, n_in)
                both = torch.bmm(grad.reshape(-1, n_out).t().expand(2, -1, -1), narrow)
            else:               # delta is the narrow one: [delta; r delta]^T x -> [2, out, in]
                both_d = (grad * pair).reshape(2, -1, n_out)
                both = torch.bmm(both_d.transpose(1, 2), x.reshape(-1, n_in).expand(2, -1, -1))
            gw, pw = both.unbind(0)   # contiguous: autograd accumulates them without a copy
        if need_b or need_tb:
            if both_d is None:
                both_d = (grad * pair).reshape(2, -1, n_out)
            gb, pb = both_d.sum(1).unbind(0)
        return gx, gw, gb, pw, pb, None, mw, mb


def linear(x, weight, bias, twin_w, twin_b, pair, mag_w=None, mag_b=None):
    """F.linear(x, weight, bias) whose backward also fills twin_w.grad / twin_b.grad with the part
    gradient (``pair``: ``pair_weights`` for x's layout) and mag_w.grad / mag_b.grad, when given,
    with its magnitude (module docstring). Under autocast the operands are cast as autocast casts
    them (recorded by autograd)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        return _Linear.apply(x, weight, bias, twin_w, twin_b, pair, mag_w, mag_b)


class _AbsNormalize(torch.autograd.Function):
    """F.normalize(w, dim=-1) whose backward applies |J|^T (J: the normalisation's Jacobian, per
    row ``(I - n n^T) / |w|``): carries a magnitude back to w's coordinates as an upper bound of
    the absolute terms, ``(v - 2 n^2 v + |n| <|n|, v>) / |w|`` per row (n = w / |w|)."""

    @staticmethod
    def forward(ctx, w):
        norm = w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = w / norm
        ctx.save_for_backward(n, norm)
        return n

    @staticmethod
    def backward(ctx, v):
        n, norm = ctx.saved_tensors
        return (v - 2 * n * n * v + n.abs() * (n.abs() * v).sum(-1, keepdim=True)) / norm


def abs_normalize(mag_w):
    """The magnitude twin of a normalised weight (None stays None)."""
    return None if mag_w is None else _AbsNormalize.apply(mag_w)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, twin_w, twin_b, pair, shape, eps, mag_w=None, mag_b=None):
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd, pair)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd, pair = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.shape, mean, rstd, weight, bias,
                                                           [True, False, False])[0]
        d = x.shape[-1]
        rows = torch.cat([grad * ((x - mean) * rstd), grad], -1).reshape(-1, 2 * d)     # [N, 2D]
        weights = pair.expand(2, *grad.shape[:-1], 1).reshape(2, -1)                      # [2, N]
        both = weights.mm(rows)                                                            # [2, 2D]
        gw, gb, pw, pb = both[0, :d], both[0, d:], both[1, :d], both[1, d:]
        keep = ctx.needs_input_grad
        mw = mb = None
        if keep[8] or keep[9]:
            magnitude = weights[1].abs().unsqueeze(0).mm(rows.abs())[0]                     # [2D]
            mw, mb = (magnitude[:d] if keep[8] else None), (magnitude[d:] if keep[9] else None)
        return (gx, gw if keep[1] else None, gb if keep[2] else None, pw if keep[3] else None,
                pb if keep[4] else None, None, None, None, mw, mb)


def layer_norm(x, weight, bias, twin_w, twin_b, pair, eps, upcast=False, mag_w=None, mag_b=None):
    """F.layer_norm over the last dim (float32 under autocast or with ``upcast``), twin part grads
    (and magnitude-twin grads when given)."""
    dev = x.device.type
    if upcast or (torch.is_autocast_enabled(dev) and x.dtype in (torch.float16, torch.bfloat16)):
        x = x.float()
    with torch.autocast(dev, enabled=False):
        return _LayerNorm.apply(x, weight.to(x.dtype), bias.to(x.dtype), twin_w, twin_b, pair,
                                [x.shape[-1]], eps, mag_w, mag_b)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, u, twin_s, ratio, dim, mag_s=None):
        ctx.save_for_backward(s, u, ratio)
        ctx.dim = dim
        return s * u

    @staticmethod
    def backward(ctx, grad):
        s, u, ratio = ctx.saved_tensors
        gu = (grad * s).to(u.dtype) if ctx.needs_input_grad[1] else None
        dims = [k for k in range(grad.dim()) if k != ctx.dim]
        per_sample = (grad * u).sum(dims) if dims else grad * u     # [B]: d l_j / d s (s has one element)
        gs = per_sample.sum().reshape(s.shape).to(s.dtype)
        ps = per_sample.dot(ratio.to(per_sample.dtype)).reshape(s.shape).to(s.dtype)
        ms = None
        if ctx.needs_input_grad[5]:
            terms = (grad * u).abs().sum(dims) if dims else (grad * u).abs()
            ms = terms.dot(ratio.to(terms.dtype).abs()).reshape(s.shape).to(s.dtype)
        return gs if ctx.needs_input_grad[0] else None, gu, ps, None, None, ms


def scale(s, u, twin_s, ratio, dim, mag_s=None):
    """s * u (s one element, broadcast over u, batch at ``dim`` of u); twin_s.grad gets the part
    gradient (mag_s.grad, when given, its magnitude)."""
    return _Scale.apply(s, u, twin_s, ratio, dim, mag_s)
