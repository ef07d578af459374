"""Learning-rate stability: the sharpness of the loss against the largest one the optimizer tolerates.

Near a minimum the loss is close to a quadratic ``f(w) = lambda w^2 / 2`` along each
eigenvector of the Hessian. Gradient descent with step ``lr`` multiplies the distance to the
minimum along that direction by ``1 - lr * lambda`` each step, so it diverges along the
sharpest direction once ``lambda_max > 2 / lr``. With heavy-ball momentum ``beta`` (PyTorch's
SGD) the characteristic polynomial ``z^2 - (1 + beta - lr lambda) z + beta`` gets a root at
``-1`` when ``lambda = 2 (1 + beta) / lr``; with Nesterov momentum, ``z^2 - (1 + beta)(1 - lr
lambda) z + beta (1 - lr lambda)`` gets one when ``lambda = 2 (1 + beta) / (lr (1 + 2 beta))``.

:func:`hessian_top_eigenvalue` estimates ``lambda_max`` by power iteration with Hessian-vector
products (double backward), :func:`stability_limit` gives the optimizer's threshold and
:func:`learning_rate_findings` turns both, with the loss of a short run, into a
``learning_rate_too_high`` finding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..detect.finding import Finding, Fix
from ..detect.fixes import ADAM, BATCHNORM, CLIP, LOWER_LR
from ..detect.thresholds import Thresholds

# Optimizers whose per-parameter step sizes adapt to the gradient: the fixed-step threshold does not apply.
_ADAPTIVE_NAMES = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "RMSprop", "Adagrad", "Adadelta",
                   "Adafactor", "Rprop")
ADAPTIVE: tuple[type, ...] = tuple(getattr(torch.optim, n) for n in _ADAPTIVE_NAMES if hasattr(torch.optim, n))


@dataclass(frozen=True)
class Curvature:
    """The estimate of the Hessian's eigenvalue of largest magnitude (it may be negative)."""

    value: float
    iterations: int
    converged: bool  # the relative change of the estimate fell below tol

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return asdict(self)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inner product over all tensors jointly, summed in float64 (one scalar per tensor pair)."""
    dev = a[0].device  # parameters may sit on several devices: gather the partial sums on one
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)).to(dev, torch.float64) for x, y in zip(a, b)]).sum()


def hessian_top_eigenvalue(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[..., torch.Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> Curvature:
    """The largest-magnitude eigenvalue of the Hessian of ``loss_fn(model(inputs), targets)``, by power iteration.

    The Hessian is over all parameters with ``requires_grad``; each iteration is one
    Hessian-vector product through the graph of the gradient, built once. The start vector is
    drawn from a generator seeded with ``seed``, so a deterministic model gives the same
    estimate every call. The estimate is the Rayleigh quotient ``v^T H v`` of the unit iterate;
    iteration stops when it changes by less than ``tol`` relative, or after ``iters`` products.

    The model's parameters, their ``.grad`` and its train/eval mode are left as they were; its
    buffers (BatchNorm running statistics, which a forward in training mode updates) are
    restored. Raises ``ValueError`` when the loss is not a finite scalar that depends on the
    parameters, or when the graph does not support double backward.
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")

    saved = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.enable_grad():
            return _power_iteration(model, params, inputs, targets, loss_fn, iters, tol, seed)
    finally:
        # Only once the graph is gone: BatchNorm's backward reads the running statistics it saved.
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def _power_iteration(
    model: nn.Module,
    params: list[nn.Parameter],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[..., torch.Tensor],
    iters: int,
    tol: float,
    seed: int,
) -> Curvature:
    """Power iteration with Hessian-vector products; see :func:`hessian_top_eigenvalue`."""
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape} (reduce it with a mean or a sum)")
    loss = loss.reshape(())
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on any parameter that requires grad")
    if not torch.isfinite(loss.detach()):
        raise ValueError(f"the loss is not finite ({loss.item()}): its Hessian is undefined")

    try:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    except RuntimeError as err:
        raise ValueError(f"the gradient could not be built for double backward: {_first_line(err)}") from err
    # A gradient without a graph is constant in the parameters: its rows of the Hessian are zero.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        raise ValueError("the gradient has no graph to differentiate again "
                         "(a module detaches its backward, or the loss is piecewise linear in the parameters)")
    outputs = [grads[i] for i in live]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        try:
            hv = torch.autograd.grad(outputs, params, grad_outputs=[v[i] for i in live], retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
        except RuntimeError as err:
            raise ValueError(f"the model does not support double backward: {_first_line(err)}") from err
        return list(hv)

    gen = torch.Generator().manual_seed(seed)
    # Drawn on the CPU from one generator, in parameter order, so the start does not depend on the device.
    v = [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]
    scale = 1.0 / math.sqrt(float(_dot(v, v)))
    v = [x * scale for x in v]

    value, prev, converged, it = 0.0, math.nan, False, 0
    for it in range(1, iters + 1):
        hv = hvp(v)
        # One read-back per iteration: the Rayleigh quotient and the norm together.
        value, norm2 = torch.stack([_dot(v, hv), _dot(hv, hv)]).tolist()
        if not (math.isfinite(value) and math.isfinite(norm2)):
            raise ValueError("a Hessian-vector product is not finite (the curvature overflows)")
        if norm2 == 0.0:
            # H v = 0 for a random v: the Hessian is zero (on the span this start can reach).
            return Curvature(value=0.0, iterations=it, converged=True)
        if abs(value - prev) <= tol * abs(value):
            converged = True
            break
        prev = value
        scale = 1.0 / math.sqrt(norm2)
        v = [h * scale for h in hv]
    return Curvature(value=float(value), iterations=it, converged=converged)


@dataclass(frozen=True)
class _SgdRule:
    """Plain/momentum/Nesterov SGD on ``lambda w^2 / 2`` is stable while ``lr (lambda + wd) < k``."""

    lr: float
    k: float
    weight_decay: float
    momentum: float
    limit_formula: str  # the largest stable lambda, in terms of lr
    lr_formula: str  # the largest stable lr, in terms of lambda_max
    description: str

    @property
    def limit(self) -> float:
        return self.k / self.lr - self.weight_decay

    def max_stable_lr(self, lam: float) -> float:
        return self.k / (lam + self.weight_decay)


def _sgd_rule(optimizer: torch.optim.Optimizer) -> _SgdRule | str:
    """The stability rule of the first param group, or why there is none."""
    name = type(optimizer).__name__
    if isinstance(optimizer, ADAPTIVE):
        return f"no fixed threshold for {name}: its per-parameter step sizes adapt to the gradient"
    if not isinstance(optimizer, torch.optim.SGD):
        return f"no stability threshold known for {name}"
    if not optimizer.param_groups:
        return "the optimizer has no parameter groups"
    g = optimizer.param_groups[0]
    lr = float(g["lr"])
    beta, damp = float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0))
    wd, nesterov = float(g.get("weight_decay", 0.0)), bool(g.get("nesterov", False))
    if g.get("maximize", False):
        return "no threshold for SGD with maximize=True (it ascends)"
    if lr <= 0:
        return f"no threshold for SGD with lr = {lr:g}: it takes no step"
    if beta == 0:
        k, limit_f, lr_f, what = 2.0, "2/lr", "2/lambda_max", "plain SGD"
    elif nesterov:  # PyTorch requires dampening 0 with Nesterov
        k = 2 * (1 + beta) / (1 + 2 * beta)
        limit_f, lr_f = "2(1+momentum)/(lr(1+2 momentum))", "2(1+momentum)/((1+2 momentum) lambda_max)"
        what = f"SGD with Nesterov momentum {beta:g}"
    elif damp < 1:
        # The buffer sums (1 - dampening) g: heavy ball with step lr (1 - dampening).
        k = 2 * (1 + beta) / (1 - damp)
        if damp:
            limit_f, lr_f = "2(1+momentum)/(lr(1-dampening))", "2(1+momentum)/((1-dampening) lambda_max)"
            what = f"SGD with momentum {beta:g} and dampening {damp:g}"
        else:
            limit_f, lr_f, what = "2(1+momentum)/lr", "2(1+momentum)/lambda_max", f"SGD with momentum {beta:g}"
    else:
        return "no threshold for SGD with dampening 1: after the first step it ignores the gradient"
    if wd:
        # Weight decay adds wd to every eigenvalue the update sees.
        limit_f += " - weight_decay"
        lr_f = lr_f.replace("lambda_max", "(lambda_max + weight_decay)")
        what += f" and weight decay {wd:g}"
    return _SgdRule(lr=lr, k=k, weight_decay=wd, momentum=beta, limit_formula=limit_f, lr_formula=lr_f,
                    description=f"{limit_f} for {what}")


def stability_limit(optimizer: torch.optim.Optimizer) -> tuple[float | None, str]:
    """The largest sharpness the first param group's step is stable at, and the rule behind it.

    ``2/lr`` for plain SGD, ``2(1+momentum)/lr`` with heavy-ball momentum (``/(1-dampening)``
    with dampening), ``2(1+momentum)/(lr(1+2 momentum))`` with Nesterov, minus ``weight_decay``
    when it is set. ``None`` for adaptive optimizers (Adam, AdamW, RMSprop, Adagrad, ...) and
    others without a fixed-step threshold; the string says why.
    """
    rule = _sgd_rule(optimizer)
    if isinstance(rule, str):
        return None, rule
    return rule.limit, rule.description


@dataclass(frozen=True)
class _Divergence:
    initial: float
    final: float
    first_nonfinite: int | None
    steps: int


def _divergence(losses: np.ndarray, ratio: float, tail: int) -> _Divergence | None:
    """The short run diverged: it started finite, then went non-finite or grew more than ``ratio`` times."""
    loss = np.asarray(losses, dtype=np.float64).reshape(-1)
    if loss.size == 0 or not np.isfinite(loss[0]):
        return None  # a loss that is already bad before the first update says nothing about the step size
    bad = np.flatnonzero(~np.isfinite(loss))
    initial = float(loss[0])
    if bad.size:
        return _Divergence(initial, float(loss[-1]), int(bad[0]), int(loss.size))
    final = float(np.median(loss[-tail:]))
    # Growth measured against |initial| so that negative losses (log-likelihoods) are judged sensibly.
    if final - initial > (ratio - 1) * abs(initial):
        return _Divergence(initial, final, None, int(loss.size))
    return None


def _plain(x: float) -> float | str:
    """A JSON-safe number: non-finite values become "nan", "inf" or "-inf"."""
    return float(x) if math.isfinite(x) else str(float(x))


def learning_rate_findings(
    curvature: Curvature | None,
    optimizer: torch.optim.Optimizer,
    losses: np.ndarray,
    th: Thresholds,
    *,
    error_ratio: float = 2.0,
    divergence_ratio: float = 10.0,
    tail: int = 5,
) -> list[Finding]:
    """At most one ``learning_rate_too_high`` finding, from the sharpness and from a short run's loss.

    Sharpness: when ``curvature.value`` exceeds :func:`stability_limit`, gradient descent is
    unstable along the sharpest direction. Up to ``error_ratio`` times the limit networks often
    recover on their own (the loss spikes and training moves to a flatter region: the catapult
    and edge-of-stability regimes), so that is a warning; beyond it, an error.

    Divergence, whatever the optimizer: ``losses`` is the per-step loss of a short run on one
    batch. If it started finite and then went non-finite, or its final value (the median of the
    last ``tail`` steps) grew above ``divergence_ratio`` times the initial one, that is an error.
    When both hold they make one finding. ``th`` is accepted for a uniform signature; these
    rules use the keyword arguments above.
    """
    rule = _sgd_rule(optimizer)
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else math.nan
    evidence: dict[str, Any] = {"lr": _plain(lr)}
    sentences: list[str] = []
    severity = ""
    sharp = False

    if curvature is not None and isinstance(rule, _SgdRule) and math.isfinite(curvature.value):
        lam, limit = float(curvature.value), rule.limit
        if lam > limit:
            sharp = True
            max_lr = rule.max_stable_lr(lam)
            severity = "error" if lam > error_ratio * limit else "warning"
            momentum = f", momentum {rule.momentum:g}" if rule.momentum else ""
            verb = "diverges" if severity == "error" else "is unstable"
            sentences.append(
                f"lambda_max = {lam:.3g} exceeds {rule.limit_formula} = {limit:.3g} (lr = {lr:.3g}{momentum}): "
                f"gradient descent {verb} along the sharpest direction; use lr below {rule.lr_formula} = {max_lr:.3g}"
            )
            evidence.update(
                lambda_max=lam, momentum=rule.momentum, weight_decay=rule.weight_decay, limit=limit,
                limit_rule=rule.description, max_stable_lr=max_lr, iterations=int(curvature.iterations),
                converged=bool(curvature.converged),
            )

    run = _divergence(losses, divergence_ratio, tail)
    if run is not None:
        severity = "error"
        if run.first_nonfinite is not None:
            grew = f"went from {run.initial:.3g} to non-finite at step {run.first_nonfinite} of a {run.steps}-step run"
        else:
            grew = f"grew from {run.initial:.3g} to {run.final:.3g} over a {run.steps}-step run"
        # Alone, the run is the whole story; after the sharpness sentence it confirms it.
        sentences.append(f"the training loss {grew}" if sharp else
                         f"The training loss {grew}: the step size is too large for this model (lr = {lr:.3g})")
        evidence.update(initial_loss=_plain(run.initial), final_loss=_plain(run.final),
                        first_nonfinite_step=run.first_nonfinite, steps=run.steps)

    if not sentences:
        return []
    fixes: list[Fix] = [LOWER_LR]
    if run is not None:
        fixes.append(CLIP)  # bounds each step while the learning rate is tuned
    if not isinstance(optimizer, ADAPTIVE):
        fixes.append(ADAM)
    if sharp:
        fixes.append(BATCHNORM)  # normalisation lowers the sharpness
    return [Finding(kind="learning_rate_too_high", severity=severity, message="; ".join(sentences), layer=None,
                    evidence=evidence, fixes=tuple(fixes))]
