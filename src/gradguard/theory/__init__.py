"""Closed-form predictions of how gradients propagate: the product-of-derivatives bound and mean-field theory."""

from __future__ import annotations

from .bounds import derivative_bound, product_bound
from .meanfield import ACTIVATIONS, ActivationLike, MeanField, critical_sigma_w2, gradient_factor, mean_field

__all__ = [
    "ACTIVATIONS",
    "ActivationLike",
    "MeanField",
    "critical_sigma_w2",
    "derivative_bound",
    "gradient_factor",
    "mean_field",
    "product_bound",
]
