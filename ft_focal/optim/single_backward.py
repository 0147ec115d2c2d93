"""Two per-sample weightings of the same losses from ONE backward pass (Focal-SAM / ImbSAM / SSE-SAM).

Steps 2-3 of Focal-SAM back-propagate the same per-sample losses l_j with weights (1 - a_j) and a_j.
One backward of the total ``sum_j t_j l_j / B`` gives ``G_total``. For an ``nn.Linear`` y = x W^T + b
the contribution of sample j to grad W is ``delta_j^T x_j`` (delta = dLoss/dy, summed over the
sample's token positions), so the second weighting's gradient is available in the same pass:

    G_part(W) = sum_j r_j delta_j^T x_j,  G_part(b) = sum_j r_j delta_j,   r_j = part_j / total_j

and ``G_rest = G_total - G_part``. A forward hook on every ``nn.Linear`` owning a trainable weight /
bias (installed only for the first, unperturbed forward) keeps the layer input x and registers a
tensor hook on the layer OUTPUT, which receives delta during the backward. Both sums are one
(reweighted) matmul per layer. LoRA (peft's lora_A / lora_B are ``nn.Linear``), AdaptFormer
adapters and linear heads are covered, so the exact Focal-SAM step costs 2F + 2B, like SAM.

Other trainable parameters are handled by re-running the module that owns them directly (a
LayerNorm, an adapter holding a learnable scale s, ...) on its saved inputs inside the tensor hook:
for a module applied to each sample separately, ``G_part`` of its own parameters is the
vector-Jacobian product of that module with the cotangent ``r_j delta_j``. The re-run restores the
RNG (dropout) and autocast state of the original call. Only cheap owners are re-run: leaf modules,
and non-leaf modules holding together at most 1/8 of the model's parameters; a parameter of a larger
module (e.g. a scalar attribute of the whole model) makes the step fall back.

The batch dimension of each layer input (Linear) or output (other owners) is the unique leading
dimension of size B ([B, D], [B, T, D] or [T, B, D]); if several dimensions have size B the one
seen before for that layer is used, otherwise (or if there is no dimension of size B) the layer
cannot be split.

The update is never silently different. ``plan`` refuses (-> exact two-backward path for the step,
warning logged once) when a trainable parameter belongs to a module too large to re-run or a
BatchNorm layer is in training mode (it mixes samples). ``collect`` refuses after the backward when
a parameter received a gradient its layer's hooks did not all see (functional use such as
``nn.MultiheadAttention.out_proj``, activation checkpointing, an ambiguous batch dimension, an
owner returning a tuple, an input modified in place); the caller then back-propagates the second
weighting exactly and switches the mechanism off. The graph is retained only on the first step,
where the hook result is also compared with that exact backward (catches tied weights used outside
the layer, non-deterministic re-runs, operations mixing samples; skipped with
``single_backward_check=False``); a later fallback re-runs the forward with the RNG state of the
first run (same dropout masks; exact for a deterministic forward) at the cost of one more forward.

Mixed precision: the hooks see the activations and output gradients autograd uses (bf16 / fp16
under autocast) and accumulate in the parameter's dtype, as autograd does; a GradScaler's scale is
removed from the hook gradients like from every other gradient. torch.compile: the update and the
pass count are unchanged (tested with aot_eager and inductor), but dynamo cannot trace the hooks'
side effects, so the compiled model is split at every hooked layer call (graph breaks; 13 for a
2-block LoRA ViT) in every forward. Measured on this CPU (inductor, LoRA CLIP width 256): the
one-backward step compiled 0.94x an eager SAM step, the official step compiled 1.21x. Dynamo does
not guard on module hooks, so the hooks only work if the FIRST compiled call of the model is the
hooked one (the training loop resets dynamo before compiling to ensure it); otherwise ``collect``
sees the missing hook calls and the step falls back to the exact path. Inductor's donated buffers
forbid back-propagating one graph twice (the exact path, the first-step check): the training loop
sets ``torch._functorch.config.donated_buffer = False``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _LayerState:
    __slots__ = ("registered", "fired", "bad", "rng", "autocast")

    def __init__(self):
        self.registered, self.fired, self.bad, self.rng, self.autocast = 0, 0, None, None, None


def _plain_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


class WeightedGradCapture:
    MAX_RERUN_FRACTION = 1 / 8   # non-leaf owners re-run: at most this share of the model's parameters

    def __init__(self, model: nn.Module):
        self.model = model
        self._key = None
        self._owners = {}       # id(param) -> list of owning modules
        self._linear, self._generic = [], {}   # hooked Linear modules; other owner -> its params
        self._reason = None
        self._bdim = {}         # module -> batch dim seen before (-1: no batch dim)
        self._state = {}
        self._acc = {}
        self._ratio = None
        self._n = None
        self._live = False
        self._low_precision = False
        self._select = None
        self._ratio_views = {}  # (ratio, device, dtype, ndim, batch dim) -> ratio shaped to broadcast

    # ----------------------------------------------------------------- static check
    def plan(self, params):
        """None if every parameter in ``params`` can be handled, else the reason it cannot."""
        key = tuple(id(p) for p in params)
        if key != self._key:
            self._key = key
            self._reason = self._build_plan(params)
        if self._reason is not None:
            return self._reason
        for m in self.model.modules():
            if isinstance(m, _BatchNorm) and m.training:
                return f"{type(m).__name__} in training mode mixes the samples of a batch"
        return None

    def _build_plan(self, params):
        self._owners, self._linear, self._generic = {}, [], {}
        want = {id(p) for p in params}
        names = {id(p): n for n, p in self.model.named_parameters()}
        total = sum(p.numel() for p in self.model.parameters())
        rerun = 0
        for m in self.model.modules():
            own = [p for p in m._parameters.values() if p is not None and id(p) in want]
            if not own:
                continue
            if _plain_linear(m) and all(p is m.weight or p is m.bias for p in own):
                self._linear.append(m)
            else:
                if next(m.children(), None) is not None:   # leaves (LayerNorm, ...) are cheap to re-run
                    rerun += sum(p.numel() for p in m.parameters())
                    if rerun > self.MAX_RERUN_FRACTION * total:
                        return (f"parameter {names.get(id(own[0]))} belongs to {type(m).__name__}, too large "
                                "to re-run for the per-sample weighting")
                self._generic[m] = own
            for p in own:
                self._owners.setdefault(id(p), []).append(m)
        missing = [p for p in params if id(p) not in self._owners]
        if missing:
            return f"parameter {names.get(id(missing[0]), tuple(missing[0].shape))} has no owning module"
        return None

    # ----------------------------------------------------------------- capture
    @contextlib.contextmanager
    def armed(self, ratio: torch.Tensor, n: int):
        """Hooks for one forward: ``ratio[j]`` = part_j / total_j of the micro-batch's samples."""
        self._ratio, self._n, self._live = ratio, n, True
        self._ratio_views = {}
        binary = bool(((ratio == 0) | (ratio == 1)).all())
        self._select = torch.nonzero(ratio).flatten() if binary and bool((ratio == 0).any()) else None
        self._state = {m: _LayerState() for m in (*self._linear, *self._generic)}
        self._acc = {}
        self._low_precision = False
        handles = [m.register_forward_hook(self._linear_hook) for m in self._linear]
        for m in self._generic:
            handles.append(m.register_forward_pre_hook(self._generic_pre_hook))
            handles.append(m.register_forward_hook(self._generic_hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _batch_dim(self, module, x):
        n = self._n
        if x.dim() == 1:
            cands = [0] if x.shape[0] == n else []
        else:
            cands = [d for d in range(x.dim() - 1) if x.shape[d] == n]
        seen = self._bdim.get(module)
        if len(cands) == 1 and seen in (None, cands[0]):
            self._bdim[module] = cands[0]
            return cands[0]
        if len(cands) > 1 and seen in cands:
            return seen
        if not cands:
            self._bdim[module] = -1
        return None   # no / ambiguous / inconsistent batch dimension

    def _register(self, module, t, fn):
        """Tensor hook on the module output ``t`` calling fn(delta, batch_dim)."""
        st = self._state[module]
        d = self._batch_dim(module, t)
        if d is None:
            st.bad = (f"cannot find the batch dimension (size {self._n}) of {tuple(t.shape)} at a "
                      f"{type(module).__name__} layer")
            return
        st.registered += 1

        def hook(grad):
            if self._live:
                fn(grad, d)
                st.fired += 1

        t.register_hook(hook)

    def _linear_hook(self, module, inputs, output):
        if not (isinstance(output, torch.Tensor) and output.requires_grad) or not inputs:
            return
        x, ratio = inputs[0], self._ratio
        if self._batch_dim(module, x) is None:
            self._state[module].bad = (f"cannot find the batch dimension (size {self._n}) of the input "
                                       f"{tuple(x.shape)} of a {type(module).__name__} layer")
            return
        self._register(module, output, lambda g, d: self._accumulate(module, x, g, d, ratio))

    def _generic_pre_hook(self, module, args):
        st = self._state[module]
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        st.rng = (dev, torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
        st.autocast = (dev.type, torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))

    def _generic_hook(self, module, args, kwargs, output):
        st = self._state[module]
        if not isinstance(output, torch.Tensor):
            st.bad = f"{type(module).__name__} returns {type(output).__name__}, not a tensor"
            return
        if not output.requires_grad:
            return
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        versions = [t._version for t in tensors]
        rng, autocast, ratio = st.rng, st.autocast, self._ratio

        def rerun(delta, d):
            if any(t._version != v for t, v in zip(tensors, versions)):
                st.bad = f"an input of a {type(module).__name__} layer was modified in place"
                return
            self._rerun(module, args, kwargs, delta, d, ratio, rng, autocast)

        self._register(module, output, rerun)

    def _ratio_view(self, ratio, like, d):
        """``ratio`` on like's device / dtype, shaped [1, .., B (at dim d), .., 1] (cached per pass)."""
        key = (id(ratio), like.device, like.dtype, like.dim(), d)
        r = self._ratio_views.get(key)
        if r is None:
            shape = [1] * like.dim()
            shape[d] = ratio.numel()
            r = self._ratio_views[key] = ratio.to(device=like.device, dtype=like.dtype).view(shape)
        return r

    def _rerun(self, module, args, kwargs, delta, d, ratio, rng, autocast):
        """G_part of the module's own parameters: VJP of a re-run with cotangent r_j delta_j."""
        params = self._generic[module]
        cot = delta * self._ratio_view(ratio, delta, d)
        det = lambda v: v.detach() if isinstance(v, torch.Tensor) else v   # noqa: E731
        dev, cpu_state, cuda_state = rng
        with torch.random.fork_rng(devices=[dev] if cuda_state is not None else []), torch.enable_grad(), \
                torch.autocast(autocast[0], dtype=autocast[2], enabled=autocast[1]):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, dev)
            out = module(*[det(a) for a in args], **{k: det(v) for k, v in kwargs.items()})
        grads = torch.autograd.grad(out, params, cot, allow_unused=True)
        self._low_precision |= delta.dtype in (torch.float16, torch.bfloat16)
        for p, g in zip(params, grads):
            if g is not None:
                self._add(p, g.to(p.dtype))

    def _accumulate(self, module, x, delta, d, ratio):
        """Add sum_j r_j delta_j^T x_j (weight) and sum_j r_j delta_j (bias); the per-sample ratio
        scales the narrower of x and delta."""
        w, b = module.weight, module.bias
        dt = w.dtype
        self._low_precision |= delta.dtype in (torch.float16, torch.bfloat16)
        if delta.dtype != dt:
            delta = delta.to(dt)
        if x.dtype != dt:
            x = x.to(dt)
        weighted = self._select is None
        if not weighted:   # 0/1 ratio (ImbSAM, SSE-SAM): only the selected samples
            if self._select.numel() == 0:
                return
            idx = self._select.to(delta.device)
            x, delta = x.index_select(d, idx), delta.index_select(d, idx)
        if w.requires_grad:
            xw, dw = x, delta
            if weighted:   # scale the narrower of x and delta by the per-sample ratio
                if xw.shape[-1] <= dw.shape[-1]:
                    xw = xw * self._ratio_view(ratio, xw, d)
                else:
                    dw = dw * self._ratio_view(ratio, dw, d)
            self._add(w, _mm_t(xw.reshape(-1, xw.shape[-1]), dw.reshape(-1, dw.shape[-1])))
        if b is not None and b.requires_grad:
            dims = [k for k in range(delta.dim() - 1) if k != d]
            per_sample = delta.sum(dim=dims) if dims else delta          # [B, out]
            if weighted:
                gb = self._ratio_view(ratio, per_sample, 0).view(1, -1).mm(per_sample).view(-1)
            else:
                gb = per_sample.sum(0)
            self._add(b, gb.to(b.dtype))

    def _add(self, p, g):
        k = id(p)
        self._acc[k] = g if k not in self._acc else self._acc[k].add_(g)

    def collect(self, params):
        """After the backward: (captured gradients by id(param), None) or (partial, reason)."""
        self._live = False
        for p in params:
            if p.grad is None:
                continue
            for m in self._owners.get(id(p), ()):
                st = self._state[m]
                if st.bad:
                    return self._acc, st.bad
                if st.registered == 0 or st.fired != st.registered:
                    return self._acc, (f"a {type(m).__name__} parameter received a gradient its layer "
                                       "hooks did not see (functional use, checkpointing ...)")
        return self._acc, None

    def compare(self, params, captured, exact, rtol=1e-4):
        """None if the hook gradients match the exact ones (relative to the largest entry)."""
        worst, scale = 0.0, 0.0
        half = self._low_precision
        for j, p in enumerate(params):
            e, c = exact[j], captured.get(id(p))
            if e is None and c is None:
                continue
            e = torch.zeros_like(p) if e is None else e
            c = torch.zeros_like(e) if c is None else c.to(e.dtype)
            half = half or e.dtype in (torch.float16, torch.bfloat16)
            worst = max(worst, float((e - c).abs().max()))
            scale = max(scale, float(e.abs().max()))
        tol = (5e-2 if half else rtol) * scale + 1e-30
        if not worst <= tol:
            return f"layer-hook gradients differ from the exact ones (max diff {worst:.3g}, scale {scale:.3g})"
        return None

    def reset(self):
        self._state, self._acc, self._ratio, self._live = {}, {}, None, False
        self._ratio_views = {}


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _mm_t(x2d, d2d):
    """d2d^T x2d, with the narrow operand on the left."""
    if x2d.shape[1] <= d2d.shape[1]:
        return x2d.t().mm(d2d).t().contiguous()
    return d2d.t().mm(x2d)
