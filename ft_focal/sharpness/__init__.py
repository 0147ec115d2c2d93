"""Sharpness diagnostics: Hessian eigenvalues, Hessian trace and first-order (SAM) sharpness.

hessian.py: the diagnostics on one streamed loss; groups.py: the same per group of classes.

All quantities refer to the average loss over a data set that is streamed in batches:

    L(w) = (1 / N) * sum_j l_j(w),    N = total number of samples,

with the Hessian taken with respect to an explicit list of trainable parameters ``params``
(e.g. the LoRA / AdaptFormer / head parameters; every one must have ``requires_grad=True``).

The low-level functions take a ``loss_fn(batch)`` that closes over the model and returns
either ``(mean_loss, n)`` -- the mean loss over the ``n`` samples of that batch it used -- or a
scalar tensor (then every batch counts as one sample, i.e. batches are weighted equally).
Batches with ``n = 0`` are skipped. Streaming is exact: with weights ``n_b / N`` the gradient,
Hessian-vector products and losses equal those of the full-data mean loss, while memory stays
that of one batch (plus a few parameter-sized vectors).

``batches`` is a re-iterable (a list, a DataLoader) or a zero-argument callable returning a
fresh iterator; every diagnostic passes over the data many times (one pass per Hessian-vector
product), so a one-shot generator is rejected.

Costs, in passes over the data (each pass = forward + double backward per batch):
``top_hessian_eigenvalues`` about ``k * iters``, ``hutchinson_trace`` ``samples``,
``first_order_sharpness`` 1 gradient pass + 2 forward-only passes.

Put the model in eval mode (no dropout, frozen BatchNorm statistics) before calling the
low-level functions; :func:`group_sharpness` does that itself and restores the previous mode.
All randomness comes from a ``torch.Generator`` seeded with ``seed`` (on the CPU), so results are
deterministic for a given seed, data order and device.
"""

from ft_focal.sharpness.groups import collect_per_class_trace, group_sharpness, shot_group_classes
from ft_focal.sharpness.hessian import (
                                        dense_hessian,
                                        exact_hessian_trace,
                                        first_order_sharpness,
                                        hessian_vector_product,
                                        hutchinson_trace,
                                        top_hessian_eigenvalues,
)

__all__ = [
    "hessian_vector_product",
    "top_hessian_eigenvalues",
    "hutchinson_trace",
    "exact_hessian_trace",
    "dense_hessian",
    "first_order_sharpness",
    "group_sharpness",
    "shot_group_classes",
    "collect_per_class_trace",
]
