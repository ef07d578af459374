"""The product-of-derivatives bound: back-propagation through L layers scales the gradient by at most max|phi'|^L.

Each layer multiplies the back-propagated gradient by the derivative of its activation (and by its weight
matrix). With ``|sigmoid'| <= 0.25``, ten sigmoid layers scale it by at most ``0.25 ** 10 ~ 9.5e-7`` before the
weights are counted: the classic explanation of vanishing gradients.
"""

from __future__ import annotations

import math

import numpy as np

from .meanfield import ActivationLike, _check_depth, _resolve_activation

__all__ = ["derivative_bound", "product_bound"]

_GRID_HALF_WIDTH = 50.0
_GRID_POINTS = 1_000_001  # odd: x = 0 is on the grid (where sigmoid' and tanh' peak); step 1e-4


def derivative_bound(activation: ActivationLike) -> float:
    """Largest |phi'(x)| over x in [-50, 50], by a dense grid search (step 1e-4), e.g. 0.25 for sigmoid, 1 for tanh.

    For a callable acting elementwise on a numpy array, phi' is taken by central differences.
    """
    act = _resolve_activation(activation)
    x = np.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, _GRID_POINTS)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        d = np.abs(act.d1(x))
    if not np.all(np.isfinite(d)):
        bad = float(x[~np.isfinite(d)][0])
        raise ValueError(f"the derivative of activation {act.name!r} is not finite at x = {bad:.6g}")
    return float(d.max())


def product_bound(activation: ActivationLike | None, depth: int, *, factor: float | None = None) -> float:
    """Upper bound on the gradient's scale after ``depth`` layers: ``derivative_bound(activation) ** depth``.

    Give ``factor=`` (a per-layer factor, e.g. 0.5) instead of an activation to get ``factor ** depth``
    (``0.5 ** 5 = 0.031``); pass ``activation=None`` then.
    """
    d = _check_depth(depth)
    if factor is not None:
        if activation is not None:
            raise ValueError("give either an activation or factor=, not both")
        try:
            f = float(factor)
        except (TypeError, ValueError):
            raise TypeError(f"factor must be a number, got {factor!r}") from None
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"factor (per-layer scale of the gradient) must be finite and >= 0, got {factor!r}")
        return f**d
    if activation is None:
        raise ValueError("give an activation (a name or a callable) or a per-layer factor=")
    return derivative_bound(activation) ** d
