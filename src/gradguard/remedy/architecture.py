"""Architecture fixes for vanishing/exploding gradients: activations, normalisation, residuals, input scaling.

Each function that changes a model returns a modified deep copy by default, leaving the
model it was given untouched, or changes the model itself with ``inplace=True``. Use the
returned module either way. A function that finds nothing to change raises a
``ValueError`` saying what it looked for, rather than returning an unchanged model that
looks fixed.

New modules are created on the device and in the dtype of the layers they join, so a
fix applied to a model on an accelerator stays there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "InputStandardizer",
    "Residual",
    "insert_normalization",
    "prepend_standardizer",
    "residualize",
    "swap_activation",
]

M = TypeVar("M", bound=nn.Module)

# Elementwise nonlinearities: what "followed by an activation" means below.
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Tanhshrink,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus, nn.Threshold,
)
# Normalisation over the feature dimension: it keeps the shape, so it may sit inside a residual block.
_FEATURE_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.LayerNorm)
_BATCHNORM_FOR_CONV: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.ConvTranspose1d: nn.BatchNorm1d,
    nn.ConvTranspose2d: nn.BatchNorm2d,
    nn.ConvTranspose3d: nn.BatchNorm3d,
}
_KINDS = ("batch", "layer")


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def _target(model: M, inplace: bool) -> M:
    # A deep copy by default, so a what-if fix never touches the model being diagnosed.
    _check_model(model)
    return model if inplace else copy.deepcopy(model)


def _class_name(cls: type) -> str:
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__qualname__


def _first_float_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    return None


def _like(new: nn.Module, *refs: nn.Module) -> nn.Module:
    """``new`` moved to the device and dtype of the first reference module that has floating tensors."""
    if _first_float_tensor(new) is None:
        return new  # nothing to move (most activations)
    for ref in refs:
        t = _first_float_tensor(ref)
        if t is not None:
            return new.to(device=t.device, dtype=t.dtype)
    return new


def _rebuild(seq: nn.Sequential, items: list[tuple[str, nn.Module]]) -> None:
    """Replace the children of ``seq`` in place (its identity, and so its parent's reference, stay)."""
    # nn.Sequential indexes its children by position: keep "0", "1", ... contiguous after an insertion.
    if all(name.isdigit() for name in seq._modules):
        items = [(str(i), m) for i, (_, m) in enumerate(items)]
    seq._modules.clear()
    seq._modules.update(items)


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


# ---------------------------------------------------------------------------------------------- activations


def _make(new: type[nn.Module] | Callable[[], nn.Module]) -> nn.Module:
    made = new()
    if not isinstance(made, nn.Module):
        raise TypeError(f"new must create an nn.Module, but it returned {type(made).__name__}")
    return made


def swap_activation(
    model: nn.Module,
    old: type[nn.Module],
    new: type[nn.Module] | Callable[[], nn.Module],
    *,
    inplace: bool = False,
) -> nn.Module:
    """Replace every module of type ``old`` (subclasses included) by a fresh ``new()``.

    ``new`` is a module class or a zero-argument factory (``lambda: nn.LeakyReLU(0.01)``);
    each replaced module gets its own instance, so one shared activation becomes several
    independent ones. Raises ``ValueError`` if the model has no ``old`` module. If the
    model itself is an ``old``, the new module is returned.
    """
    if not (isinstance(old, type) and issubclass(old, nn.Module)):
        raise TypeError(f"old must be an nn.Module class such as nn.Sigmoid, got {old!r}")
    if isinstance(new, nn.Module):
        # A module instance is callable too; calling it would run its forward with no input.
        raise TypeError(
            f"new must be a class or a zero-argument factory, not a module instance: pass "
            f"{_class_name(type(new))}, not {_class_name(type(new))}(), so each replacement is its own module"
        )
    if not callable(new):
        raise TypeError(f"new must be an nn.Module class or a zero-argument factory, got {new!r}")
    _check_model(model)
    if isinstance(model, old):
        return _like(_make(new), model)
    if not any(isinstance(m, old) for m in model.modules()):
        raise ValueError(f"no {_class_name(old)} modules in the model: nothing to swap")
    target = _target(model, inplace)
    # Collected first: a replacement that is itself an `old` must not be visited again.
    edges = [
        (parent, name, child)
        for parent in target.modules()
        for name, child in parent._modules.items()
        if child is not None and isinstance(child, old)
    ]
    for parent, name, child in edges:
        # Same train/eval mode as the module it replaces (an eval-mode model stays in eval mode).
        parent._modules[name] = _like(_make(new), child, target).train(child.training)
    return target


# -------------------------------------------------------------------------------------------- normalisation


def _norm_after(layer: nn.Module, kind: str) -> nn.Module | None:
    """The normalisation layer to put after ``layer``, or None if ``layer`` is not eligible."""
    if isinstance(layer, nn.Linear):
        device, dtype = layer.weight.device, layer.weight.dtype
        if kind == "batch":
            return nn.BatchNorm1d(layer.out_features, device=device, dtype=dtype)
        return nn.LayerNorm(layer.out_features, device=device, dtype=dtype)
    if kind == "batch":
        for conv, norm in _BATCHNORM_FOR_CONV.items():
            if isinstance(layer, conv):
                assert isinstance(layer, nn.modules.conv._ConvNd)
                return norm(layer.out_channels, device=layer.weight.device, dtype=layer.weight.dtype)
    return None


def _normalize_sequential(seq: nn.Sequential, kind: str) -> int:
    items = list(seq._modules.items())
    taken = {name for name, _ in items}
    out: list[tuple[str, nn.Module]] = []
    added = 0
    for i, (name, module) in enumerate(items):
        out.append((name, module))
        following = items[i + 1][1] if i + 1 < len(items) else None
        if not isinstance(following, _ACTIVATIONS):
            continue
        norm = _norm_after(module, kind)
        if norm is not None:
            # In eval mode a new BatchNorm must use its running statistics, like the rest of the model.
            out.append((_unique(f"{name}_norm", taken), norm.train(module.training)))
            added += 1
    if added:
        _rebuild(seq, out)
    return added


def insert_normalization(model: nn.Module, kind: str = "batch", *, inplace: bool = False) -> nn.Module:
    """Insert a normalisation layer between each layer and the activation that follows it.

    Inside every ``nn.Sequential`` of the model (nested ones included), an ``nn.Linear``
    directly followed by an activation gets ``BatchNorm1d(out_features)`` (``kind="batch"``)
    or ``LayerNorm(out_features)`` (``kind="layer"``) in between; with ``kind="batch"``,
    ``Conv1d/2d/3d`` (and their transposes) get ``BatchNorm1d/2d/3d(out_channels)``. A
    Linear's input is taken to be ``[batch, features]`` for BatchNorm1d. Keys of an
    index-named Sequential are renumbered (``"2"`` may become ``"3"``); in a name-keyed one
    the new layer is called ``<layer>_norm``. Raises ``ValueError`` for an unknown kind or
    when no layer is eligible.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}: use 'batch' (BatchNorm) or 'layer' (LayerNorm)")
    _check_model(model)
    target = _target(model, inplace)
    added = sum(_normalize_sequential(m, kind) for m in list(target.modules()) if isinstance(m, nn.Sequential))
    if added == 0:
        layers = "nn.Linear" if kind == "layer" else "nn.Linear or nn.Conv1d/2d/3d"
        hint = " (kind='layer' covers nn.Linear only; use kind='batch' for convolutions)" if kind == "layer" else ""
        raise ValueError(
            f"no {layers} layer directly followed by an activation inside an nn.Sequential: "
            f"nothing to normalise{hint}"
        )
    return target


# ------------------------------------------------------------------------------------------------ residuals


def _check_alpha(alpha_init: float) -> None:
    if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)) or not math.isfinite(alpha_init):
        raise ValueError(f"alpha_init must be a finite number, got {alpha_init!r}")


class Residual(nn.Module):
    """``x + alpha * block(x)`` with a learnable scalar ``alpha`` (SkipInit, De & Smith 2020).

    With ``alpha_init=0`` the block starts as the identity: the signal and the gradient
    pass through unchanged however deep the stack, and the network learns how much of
    each block to use. At exactly 0 the block's own weights get a zero gradient on the
    first step (only ``alpha`` moves); from the next step on they train. ``block`` must
    keep the shape of its input.
    """

    def __init__(self, block: nn.Module, alpha_init: float = 0.0) -> None:
        super().__init__()
        _check_alpha(alpha_init)
        self.block = block
        ref = _first_float_tensor(block)
        self.alpha = nn.Parameter(
            torch.tensor(
                float(alpha_init),
                device=ref.device if ref is not None else None,
                dtype=ref.dtype if ref is not None else None,
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.block(x)


def _square_linear(module: nn.Module) -> bool:
    # in_features is 0 on a LazyLinear not yet run: its width is unknown, so it cannot be a block.
    return isinstance(module, nn.Linear) and module.in_features == module.out_features > 0


def _keeps_width(module: nn.Module, width: int) -> bool:
    if isinstance(module, nn.BatchNorm1d):
        return module.num_features == width
    return isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (width,)


def _residualize_sequential(seq: nn.Sequential, alpha_init: float) -> int:
    items = list(seq._modules.items())
    out: list[tuple[str, nn.Module]] = []
    wrapped = 0
    i = 0
    while i < len(items):
        name, module = items[i]
        if _square_linear(module):
            assert isinstance(module, nn.Linear)
            # A block is Linear(d, d), any width-keeping normalisation (as insert_normalization adds), an activation.
            j = i + 1
            while j < len(items) and _keeps_width(items[j][1], module.out_features):
                j += 1
            if j < len(items) and isinstance(items[j][1], _ACTIVATIONS):
                block = nn.Sequential(*(m for _, m in items[i : j + 1]))
                out.append((name, Residual(block, alpha_init).train(module.training)))
                wrapped += 1
                i = j + 1
                continue
        out.append((name, module))
        i += 1
    if wrapped:
        _rebuild(seq, out)
    return wrapped


def _widths(linears: Iterable[nn.Linear], limit: int = 4) -> str:
    shown = [f"Linear({m.in_features}->{m.out_features})" for m in linears]
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def residualize(model: nn.Module, *, alpha_init: float = 0.0, inplace: bool = False) -> nn.Module:
    """Wrap every width-preserving ``[Linear(d, d), activation]`` block of a Sequential in a :class:`Residual`.

    Inside every ``nn.Sequential`` of the model (nested ones included), each block of an
    ``nn.Linear`` with equal input and output width, optional ``BatchNorm1d``/``LayerNorm``
    of that width, and an activation becomes ``Residual(block)``: ``x + alpha * block(x)``
    with ``alpha`` a learnable scalar starting at ``alpha_init`` (0: SkipInit, the block
    starts as the identity). Layers that change the width (input projection, classifier)
    stay as they are. Raises ``ValueError`` if the model has no ``nn.Linear``, or no block
    that keeps its width.
    """
    _check_model(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("residualize needs nn.Linear layers, and the model has none")
    _check_alpha(alpha_init)  # before the copy: a bad argument should not cost a deep copy of a large model
    target = _target(model, inplace)
    # The block of an existing Residual is already residual: wrapping it again would nest skips.
    inside = {id(m.block) for m in target.modules() if isinstance(m, Residual)}
    sequentials = [m for m in target.modules() if isinstance(m, nn.Sequential) and id(m) not in inside]
    wrapped = sum(_residualize_sequential(seq, alpha_init) for seq in sequentials)
    if wrapped == 0:
        already = f"; {len(inside)} block(s) are already Residual" if inside else ""
        raise ValueError(
            "no nn.Linear with equal input and output width followed by an activation inside an nn.Sequential: "
            f"a residual x + f(x) needs f to keep the shape of x (found {_widths(linears)}{already})"
        )
    return target


# ------------------------------------------------------------------------------------------ input scaling


def _dims(dim: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    raw = (dim,) if isinstance(dim, int) else tuple(dim)
    if not raw or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise TypeError(f"dim must be an int or a non-empty tuple of ints, got {dim!r}")
    for d in raw:
        if not -ndim <= d < ndim:
            raise ValueError(f"dim {d} is out of range for data with {ndim} dimension(s)")
    dims = tuple(sorted(d % ndim for d in raw))
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim {dim!r} names a dimension twice")
    return dims


class InputStandardizer(nn.Module):
    """``(x - mean) / (std + eps)`` with per-feature ``mean`` and ``std`` buffers fitted on data.

    Build it with :meth:`fit`. ``mean`` and ``std`` are buffers: they follow ``.to()``, are
    saved in ``state_dict`` and are not trained. Unnormalised inputs (features of very
    different scales, or far from zero) push the first layers into saturation and make
    the gradient of the first layer scale with the input.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> None:
        super().__init__()
        if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
            raise TypeError("mean and std must be tensors")
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same shape, got {tuple(mean.shape)} and {tuple(std.shape)}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or math.isinf(eps):
            raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.eps = float(eps)

    @classmethod
    def fit(cls, data: torch.Tensor, dim: int | tuple[int, ...] = 0, eps: float = 1e-8) -> InputStandardizer:
        """Fit on ``data`` (``[N, features...]``), reducing over ``dim`` (the sample dimension by default).

        ``dim=(0, 2, 3)`` on images ``[N, C, H, W]`` gives per-channel statistics. The
        standard deviation is the population one (as scikit-learn's ``StandardScaler``),
        computed in float64; a feature that is constant in ``data`` gets ``std = 1``
        (not 0, which would scale any other value by ``1 / eps``). The buffers keep the
        data's dtype (the default dtype for integer data) and device.
        """
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor of shape [N, features...], got {type(data).__name__}")
        if data.is_complex():
            raise TypeError(f"data must be real, got dtype {data.dtype}")
        if data.dim() == 0:
            raise ValueError("data must have a sample dimension (shape [N, features...]), got a 0-d tensor")
        if data.numel() == 0:
            raise ValueError(
                f"data has a zero-size dimension (shape {tuple(data.shape)}): need at least one sample and one feature"
            )
        dims = _dims(dim, data.dim())
        values = data.detach().to(torch.float64)
        if not bool(torch.isfinite(values).all()):  # one synchronisation, at fit time only
            raise ValueError("data contains NaN or inf: its mean and standard deviation would be meaningless")
        mean = values.mean(dim=dims, keepdim=True)
        std = values.std(dim=dims, correction=0, keepdim=True)
        constant = values.amax(dim=dims, keepdim=True) == values.amin(dim=dims, keepdim=True)
        std = torch.where(constant, torch.ones_like(std), std)
        if 0 in dims:
            # [1, F] -> [F]: broadcasts against any batch size, and against a single unbatched sample.
            mean, std = mean.squeeze(0), std.squeeze(0)
        dtype = data.dtype if data.is_floating_point() else torch.get_default_dtype()
        return cls(mean.to(dtype), std.to(dtype), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fitted = self.mean.shape  # a 1 there was reduced over (dim=...): any size fits
        if fitted and (x.dim() < len(fitted) or any(f not in (1, n) for f, n in zip(fitted, x.shape[-len(fitted):]))):
            # Broadcasting would either fail deep inside torch or, worse, silently mix features.
            raise ValueError(
                f"InputStandardizer was fitted on features of shape {tuple(fitted)} (1: any size) but got an input "
                f"of shape {tuple(x.shape)}: fit it on data shaped like the model's inputs"
            )
        return (x - self.mean) / (self.std + self.eps)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mean.shape)}, eps={self.eps}"


def prepend_standardizer(
    model: nn.Module,
    data: torch.Tensor,
    *,
    dim: int | tuple[int, ...] = 0,
    eps: float = 1e-8,
    inplace: bool = False,
) -> nn.Sequential:
    """``nn.Sequential(InputStandardizer.fit(data, dim, eps), model)``: the model, fed standardised inputs.

    The standardizer's buffers take the device and floating dtype of the model's
    parameters. The model is deep-copied first unless ``inplace=True`` (then the
    returned Sequential holds the given model itself).
    """
    _check_model(model)
    standardizer = InputStandardizer.fit(data, dim=dim, eps=eps)
    first = model
    while isinstance(first, nn.Sequential) and len(first):  # a Sequential runs its first item first
        first = first[0]
    features = standardizer.mean.shape[-1] if standardizer.mean.dim() else None
    if type(first) is nn.Linear and features not in (None, 1, first.in_features):
        raise ValueError(
            f"data has {features} features but the model's first layer, {first}, takes {first.in_features}: "
            "pass data shaped like the model's inputs"
        )
    target = _target(model, inplace)
    ref = _first_float_tensor(target)
    if ref is not None:
        standardizer = standardizer.to(device=ref.device, dtype=ref.dtype)
    return nn.Sequential(standardizer, target)
