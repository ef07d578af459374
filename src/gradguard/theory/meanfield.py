"""Mean-field signal propagation through a deep random MLP (Poole et al. 2016, Schoenholz et al. 2017).

A fully connected network with weights ``W_ij ~ N(0, sigma_w2 / fan_in)`` and biases ``b_i ~ N(0, sigma_b2)``
carries, in the wide limit, a pre-activation second moment ``q_l`` that follows the *length map*

    q_{l+1} = sigma_w2 * E_z[phi(sqrt(q_l) z)^2] + sigma_b2,        z ~ N(0, 1),

towards a fixed point ``q*``. At ``q*`` each layer multiplies the squared norm of the back-propagated gradient by

    chi1 = sigma_w2 * E_z[phi'(sqrt(q*) z)^2],

so after ``L`` layers it is scaled by ``chi1 ** L``: it vanishes for ``chi1 < 1`` (ordered phase), explodes for
``chi1 > 1`` (chaotic phase), and is preserved on the order-to-chaos boundary ``chi1 = 1``. The depth scales
``xi_q`` and ``xi_c`` say over how many layers the length and the correlation of two inputs settle.

Expectations over ``z`` are taken by Gauss-Hermite quadrature (100 nodes, an even number so that no node sits at
the kink of ReLU-like activations and ``E[step(z)] = 1/2`` holds exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ACTIVATIONS", "ActivationLike", "MeanField", "critical_sigma_w2", "gradient_factor", "mean_field"]

Array = np.ndarray
ActivationLike = str | Callable[[Array], Array]  # a name from ACTIVATIONS, or phi on float64 arrays

_N_NODES = 100  # even: no node at z = 0, where ReLU-like activations have their kink
_N_NODES_2D = 50  # per axis for the two-input (correlation) map
_Q_MAX = 1e150  # a length beyond this is taken as diverging (q* = inf)
_Q_ZERO = 1e-30  # with no bias, a fixed point below this is q* = 0 (the signal dies)
_Q_EVAL_MIN = 1e-200  # derivatives at q* = 0 are taken as the limit q -> 0+


@dataclass(frozen=True)
class _Activation:
    name: str
    phi: Callable[[Array], Array]
    d1: Callable[[Array], Array]
    d2: Callable[[Array], Array]


def _erf(x: Array) -> Array:
    # numpy has no erf; torch's float64 erf is exact to rounding and already a dependency
    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _pdf(x: Array) -> Array:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: Array) -> Array:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


_LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default
_SQRT_PI = math.sqrt(math.pi)

_NAMED: dict[str, _Activation] = {
    "tanh": _Activation(
        "tanh", np.tanh, lambda x: 1.0 - np.tanh(x) ** 2, lambda x: -2.0 * np.tanh(x) * (1.0 - np.tanh(x) ** 2)
    ),
    "relu": _Activation(
        "relu", lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64), lambda x: np.zeros_like(x)
    ),
    "sigmoid": _Activation(
        "sigmoid",
        _sigmoid,
        lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)),
        lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)) * (1.0 - 2.0 * _sigmoid(x)),
    ),
    "linear": _Activation("linear", lambda x: x.astype(np.float64), np.ones_like, np.zeros_like),
    "erf": _Activation(
        "erf", _erf, lambda x: 2.0 / _SQRT_PI * np.exp(-x * x), lambda x: -4.0 * x / _SQRT_PI * np.exp(-x * x)
    ),
    "gelu": _Activation(  # exact GELU, x * Phi(x), as torch.nn.GELU()
        "gelu", lambda x: x * _cdf(x), lambda x: _cdf(x) + x * _pdf(x), lambda x: _pdf(x) * (2.0 - x * x)
    ),
    "silu": _Activation(
        "silu",
        lambda x: x * _sigmoid(x),
        lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
        lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)) * (2.0 + x * (1.0 - 2.0 * _sigmoid(x))),
    ),
    "elu": _Activation(  # alpha = 1, as torch.nn.ELU()
        "elu",
        lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
        lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))),
        lambda x: np.where(x > 0, 0.0, np.exp(np.minimum(x, 0.0))),
    ),
    "leaky_relu": _Activation(
        "leaky_relu",
        lambda x: np.where(x > 0, x, _LEAKY_SLOPE * x),
        lambda x: np.where(x > 0, 1.0, _LEAKY_SLOPE),
        np.zeros_like,
    ),
}

ACTIVATIONS: tuple[str, ...] = tuple(_NAMED)

# Central-difference steps, relative to max(1, |x|): they balance truncation (h^2) against rounding (eps/h, eps/h^2).
_H1 = np.finfo(np.float64).eps ** (1.0 / 3.0)
_H2 = np.finfo(np.float64).eps ** (1.0 / 4.0)


def _from_callable(fn: Callable[[Array], Array]) -> _Activation:
    def phi(x: Array) -> Array:
        y = np.asarray(fn(x), dtype=np.float64)
        if y.shape != np.shape(x):
            raise ValueError(
                f"activation {_name_of(fn)!r} must act elementwise on a numpy array: given shape {np.shape(x)} "
                f"it returned shape {y.shape}"
            )
        return y

    def d1(x: Array) -> Array:
        h = _H1 * np.maximum(1.0, np.abs(x))
        return (phi(x + h) - phi(x - h)) / (2.0 * h)

    def d2(x: Array) -> Array:
        h = _H2 * np.maximum(1.0, np.abs(x))
        return (phi(x + h) - 2.0 * phi(x) + phi(x - h)) / (h * h)

    return _Activation(_name_of(fn), phi, d1, d2)


def _name_of(fn: object) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__))


def _resolve_activation(activation: ActivationLike) -> _Activation:
    """Turns a name or an elementwise numpy callable into phi, phi', phi'' (finite differences for callables)."""
    if isinstance(activation, str):
        key = activation.strip().lower()
        if key not in _NAMED:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}, "
                "or pass a callable acting elementwise on a numpy array"
            )
        return _NAMED[key]
    if callable(activation):
        return _from_callable(activation)
    raise TypeError(
        f"activation must be a name ({', '.join(ACTIVATIONS)}) or a callable on numpy arrays, "
        f"not {type(activation).__name__}"
    )


def _check_sigmas(sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    try:
        w, b = float(sigma_w2), float(sigma_b2)
    except (TypeError, ValueError):
        raise TypeError(f"sigma_w2 and sigma_b2 must be numbers, got {sigma_w2!r} and {sigma_b2!r}") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"sigma_w2 (weight variance times fan-in) must be finite and > 0, got {sigma_w2!r}")
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"sigma_b2 (bias variance) must be finite and >= 0, got {sigma_b2!r}")
    return w, b


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
        raise TypeError(f"depth must be an int (number of layers), got {type(depth).__name__}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (number of layers), got {depth}")
    return int(depth)


def _gauss_hermite(n: int) -> tuple[Array, Array]:
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / w.sum()  # w.sum() = sqrt(2 pi): weights of the standard normal


_Z, _W = _gauss_hermite(_N_NODES)
_Z2, _W2 = _gauss_hermite(_N_NODES_2D)


def _expect(f: Callable[[Array], Array], q: float) -> float:
    """E_z[f(sqrt(q) z)] for z ~ N(0, 1), by Gauss-Hermite quadrature."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return float(np.dot(_W, f(math.sqrt(q) * _Z)))


def _length_map(act: _Activation, q: float, sigma_w2: float, sigma_b2: float) -> float:
    return sigma_w2 * _expect(lambda u: act.phi(u) ** 2, q) + sigma_b2


def _q_star(act: _Activation, sigma_w2: float, sigma_b2: float, *, max_iter: int = 300) -> float:
    """Fixed point of the length map reached from q0 = 1: fixed-point iteration, then bisection if it is slow."""

    def g(q: float) -> float:
        return _length_map(act, q, sigma_w2, sigma_b2) - q

    q = 1.0
    for _ in range(max_iter):
        q_next = _length_map(act, q, sigma_w2, sigma_b2)
        if not math.isfinite(q_next):
            if math.isinf(q_next) or q > 1e100:
                return math.inf
            raise FloatingPointError(
                f"the length map of activation {act.name!r} returned {q_next} at q = {q:.6g}; "
                "check that the activation is finite on all reals"
            )
        if q_next > _Q_MAX:
            return math.inf
        if abs(q_next - q) <= 1e-14 * max(q, q_next):
            return q_next
        q = q_next
    # Slow convergence (near the boundary chi_q -> 1): the iterates move monotonically towards the fixed point, so
    # it lies on the side they move to; bracket it there and bisect.
    gq = g(q)
    if gq == 0.0:
        return q
    if gq < 0:
        lo, hi = 0.0, q
    else:
        lo, hi = q, 10.0 * q
        while g(hi) > 0:
            lo, hi = hi, 10.0 * hi
            if hi > _Q_MAX:
                return math.inf
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if g(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    q_star = 0.5 * (lo + hi)
    if q_star < _Q_ZERO and _length_map(act, 0.0, sigma_w2, sigma_b2) == 0.0:
        return 0.0
    return q_star


def _q_eval(q_star: float) -> float:
    # q* = 0: derivatives as the limit q -> 0+ (ReLU' is 1/2 on average there, not relu'(0));
    # q* = inf: the large-q limit, which is what homogeneous activations (ReLU, linear) have at every q
    return min(max(q_star, _Q_EVAL_MIN), _Q_MAX)


def _chi1(act: _Activation, q_star: float, sigma_w2: float) -> float:
    return sigma_w2 * _expect(lambda u: act.d1(u) ** 2, _q_eval(q_star))


def _chi_q(act: _Activation, q_star: float, sigma_w2: float) -> float:
    return sigma_w2 * _expect(lambda u: act.d1(u) ** 2 + act.phi(u) * act.d2(u), _q_eval(q_star))


def _pair(act: _Activation, q: float, c: float) -> tuple[Array, Array, Array]:
    """Two inputs with length q and correlation c: quadrature weights and u1, u2 on a 2-D Gauss-Hermite grid."""
    s = math.sqrt(q)
    z1, z2 = np.meshgrid(_Z2, _Z2, indexing="ij")
    u1 = s * z1
    u2 = s * (c * z1 + math.sqrt(max(0.0, 1.0 - c * c)) * z2)
    return np.outer(_W2, _W2), u1, u2


def _c_star(act: _Activation, q_star: float, sigma_w2: float, sigma_b2: float, *, max_iter: int = 2000) -> float:
    """Stable fixed point of the correlation map in the chaotic phase, iterated from c0 = 0."""
    c = 0.0
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for _ in range(max_iter):
            w, u1, u2 = _pair(act, q_star, c)
            c_next = (sigma_w2 * float(np.sum(w * act.phi(u1) * act.phi(u2))) + sigma_b2) / q_star
            c_next = min(1.0, max(-1.0, c_next))
            if abs(c_next - c) <= 1e-13:
                return c_next
            c = c_next
    return c


def _chi_c(act: _Activation, q_star: float, c_star: float, sigma_w2: float) -> float:
    w, u1, u2 = _pair(act, q_star, c_star)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return sigma_w2 * float(np.sum(w * act.d1(u1) * act.d1(u2)))


def _depth_scale(chi: float) -> float:
    """-1 / log(chi): layers over which a deviation shrinks by e; inf at chi >= 1, 0 at chi <= 0."""
    if not math.isfinite(chi):
        return math.nan
    if chi >= 1.0:
        return math.inf
    if chi <= 0.0:
        return 0.0
    return -1.0 / math.log(chi)


@dataclass(frozen=True)
class MeanField:
    """Mean-field predictions for a deep random MLP with one activation and weight/bias variances.

    Attributes:
        activation: the activation's name (a callable's ``__name__``).
        sigma_w2: weight variance times fan-in; sigma_b2: bias variance.
        q_star: fixed point of the pre-activation second moment reached from q0 = 1 (``inf`` if it grows without
            bound, e.g. ReLU with sigma_w2 > 2; ``0.0`` if the signal dies, e.g. tanh with sigma_w2 < 1, no bias).
        chi1: per-layer factor of the back-propagated gradient's squared norm at q* (< 1 vanishing, > 1 exploding).
        chi_q: slope of the length map at q*, ``sigma_w2 * E[phi'(u)^2 + phi(u) phi''(u)]``, u ~ N(0, q*).
        xi_q: depth scale (layers) of the length's convergence to q*, ``-1 / log(chi_q)``; ``inf`` if q* is.
        c_star: fixed point of the correlation of two inputs (1 in the ordered phase, < 1 in the chaotic one;
            ``nan`` if q* is infinite).
        xi_c: depth scale (layers) of the correlation's convergence to c*, ``-1 / log(chi_c)`` with chi_c = chi1 in
            the ordered phase and the slope of the correlation map at c* in the chaotic phase; ``inf`` at chi1 = 1.
        depth: number of layers asked for, or None; gradient_factor: ``chi1 ** depth`` when depth is given.
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    chi_q: float
    xi_q: float
    c_star: float
    xi_c: float
    depth: int | None = None
    gradient_factor: float | None = None

    @property
    def phase(self) -> str:
        """``"ordered"`` (gradients vanish), ``"critical"`` (chi1 = 1 within 1e-6) or ``"chaotic"`` (they explode)."""
        if abs(self.chi1 - 1.0) <= 1e-6:
            return "critical"
        return "ordered" if self.chi1 < 1.0 else "chaotic"


def mean_field(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float = 0.0, *, depth: int | None = None
) -> MeanField:
    """Fixed point q*, gradient factor chi1 and depth scales xi_q, xi_c of a deep random MLP (Schoenholz et al. 2017).

    ``activation`` is a name from ``ACTIVATIONS`` or a callable acting elementwise on a float64 numpy array (its
    derivatives are then taken by central differences, so kinks are smoothed over ~1e-5). ``sigma_w2`` is the weight
    variance times fan-in (2 for He init with ReLU), ``sigma_b2`` the bias variance. With ``depth`` the result also
    holds ``gradient_factor = chi1 ** depth``, the predicted ratio of the gradient's squared norm across ``depth``
    layers.
    """
    act = _resolve_activation(activation)
    w, b = _check_sigmas(sigma_w2, sigma_b2)
    d = None if depth is None else _check_depth(depth)
    q = _q_star(act, w, b)
    chi1 = _chi1(act, q, w)
    if not math.isfinite(chi1):
        raise FloatingPointError(
            f"chi1 is {chi1} for activation {act.name!r} at q* = {q:.6g}; its derivative is not finite there"
        )
    chi_q = _chi_q(act, q, w)
    if math.isinf(q):
        xi_q, c_star, xi_c = math.inf, math.nan, math.nan
    else:
        xi_q = _depth_scale(chi_q)
        if chi1 <= 1.0 or q == 0.0:
            c_star, xi_c = 1.0, _depth_scale(chi1)
        else:
            c_star = _c_star(act, q, w, b)
            xi_c = _depth_scale(_chi_c(act, q, c_star, w))
    return MeanField(
        activation=act.name,
        sigma_w2=w,
        sigma_b2=b,
        q_star=q,
        chi1=chi1,
        chi_q=chi_q,
        xi_q=xi_q,
        c_star=c_star,
        xi_c=xi_c,
        depth=d,
        gradient_factor=None if d is None else chi1**d,
    )


def gradient_factor(activation: ActivationLike, sigma_w2: float, sigma_b2: float, depth: int) -> float:
    """Predicted ratio of the gradient's squared norm ``depth`` layers down to its value at the top: chi1 ** depth."""
    act = _resolve_activation(activation)
    w, b = _check_sigmas(sigma_w2, sigma_b2)
    d = _check_depth(depth)
    return _chi1(act, _q_star(act, w, b), w) ** d


def critical_sigma_w2(activation: ActivationLike, sigma_b2: float = 0.0, *, tol: float = 1e-10) -> float:
    """The weight variance (times fan-in) where chi1 = 1: the order-to-chaos boundary for this bias variance.

    Found by bracketing and bisection on ``log(chi1)``; e.g. 1.0 for tanh and 2.0 for ReLU (He init) with no bias.
    Raises ValueError if chi1 never crosses 1 for sigma_w2 in [1e-6, 1e6].
    """
    act = _resolve_activation(activation)
    _, b = _check_sigmas(1.0, sigma_b2)

    def excess(w: float) -> float:
        return _chi1(act, _q_star(act, w, b), w) - 1.0

    lo, hi = 1.0, 1.0
    f_lo = f_hi = excess(1.0)
    if f_lo == 0.0:
        return 1.0
    # chi1 grows with sigma_w2 for the usual activations: walk down if chi1(1) > 1, up otherwise
    while f_lo > 0:
        hi, f_hi = lo, f_lo
        lo /= 2.0
        if lo < 1e-6:
            raise ValueError(f"chi1 > 1 for every sigma_w2 >= 1e-6 with activation {act.name!r}, sigma_b2={b}")
        f_lo = excess(lo)
    while f_hi < 0:
        lo, f_lo = hi, f_hi
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(
                f"chi1 < 1 for every sigma_w2 <= 1e6 with activation {act.name!r}, sigma_b2={b}: "
                "its derivative may vanish almost everywhere"
            )
        f_hi = excess(hi)
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        f_mid = excess(mid)
        if f_mid == 0.0:
            return mid
        if f_mid < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
