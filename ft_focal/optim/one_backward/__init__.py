"""Two per-sample weightings of the same losses from ONE backward pass (Focal-SAM / ImbSAM / SSE-SAM).

Focal-SAM's steps 2-3 back-propagate the same per-sample losses l_j with weights (1 - a_j) and a_j.
One backward of the total ``sum_j t_j l_j / B`` gives ``G_total``; the part weighting's gradient is

    G_part(theta) = sum_j r_j J_theta(sample j)^T delta_j,   r_j = part_j / total_j,

which every covered layer forms inside the same backward from its input and its output gradient
delta (one_backward/rules.py); ``G_rest = G_total - G_part``. ``OneBackward`` is the strategy
the optimizer owns: ``plan`` decides whether every trainable parameter is covered, ``install`` gives
each covering module a rule-aware forward (its class is swapped for a subclass of its own that holds
the module's ``Binding``, which the strategy owns; nothing is set on the module itself, state_dict
keys and behaviour outside the armed forward are unchanged, and ``remove()`` gives the class back),
``armed`` sets the per-sample ratio for one forward, ``collect`` returns the part gradients after the
backward.

Covered (rules): ``nn.Linear`` (LoRA A / B, adapter down / up, linear heads), ``nn.LayerNorm`` and
open_clip's LayerNorm classes, and modules that declare ``one_backward_rule``: ``"cosine"`` (a
cosine head: ``weight``, a float ``scale``) or ``"scale"`` (forward ``self.scale * self.unscaled(x)``
with a one-element ``scale``, e.g. AdaptFormer's bottleneck). Rules need no re-run, no RNG replay, no
tensor hooks: the compiled model has no graph break, and no host read is added.

The batch dimension of a layer input is its unique leading dimension of size B ([B, D], [B, T, D] or
[T, B, D]); when several have size B the one seen before for that layer is used. The update is never
silently different: ``plan`` refuses (exact two-backward path for the step, warning logged once)
when a trainable parameter has no rule or a BatchNorm is in training mode (it mixes samples);
``collect`` refuses when a parameter got a gradient its twin did not (used outside its layer, e.g.
``nn.MultiheadAttention`` calling ``out_proj.weight`` functionally, or no batch dimension); the
optimizer then back-propagates the part weighting exactly and switches the mechanism off. The first
step is also compared with that exact backward (catches tied weights used outside the layer and
operations mixing samples; skip with ``one_backward_check=False``): element by element, the
rule's part gradient must match the exact one up to the rounding of the sum it is, i.e. relative
to the magnitude of the summed per-sample terms (``compare`` states the formula), not to the
(possibly cancelling) result.

torch.compile: compile the model after the optimizer is built (the swap happens in its constructor);
the armed and the plain forward are two graphs of the same compiled model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._sharding import is_sharded
from . import rules


class ArmedState:
    """Shared by the covered modules: the per-sample ratio of the current forward (None: plain)."""

    def __init__(self):
        self.ratios = None     # dtype -> ratio [n] in that dtype (converted once per micro-batch)
        self.pairs = {}        # (dtype, ndim, batch dim) -> rules.pair_weights of the ratio
        self.n = 0
        self.problems = {}     # module -> why it could not split (eager mode only)
        self.low_precision = False   # a rule ran in float16 / bfloat16 (looser first-step check)
        self.check = False     # this forward is the checked one: the rules also fill the magnitude twins

    def ratio(self, dtype):
        r = self.ratios.get(dtype)
        if r is None:
            r = self.ratios[None].to(dtype)
            if not torch.compiler.is_compiling():   # a compiled graph converts in place of caching
                self.ratios[dtype] = r
        return r

    def pair(self, dtype, ndim, dim):
        """``rules.pair_weights`` of the ratio for a layer tensor of ``ndim`` dims, batch at ``dim``."""
        key = (dtype, ndim, dim)
        w = self.pairs.get(key)
        if w is None:
            w = rules.pair_weights(self.ratio(dtype), ndim, dim)
            if not torch.compiler.is_compiling():
                self.pairs[key] = w
        return w


@dataclass(eq=False)
class Binding:
    """What one covered module's rule-aware forward reads. The strategy owns it; the module reaches it
    through the class the strategy gave it (``type(module).one_backward_binding``), so nothing is set
    on the module itself and ``remove()`` (the original class back) takes it all away."""
    state: ArmedState
    twins: tuple             # per covered parameter: its twin leaf (same storage), or None
    mags: tuple              # per covered parameter: its magnitude twin (first-step check), or None
    upcast: bool = False     # open_clip's LayerNormFp32: the rule runs in float32
    cast_back: bool = False  # open_clip's LayerNorm classes return the input's dtype
    batch_dim: int | None = None   # the batch dimension of this layer's input, once found


def _batch_dim(module, binding, x, n):
    cands = [d for d in range(max(x.dim() - 1, 1)) if x.shape[d] == n]
    seen = binding.batch_dim
    if len(cands) == 1 and seen in (None, cands[0]):
        if seen is None:
            binding.batch_dim = cands[0]
        return cands[0]
    if len(cands) > 1 and seen in cands:
        return seen
    if not torch.compiler.is_compiling():
        binding.state.problems[module] = (
            f"cannot find the batch dimension (size {n}) of {tuple(x.shape)} at a {type(module).__name__} layer")
    return None


def _armed(module, x):
    """(binding, state, batch dim) when the module should split this call, else None."""
    b = module.one_backward_binding
    st = b.state
    if st.ratios is None:
        return None
    d = _batch_dim(module, b, x, st.n)
    return None if d is None else (b, st, d)


def _linear_forward(self, x):
    armed = _armed(self, x)
    if armed is None:
        return F.linear(x, self.weight, self.bias)
    b, st, d = armed
    tw, tb = b.twins
    mw, mb = b.mags if st.check else (None, None)
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if dt in (torch.float16, torch.bfloat16):
        st.low_precision = True
    return rules.linear(x, self.weight, self.bias, tw, tb, st.pair(dt, x.dim(), d), mw, mb)


def _layer_norm_forward(self, x):
    armed = _armed(self, x)
    if armed is None:
        return self.one_backward_plain_forward(x)
    b, st, d = armed
    tw, tb = b.twins
    mw, mb = b.mags if st.check else (None, None)
    dt = torch.float32 if b.upcast or torch.is_autocast_enabled(x.device.type) else x.dtype
    out = rules.layer_norm(x, self.weight, self.bias, tw, tb, st.pair(dt, x.dim(), d), self.eps, b.upcast, mw, mb)
    return out.to(x.dtype) if b.cast_back else out


def _cosine_forward(self, features):
    armed = _armed(self, features)
    if armed is None:
        return self.one_backward_plain_forward(features)
    b, st, d = armed
    (tw,) = b.twins
    (mw,) = b.mags if st.check else (None,)
    dt = torch.promote_types(features.dtype, self.weight.dtype)   # as CosineHead: no autocast
    with torch.autocast(features.device.type, enabled=False):
        fn, wn = F.normalize(features.to(dt), dim=-1), F.normalize(self.weight.to(dt), dim=-1)
        twn = F.normalize(tw.to(dt), dim=-1) if tw is not None else None
        mwn = rules.abs_normalize(mw.to(dt)) if mw is not None else None
        return self.scale * rules.linear(fn, wn, None, twn, None, st.pair(dt, features.dim(), d), mwn)


def _scale_forward(self, x):
    u = self.unscaled(x)
    armed = _armed(self, u)
    if armed is None:
        return self.scale * u
    b, st, d = armed
    (ts,) = b.twins
    (ms,) = b.mags if st.check else (None,)
    return rules.scale(self.scale, u, ts, st.ratio(torch.promote_types(self.scale.dtype, u.dtype)), d, ms)


_OPEN_CLIP_NORMS = {("open_clip.transformer", "LayerNorm"): False, ("open_clip.transformer", "LayerNormFp32"): True}


def rule_of(module: nn.Module):
    """(rule name, own parameter names it covers) or None."""
    cls = getattr(type(module), "one_backward_base", type(module))   # the original class once swapped
    if cls is nn.Linear:
        return "linear", ("weight", "bias")
    if cls is nn.LayerNorm or (cls.__module__, cls.__name__) in _OPEN_CLIP_NORMS:
        return "layer_norm", ("weight", "bias")
    declared = getattr(cls, "one_backward_rule", None)
    if declared == "cosine":
        return "cosine", ("weight",)
    if declared == "scale":   # the rule sums over every non-batch dim: a one-element scale only
        return ("scale", ("scale",)) if module.scale.numel() == 1 else None
    return None


_FORWARDS = {"linear": _linear_forward, "layer_norm": _layer_norm_forward, "cosine": _cosine_forward,
             "scale": _scale_forward}


def _swap_class(module, rule, binding: Binding) -> None:
    """Give ``module`` a class of its own: its class with the rule's forward and ``binding`` (one class
    per module, so that the binding lives on no shared class and on no instance)."""
    cls = type(module)
    base = getattr(cls, "one_backward_base", cls)
    if rule == "layer_norm":
        key = (base.__module__, base.__name__)
        binding.upcast, binding.cast_back = _OPEN_CLIP_NORMS.get(key, False), key in _OPEN_CLIP_NORMS
    if base is not cls:   # another strategy swapped it: take it over
        cls.one_backward_binding = binding
        return
    module.__class__ = type(cls.__name__, (cls,), {
        "forward": _FORWARDS[rule], "one_backward_base": cls, "one_backward_plain_forward": cls.forward,
        "one_backward_binding": binding, "__module__": __name__, "__qualname__": f"OneBackward{cls.__name__}"})


class OneBackward:
    """The one-backward strategy of an optimizer (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = ArmedState()
        self._key = None
        self._reason = None
        self._twins = {}          # id(param) -> twin leaf sharing its storage
        self._mags = {}           # id(param) -> magnitude twin (first-step check; same storage)
        self._bound = []          # (covered module, its Binding)
        self._batchnorms = []     # the model's BatchNorm layers (found at install)
        self.validated = False    # the first step matched the exact path
        self.disabled = None      # reason, once switched off for good

    # ----------------------------------------------------------------- plan / install
    def uncovered(self, params) -> str | None:
        """Why a parameter in ``params`` has no layer rule, or None when every one has (then the rules
        are installed). Unlike ``plan`` it ignores what may change from step to step (train mode)."""
        key = tuple(id(p) for p in params)
        if key != self._key:
            self._key = key
            self._reason = self._install(params)
        return self._reason

    def auto_off_reason(self, params) -> str | None:
        """For ``one_backward="auto"``: why the exact path runs instead (a sharded parameter, or one
        without a layer rule), or None when the strategy can stay."""
        if any(is_sharded(p) for p in params):
            return "FSDP2 shards the parameters"
        return self.uncovered(params)

    def use_this_step(self, params, warn_once) -> bool:
        """Whether this step splits with one backward; when not, why is said once (``warn_once(key,
        msg, *args)``). Sharded parameters switch the strategy off for good."""
        if self.disabled is not None:
            return False
        if any(is_sharded(p) for p in params):
            self.disabled = ("FSDP2 shards the parameters: the layer rules would see the gathered weights and "
                             "their part gradients would bypass FSDP's reduce-scatter")
            warn_once("sb-fsdp", "one_backward switched off: %s; using the exact two-backward path "
                      "(same update, one more backward)", self.disabled)
            return False
        reason = self.plan(params)
        if reason is not None:
            warn_once("sb:" + reason, "one_backward: %s; using the exact two-backward path "
                      "for this step (same update, one more backward)", reason)
            return False
        return True

    def plan(self, params) -> str | None:
        """None if every parameter in ``params`` is covered (installing the rules), else why not."""
        reason = self.uncovered(params)
        if reason is not None:
            return reason
        for m in self._batchnorms:   # checked every step: the model may be switched to train()
            if m.training:
                return f"{type(m).__name__} in training mode mixes the samples of a batch"
        return None

    def _install(self, params):
        self._batchnorms = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        want = {id(p) for p in params}
        names = {id(p): n for n, p in self.model.named_parameters()}
        owned, chosen = set(), []
        for m in self.model.modules():
            own = {n: p for n, p in m._parameters.items() if p is not None and id(p) in want}
            if not own:
                continue
            rule = rule_of(m)
            if rule is None or not set(own) <= set(rule[1]):
                p = next(iter(own.values()))
                return (f"parameter {names.get(id(p))} belongs to {type(m).__name__}, which has no "
                        "one-backward rule (Linear, LayerNorm, cosine head, one-element learnable scale)")
            chosen.append((m, rule))
            owned.update(id(p) for p in own.values())
        missing = [p for p in params if id(p) not in owned]
        if missing:
            return f"parameter {names.get(id(missing[0]), tuple(missing[0].shape))} has no owning module"
        self._twins, self._mags, self._bound = {}, {}, []
        for m, (rule, attrs) in chosen:
            twins, mags = [], []
            for a in attrs:
                p = getattr(m, a, None)
                t = mag = None
                if p is not None and id(p) in want:
                    t = self._twins[id(p)] = p.detach().requires_grad_()
                    mag = self._mags[id(p)] = p.detach().requires_grad_()
                twins.append(t)
                mags.append(mag)
            binding = Binding(self.state, tuple(twins), tuple(mags))
            _swap_class(m, rule, binding)
            self._bound.append((m, binding))
        self._bind()
        return None

    def _bind(self):
        """Point the covered modules at this strategy (another optimizer of the same model may
        have taken them over since)."""
        for m, binding in self._bound:
            type(m).one_backward_binding = binding

    # ----------------------------------------------------------------- one forward / backward
    @contextlib.contextmanager
    def armed(self, ratio: torch.Tensor, n: int, check: bool = False):
        """The covered layers split the next forward: ``ratio[j]`` = part_j / total_j ([n]);
        ``check``: the rules also fill the magnitude twins (``magnitudes``, for ``compare``)."""
        st = self.state
        if self._bound and type(self._bound[0][0]).one_backward_binding is not self._bound[0][1]:
            self._bind()
        st.ratios, st.pairs = {None: ratio, ratio.dtype: ratio}, {}
        st.n, st.problems, st.low_precision, st.check = n, {}, False, check
        try:
            yield
        finally:
            st.ratios, st.pairs, st.check = None, {}, False

    def collect(self, params) -> tuple[list, str | None]:
        """After the backward: (part gradient per parameter, None), or (partial, reason)."""
        parts, reason = [], None
        for p in params:
            t = self._twins.get(id(p))
            g = t.grad if t is not None else None
            if t is not None:
                t.grad = None
            if g is None and p.grad is not None and reason is None:
                reason = (next(iter(self.state.problems.values()), None) or
                          f"a parameter of shape {tuple(p.shape)} received a gradient its layer rule did not "
                          "see (used outside its layer: functional use, checkpointing ...)")
            parts.append(g)
        return parts, reason

    def magnitudes(self, params) -> list:
        """After a checked backward (``armed(..., check=True)``): per parameter the magnitude of its
        part gradient's terms (rules module docstring), None where no rule filled one; cleared."""
        out = []
        for p in params:
            mag = self._mags.get(id(p))
            out.append(None if mag is None else mag.grad)
            if mag is not None:
                mag.grad = None
        return out

    def compare(self, params, captured, exact, magnitudes, rtol=None) -> str | None:
        """None if the rule's part gradients equal the exact ones up to rounding, else what differs.

        For every element i of every parameter tensor P:

            |rule_i - exact_i| <= rtol * (M_i + max(0.1 * max_{k in P} M_k, 1e-3 * max_{all k} M_k))

        where ``M`` is the magnitude of the terms the part gradient sums (``magnitudes``:
        ``M = sum_j |r_j| |J_j^T delta_j|``, the same GEMM / sum on absolute values; ``|exact|``
        where no rule gave one), not the (possibly cancelling) result; and ``rtol`` = 1e-4 in
        float32 / float64, 3e-2 when a rule or a gradient ran in float16 / bfloat16. The rounding
        error of a sum is bounded by ~eps times the sum of its absolute terms; the second term
        covers the rounding of the output gradients delta themselves (the exact path back-propagates
        the part weighting separately), which scales with the tensor's largest terms and, for a
        tensor whose terms are all tiny, with the network's largest ones. A wrong rule
        (a misweighted or missing sample, r and 1 - r exchanged, a dropped term) differs by a
        share of the terms themselves.
        """
        half = self.state.low_precision
        rows = []
        for p, c, e, m in zip(params, captured, exact, magnitudes, strict=True):
            if e is None and c is None:
                continue
            e = torch.zeros_like(p) if e is None else e
            c = torch.zeros_like(e) if c is None else c.to(e.dtype)
            m = e.abs() if m is None else m.to(e.dtype)
            half = half or e.dtype in (torch.float16, torch.bfloat16)
            rows.append(((e - c).abs(), m))
        if not rows:
            return None
        network = 1e-3 * max(float(m.max()) for _, m in rows)
        rows = [(d, m + (max(0.1 * float(m.max()), network) + 1e-30)) for d, m in rows]
        rtol = rtol if rtol is not None else (3e-2 if half else 1e-4)
        worst, at = 0.0, None
        for d, allowed in rows:
            ratio = d / allowed
            k = int(torch.argmax(ratio))
            if float(ratio.flatten()[k]) > worst:
                worst, at = float(ratio.flatten()[k]), (float(d.flatten()[k]), float(allowed.flatten()[k]))
        if worst <= rtol:
            return None
        return (f"layer-rule gradients differ from the exact ones (diff {at[0]:.3g} where the summed terms have "
                f"magnitude {at[1]:.3g}: {worst:.2g} of it, tolerance {rtol:g})")

    def reset(self):
        self.state.ratios, self.state.pairs, self.state.check = None, {}, False
        for t in (*self._twins.values(), *self._mags.values()):
            t.grad = None

    def remove(self) -> None:
        """Give the covered modules back their own classes (and with them the bindings); the strategy
        is switched off for good (the optimizer then runs the exact path). The model's parameters,
        buffers and state_dict are untouched: only the forward changes back."""
        for m, _ in self._bound:
            base = getattr(type(m), "one_backward_base", None)
            if base is not None:
                m.__class__ = base
        self.reset()
        self._bound, self._twins, self._mags, self._key = [], {}, {}, None
        self.disabled = "removed (OneBackward.remove)"
