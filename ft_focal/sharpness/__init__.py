"""Sharpness diagnostics: Hessian eigenvalues, Hessian trace and first-order (SAM) sharpness.

hessian.py: the diagnostics on one streamed loss (its docstring states the quantities, the
``loss_fn`` / ``batches`` contract, the costs and the randomness); groups.py: the same per group
of classes.
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
