"""The per-sample losses as ``nn.Module`` classes: ``LongTailLoss`` and its subclasses, built from the
TRAINING class counts (the conventions every one follows are in ft_focal/losses/__init__.py)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _counts_array(class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate training counts and return them as a float64 numpy array of shape [C]."""
    if isinstance(class_counts, torch.Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("class_counts must be finite and non-negative")
    if counts.sum() <= 0:
        raise ValueError("class_counts must contain at least one training sample")
    return counts


def class_balanced_weights(class_counts: Sequence[int], beta: float = 0.9999) -> np.ndarray:
    """Class-balanced weights of Cui et al. (2019), as used by CB-CE and LDAM-DRW.

    ``w_c = (1 - beta) / (1 - beta^{n_c})``, normalised so that ``sum_c w_c = C``.
    Empty classes use ``n_c = 1`` (weight ``1 - beta`` / ``(1 - beta)`` = 1 before
    normalisation). ``beta = 0`` gives uniform weights (all 1). When some classes are empty,
    the normalisation is over the non-empty classes (their weights sum to their number), so
    an empty class does not change the weights of the others.

    Returns a float64 array of shape ``[C]``.
    """
    raw = _counts_array(class_counts)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = np.maximum(raw, 1.0)
    if beta == 0.0:
        return np.ones_like(counts)
    effective_num = 1.0 - np.power(beta, counts)
    weights = (1.0 - beta) / effective_num
    present = raw > 0
    return weights / weights[present].sum() * present.sum()


class LongTailLoss(nn.Module):
    """Base class: stores the class counts and offers the shared helpers.

    Subclasses implement ``forward(logits [B, C], labels [B]) -> [B]``.
    """

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__()
        counts = _counts_array(class_counts)
        self.num_classes = int(counts.size)
        self.register_buffer("class_counts", torch.as_tensor(counts, dtype=torch.float64))
        safe = np.maximum(counts, 1.0)
        self.register_buffer(
            "log_prior", torch.as_tensor(np.log(safe / counts.sum()), dtype=torch.float64)
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current (0-based) epoch. No-op unless the loss is scheduled."""
        self.epoch = int(epoch)

    def _check(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape [B, {self.num_classes}], got {tuple(logits.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must have shape [{logits.shape[0]}], got {tuple(labels.shape)}"
            )

    @staticmethod
    def _as(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buffer.to(device=like.device, dtype=like.dtype)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class CrossEntropyLoss(LongTailLoss):
    """Cross-entropy, optionally with class-balanced weights.

    ``l_j = w_{y_j} * (-log softmax(z_j)_{y_j})`` with ``w = 1`` (``class_balanced=False``) or
    ``w`` from :func:`class_balanced_weights` with ``beta``.
    """

    def __init__(
        self, class_counts: Sequence[int], class_balanced: bool = False, beta: float = 0.9999
    ) -> None:
        super().__init__(class_counts)
        self.class_balanced = bool(class_balanced)
        self.beta = float(beta)
        weights = (
            class_balanced_weights(class_counts, beta)
            if class_balanced
            else np.ones(self.num_classes)
        )
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float64))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` for ``logits [B, C]`` and ``labels [B]``."""
        self._check(logits, labels)
        loss = F.cross_entropy(logits, labels, reduction="none")
        if self.class_balanced:
            loss = loss * self._as(self.weights, logits)[labels]
        return loss


class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted cross-entropy (Menon et al., 2021): ``CE(z + tau * log pi, y)``.

    The offset is applied inside the loss only (training objective); evaluate with the plain
    logits. ``tau = 1`` is the setting of Focal-SAM and equals balanced softmax.
    """

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0) -> None:
        super().__init__(class_counts)
        self.tau = float(tau)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` for ``logits [B, C]`` and ``labels [B]``."""
        self._check(logits, labels)
        adjusted = logits + self.tau * self._as(self.log_prior, logits)
        return F.cross_entropy(adjusted, labels, reduction="none")


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax (Ren et al., 2020): ``CE(z + log n_c, y)`` = logit adjustment, tau 1.

    (``log n_c`` and ``log pi_c`` differ by a constant, which the softmax ignores.)
    """

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__(class_counts, tau=1.0)


class LDAMLoss(LongTailLoss):
    """LDAM (Cao et al., 2019), optionally with deferred re-weighting (DRW).

    Margins ``m_c = n_c^{-1/4}`` scaled so that ``max_c m_c = max_m`` (max over non-empty
    classes; an empty class gets ``max_m``); per sample
    ``l_j = w_{y_j} * CE(s * (z_j - m_{y_j} e_{y_j}), y_j)``.

    DRW: ``w = 1`` for epochs ``< drw_epoch`` and the class-balanced weights (``beta``) from
    epoch ``drw_epoch`` on (0-based, as ``epoch // 160`` in the official code: with
    ``drw_epoch=160`` the weights switch on at the 161st epoch). ``drw_epoch=None`` = no DRW.
    Call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int | None = None,
        beta: float = 0.9999,
    ) -> None:
        super().__init__(class_counts)
        if max_m < 0:
            raise ValueError(f"max_m must be >= 0, got {max_m}")
        self.max_m = float(max_m)
        self.s = float(s)
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)
        self.beta = float(beta)
        raw = _counts_array(class_counts)
        margins = np.maximum(raw, 1.0) ** -0.25
        margins = margins * (self.max_m / margins[raw > 0].max())
        margins[raw == 0] = self.max_m   # empty class: the largest margin, scale unaffected
        self.register_buffer("margins", torch.as_tensor(margins, dtype=torch.float64))
        self.register_buffer(
            "drw_weights",
            torch.as_tensor(class_balanced_weights(class_counts, beta), dtype=torch.float64),
        )

    @property
    def reweighting_active(self) -> bool:
        """True when the DRW class-balanced weights are in use at the current epoch."""
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` for ``logits [B, C]`` and ``labels [B]``."""
        self._check(logits, labels)
        margin = self._as(self.margins, logits)[labels]                       # [B]
        one_hot = F.one_hot(labels, self.num_classes).to(logits.dtype)        # [B, C]
        loss = F.cross_entropy(self.s * (logits - margin[:, None] * one_hot), labels,
                               reduction="none")
        if self.reweighting_active:
            loss = loss * self._as(self.drw_weights, logits)[labels]
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, "
                f"drw_epoch={self.drw_epoch}")


class VSLoss(LongTailLoss):
    """Vector-scaling loss (Kini et al., NeurIPS 2021): ``CE(z / Delta + tau * log pi, y)``.

    ``Delta_c = (n_max / n_c)^gamma >= 1``, exactly as in the official code
    (``temp = (1/n)^gamma / min((1/n)^gamma)``; ``output = x / Delta + iota``). Equivalently, in
    the paper's multiplicative notation, the logit of class c is multiplied by
    ``(n_c / n_max)^gamma <= 1`` (head classes keep their scale, tail logits shrink) and then
    shifted additively by ``iota_c = tau * log pi_c``.

    Defaults ``gamma = 0.05, tau = 0.75`` follow docs/algorithms.md (the official VS repository's
    defaults are ``gamma = 0.3, tau = 1.0``; its CIFAR scripts tune both).
    """

    def __init__(self, class_counts: Sequence[int], gamma: float = 0.05, tau: float = 0.75) -> None:
        super().__init__(class_counts)
        self.gamma = float(gamma)
        self.tau = float(tau)
        safe = np.maximum(_counts_array(class_counts), 1.0)   # empty class: as n_c = 1
        delta = (safe.max() / safe) ** self.gamma
        self.register_buffer("delta", torch.as_tensor(delta, dtype=torch.float64))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` for ``logits [B, C]`` and ``labels [B]``."""
        self._check(logits, labels)
        out = logits / self._as(self.delta, logits) + self.tau * self._as(self.log_prior, logits)
        return F.cross_entropy(out, labels, reduction="none")


class FocalLoss(LongTailLoss):
    """Focal loss (Lin et al., 2017): ``l_j = (1 - p_{j,y_j})^gamma * (-log p_{j,y_j})``.

    ``p = softmax(z)``; ``gamma = 0`` is plain cross-entropy. Default ``gamma = 2`` (the paper's;
    the LDAM repository's CIFAR-LT baseline uses 1).
    """

    def __init__(self, class_counts: Sequence[int], gamma: float = 2.0) -> None:
        super().__init__(class_counts)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` for ``logits [B, C]`` and ``labels [B]``."""
        self._check(logits, labels)
        log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        ce = -log_p
        if self.gamma == 0:
            return ce
        one_minus_p = (-torch.expm1(log_p)).clamp(min=0.0)   # 1 - p, accurate near p = 1
        return one_minus_p.pow(self.gamma) * ce
