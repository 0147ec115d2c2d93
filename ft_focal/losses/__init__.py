"""Per-sample classification losses for long-tailed training.

Every loss is an ``nn.Module`` built from the TRAINING-set class counts and called as
``loss_fn(logits, labels)`` with ``logits`` of shape ``[B, C]`` (any floating dtype, any device)
and integer ``labels`` of shape ``[B]``. It returns the per-sample losses, shape ``[B]``
(``reduction='none'``), in the dtype and on the device of ``logits``; the optimizers in
``ft_focal.optim`` weight and average these themselves.

Every loss has ``set_epoch(epoch)`` (0-based; a no-op except for LDAM-DRW) so that the training
loop can call it unconditionally at the start of each epoch.

Conventions shared by all losses (see docs/algorithms.md, "Losses"):

* ``n_c`` are training counts, ``N = sum_c n_c``, ``pi_c = n_c / N``.
* Empty classes (``n_c = 0``) stay well defined: every count-derived quantity (``log pi_c``,
  class-balanced weights, LDAM margins, VS scales) is computed from ``max(n_c, 1)``, i.e. an
  empty class is treated as a class with a single training sample (``N`` stays the sum of the
  raw counts). Without this clamp ``log pi_c = -inf`` would make the softmax undefined. The
  normalisations (class-balanced weights summing to the number of classes, LDAM's largest
  margin = ``max_m``) run over the non-empty classes only, so adding an empty class does not
  change anything for the others; an empty class gets LDAM margin ``max_m``.
* Class-weighted losses return ``w_{y_j} * CE_j`` per sample. Note that the plain mean of these
  per-sample values differs from ``F.cross_entropy(weight=w, reduction='mean')``, which divides
  by ``sum_j w_{y_j}`` instead of ``B``; the official LDAM-DRW code uses the latter. With the
  weights normalised to sum ``C`` the two agree in expectation on class-balanced batches only.
* The logit adjustments (LA, balanced softmax, VS) are part of the TRAINING objective only:
  predictions and accuracies must be computed from the plain model logits.

Use :func:`build_loss` to construct a loss by name; :func:`loss_kwargs` lists the keyword
arguments each name accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .long_tail import (
    BalancedSoftmaxLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    LongTailLoss,
    VSLoss,
    class_balanced_weights,
)

__all__ = [
    "LongTailLoss",
    "CrossEntropyLoss",
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "LDAMLoss",
    "VSLoss",
    "FocalLoss",
    "class_balanced_weights",
    "build_loss",
    "loss_kwargs",
    "LOSS_NAMES",
]


# ----------------------------------------------------------------------------- registry

def _ce(counts: Sequence[int]) -> LongTailLoss:
    return CrossEntropyLoss(counts)


def _cb_ce(counts: Sequence[int], beta: float = 0.9999) -> LongTailLoss:
    return CrossEntropyLoss(counts, class_balanced=True, beta=beta)


def _la(counts: Sequence[int], tau: float = 1.0) -> LongTailLoss:
    return LogitAdjustedLoss(counts, tau=tau)


def _bs(counts: Sequence[int]) -> LongTailLoss:
    return BalancedSoftmaxLoss(counts)


def _ldam(counts: Sequence[int], max_m: float = 0.5, s: float = 30.0) -> LongTailLoss:
    return LDAMLoss(counts, max_m=max_m, s=s, drw_epoch=None)


def _ldam_drw(
    counts: Sequence[int], max_m: float = 0.5, s: float = 30.0, drw_epoch: int = 160,
    beta: float = 0.9999,
) -> LongTailLoss:
    return LDAMLoss(counts, max_m=max_m, s=s, drw_epoch=drw_epoch, beta=beta)


def _vs(counts: Sequence[int], gamma: float = 0.05, tau: float = 0.75) -> LongTailLoss:
    return VSLoss(counts, gamma=gamma, tau=tau)


def _focal(counts: Sequence[int], gamma: float = 2.0) -> LongTailLoss:
    return FocalLoss(counts, gamma=gamma)


@dataclass(frozen=True)
class LossInfo:
    """One loss of the registry.

    factory / defaults: ``build_loss(name, counts, **kwargs)`` calls ``factory(counts, **kwargs)``;
    ``defaults`` are the keywords it takes and their default values.
    display: the name a reader knows it by (model card).
    recipe_keys: (``loss.*`` recipe key, keyword) pairs: the recipe keys it takes and the keyword
    each becomes (``focal_gamma`` -> ``gamma``; the recipe's ``loss`` section is flat).
    alias_of: set for an alternative name (not a recipe choice).
    """

    name: str
    factory: Any
    defaults: Mapping[str, Any]
    display: str
    recipe_keys: tuple[tuple[str, str], ...] = ()
    alias_of: Optional[str] = None


def _keys(*names: str, **renamed: str) -> tuple[tuple[str, str], ...]:
    return tuple((n, n) for n in names) + tuple(renamed.items())


#: The loss registry: ft_focal/config/__init__.py (``loss.name`` choices), ft_focal/training/builders.py (which
#: recipe keys reach the loss) and ft_focal/artifacts/card.py (the loss's name and keys) read it.
LOSSES: dict[str, LossInfo] = {info.name: info for info in (
    LossInfo("ce", _ce, {}, "cross-entropy"),
    LossInfo("cb_ce", _cb_ce, {"beta": 0.9999}, "class-balanced cross-entropy", _keys("beta")),
    LossInfo("la", _la, {"tau": 1.0}, "logit-adjusted cross-entropy", _keys("tau")),
    LossInfo("logit_adjusted", _la, {"tau": 1.0}, "logit-adjusted cross-entropy", _keys("tau"), alias_of="la"),
    LossInfo("balanced_softmax", _bs, {}, "balanced softmax"),
    LossInfo("ldam", _ldam, {"max_m": 0.5, "s": 30.0}, "LDAM", _keys("max_m", "s")),
    LossInfo("ldam_drw", _ldam_drw, {"max_m": 0.5, "s": 30.0, "drw_epoch": 160, "beta": 0.9999}, "LDAM + DRW",
             _keys("max_m", "s", "beta", "drw_epoch")),
    LossInfo("vs", _vs, {"gamma": 0.05, "tau": 0.75}, "vector-scaling loss", (("vs_gamma", "gamma"), ("vs_tau", "tau"))),
    LossInfo("focal", _focal, {"gamma": 2.0}, "focal loss", (("focal_gamma", "gamma"),)),
)}

#: Valid names for :func:`build_loss` ("logit_adjusted" is an alias of "la").
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
#: The recipe's ``loss.name`` choices (no aliases).
RECIPE_LOSSES: tuple[str, ...] = tuple(n for n, info in LOSSES.items() if info.alias_of is None)


def loss_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments accepted by ``build_loss(name, ...)`` with their default values."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")
    return dict(LOSSES[name].defaults)


def build_loss(name: str, class_counts: Sequence[int], **kwargs: Any) -> LongTailLoss:
    """Build the per-sample loss ``name`` from TRAINING class counts.

    Names: ``ce``, ``cb_ce``, ``la`` (alias ``logit_adjusted``), ``balanced_softmax``,
    ``ldam``, ``ldam_drw``, ``vs``, ``focal``. An unknown name or keyword raises ``ValueError``
    naming it and listing the valid choices.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")
    factory, defaults = LOSSES[name].factory, LOSSES[name].defaults
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "(none)"
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for loss {name!r}; valid: {valid}"
        )
    for key, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"loss {name!r}: argument {key} must be finite, got {value}")
    return factory(class_counts, **kwargs)
