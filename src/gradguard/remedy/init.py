"""Weight initialisers that keep the signal's scale through depth: Xavier, He, orthogonal, LeCun, LSUV, SkipInit.

A layer's weights decide how much it scales the forward signal and the backward gradient. If each of L layers
scales them by a factor c, the first layers see c^L: they vanish for c < 1 and explode for c > 1. The schemes here
pick the weight variance so that c is 1 for the activation that follows each layer:

======================  ==========================================================  ==============================
scheme                  weight variance                                             reference
======================  ==========================================================  ==============================
``"xavier"``            ``gain^2 * 2 / (fan_in + fan_out)``                         Glorot & Bengio 2010
``"kaiming"``           ``gain^2 / fan`` (``fan`` is fan_in or fan_out, ``mode``)   He et al. 2015
``"orthogonal"``        ``gain * Q`` with Q orthogonal (all singular values 1)      Saxe et al. 2014
``"lecun"``             ``1 / fan_in``                                              LeCun et al. 1998
``"auto"``              kaiming after ReLU-family, lecun after SELU, else xavier
======================  ==========================================================  ==============================

``gain`` is ``torch.nn.init.calculate_gain`` of the activation that follows the layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from ..probe.layers import _unwrap
from .architecture import Residual

__all__ = ["SCHEMES", "init_", "lsuv", "zero_init_residual_"]

SCHEMES: tuple[str, ...] = ("xavier", "kaiming", "orthogonal", "lecun", "auto")
_MODES = ("fan_in", "fan_out")
_DISTRIBUTIONS = ("normal", "uniform")
# The layers whose weight these schemes are defined for; ConvTranspose stores its weight as [in, out, ...],
# which would swap the fans, so it is left out rather than initialised with the wrong variance.
_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SKIPINIT_NAMES = ("skipinit_gain", "gain")

M = TypeVar("M", bound=nn.Module)
_Kind = Literal["linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu"]


@dataclass(frozen=True)
class _Act:
    """An activation as ``torch.nn.init.calculate_gain`` knows it: a nonlinearity name and its slope."""

    kind: _Kind
    slope: float | None = None

    def gain(self) -> float:
        return nn.init.calculate_gain(self.kind, self.slope)


_LINEAR = _Act("linear")

# Smooth ReLU-like activations (GELU, SiLU, ELU, ...) have no gain of their own in torch; they behave like ReLU
# for large |x| and pass about half the signal's second moment, so they take ReLU's gain (and Kaiming under "auto").
_ACT_KINDS: dict[type[nn.Module], _Kind] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.GELU: "relu",
    nn.SiLU: "relu",
    nn.ELU: "relu",
    nn.CELU: "relu",
    nn.Mish: "relu",
    nn.Softplus: "relu",
    nn.Hardswish: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "leaky_relu",
    nn.RReLU: "leaky_relu",
    nn.SELU: "selu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "sigmoid",
    nn.Hardtanh: "linear",  # slope 1 wherever it does not clip
    nn.Softsign: "linear",
}

_ACT_NAMES: dict[str, _Kind] = {
    "relu": "relu",
    "gelu": "relu",
    "silu": "relu",
    "swish": "relu",
    "elu": "relu",
    "mish": "relu",
    "leaky_relu": "leaky_relu",
    "selu": "selu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "linear",
    "identity": "linear",
    "none": "linear",
}

_RELU_FAMILY = ("relu", "leaky_relu")


@dataclass
class _Layer:
    name: str
    module: nn.Module
    act: _Act

    @property
    def weight(self) -> Tensor:
        w = self.module.weight
        assert isinstance(w, Tensor)  # every module in _WEIGHT_LAYERS registers one
        return w


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gradguard expects a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model itself (e.g. init_(model, 'kaiming')), not its parameters or output."
        )


def _check_choice(value: object, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, allowed))}.")


def _act_of_module(module: nn.Module) -> _Act | None:
    # Walk the MRO so subclasses (user activations deriving from nn.ReLU, ReLU6 deriving from Hardtanh) resolve to
    # their closest known parent.
    for cls in type(module).__mro__:
        kind = _ACT_KINDS.get(cls)
        if kind is None:
            continue
        if isinstance(module, nn.LeakyReLU):
            return _Act(kind, float(module.negative_slope))
        if isinstance(module, nn.PReLU):
            return _Act(kind, float(module.weight.detach().float().mean()))
        if isinstance(module, nn.RReLU):
            return _Act(kind, (module.lower + module.upper) / 2)
        return _Act(kind)
    return None


def _parse_activation(activation: str | nn.Module) -> _Act:
    if isinstance(activation, nn.Module):
        act = _act_of_module(activation)
        if act is None:
            known = ", ".join(sorted(c.__name__ for c in _ACT_KINDS))
            raise ValueError(
                f"activation={type(activation).__name__}() is not an activation gradguard knows; use one of {known}, "
                f"or a name: {', '.join(map(repr, _ACT_NAMES))}."
            )
        return act
    if isinstance(activation, str):
        key = activation.lower()
        _check_choice(key, list(_ACT_NAMES), "activation")
        return _Act(_ACT_NAMES[key])
    raise TypeError(f"activation must be a name (e.g. 'relu') or an nn.Module, got {type(activation).__name__}.")


def _weight_layers(model: nn.Module) -> list[_Layer]:
    """The Linear/Conv layers of ``model`` in registration order, each with the activation registered after it."""
    layers: list[_Layer] = []
    waiting: _Layer | None = None  # the last weight layer that has not met its activation yet
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):
            waiting = _Layer(name, module, _LINEAR)
            layers.append(waiting)
        elif waiting is not None and (act := _act_of_module(module)) is not None:
            waiting.act = act
            waiting = None
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear or Conv1d/2d/3d layer, so there is no weight to initialise. "
            "Pass the model that contains the layers."
        )
    for layer in layers:
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"layer {layer.name!r} is lazy and has no weight yet; run one forward pass on a batch first, "
                "then initialise."
            )
    return layers


def _select(
    layers: list[_Layer], scheme: str, selection: Sequence[str] | Mapping[str, str] | None
) -> list[tuple[_Layer, str]]:
    if selection is None:
        return [(layer, scheme) for layer in layers]
    if isinstance(selection, str):
        selection = [selection]
    if isinstance(selection, Mapping):
        wanted = dict(selection)
        for name, s in wanted.items():
            if s not in SCHEMES:
                raise ValueError(
                    f"unknown scheme {s!r} for layer {name!r}; choose one of {', '.join(map(repr, SCHEMES))}."
                )
    else:
        wanted = {name: scheme for name in selection}
    if not wanted:
        raise ValueError("layers= is empty, so nothing would be initialised; pass None to initialise every layer.")
    by_name = {layer.name: layer for layer in layers}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        shown = ", ".join(map(repr, list(by_name)[:20])) + (", ..." if len(by_name) > 20 else "")
        raise ValueError(
            f"layers= names {', '.join(map(repr, missing))}, which are not Linear/Conv layers of the model; "
            f"its layers are: {shown}."
        )
    return [(by_name[name], s) for name, s in wanted.items()]


def _fans(weight: Tensor) -> tuple[int, int]:
    # Same as torch.nn.init._calculate_fan_in_and_fan_out: a conv kernel's spatial size multiplies both fans, and a
    # grouped conv's weight already holds in_channels / groups, so its fan_in is per group.
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _fill(weight: Tensor, std: float, distribution: str) -> None:
    if distribution == "normal":
        weight.normal_(0.0, std)
    else:
        bound = math.sqrt(3.0) * std  # U(-b, b) has variance b^2 / 3
        weight.uniform_(-bound, bound)


def _orthogonal(weight: Tensor, gain: float) -> None:
    if weight.dtype in (torch.float32, torch.float64):
        nn.init.orthogonal_(weight, gain=gain)
        return
    # The QR decomposition behind orthogonal_ has no fp16/bf16 kernel; build Q in float32 and round once.
    tmp = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    nn.init.orthogonal_(tmp, gain=gain)
    weight.copy_(tmp)


def _resolve_auto(act: _Act) -> str:
    if act.kind in _RELU_FAMILY:
        return "kaiming"
    if act.kind == "selu":
        return "lecun"  # self-normalising networks (Klambauer et al. 2017) are defined with LeCun normal weights
    return "xavier"


def _init_layer(layer: _Layer, scheme: str, act: _Act, mode: str, distribution: str) -> None:
    weight = layer.weight
    if scheme == "auto":
        scheme = _resolve_auto(act)
    if weight.numel() > 0:
        fan_in, fan_out = _fans(weight)
        if scheme == "orthogonal":
            _orthogonal(weight, act.gain())
        elif scheme == "xavier":
            _fill(weight, act.gain() * math.sqrt(2.0 / (fan_in + fan_out)), distribution)
        elif scheme == "kaiming":
            _fill(weight, act.gain() / math.sqrt(fan_in if mode == "fan_in" else fan_out), distribution)
        else:  # lecun
            _fill(weight, 1.0 / math.sqrt(fan_in), distribution)
    bias = getattr(layer.module, "bias", None)
    if isinstance(bias, Tensor):
        bias.zero_()


def init_(
    model: M,
    scheme: str,
    *,
    mode: str = "fan_in",
    distribution: str = "normal",
    activation: str | nn.Module | None = None,
    layers: Sequence[str] | Mapping[str, str] | None = None,
) -> M:
    """Initialise every Linear/Conv1d/2d/3d weight of ``model`` in place with ``scheme``, zero its biases; return it.

    Schemes (``gain`` = ``torch.nn.init.calculate_gain`` of the activation that follows the layer):

    - ``"xavier"`` (Glorot & Bengio 2010): variance ``gain^2 * 2 / (fan_in + fan_out)``.
    - ``"kaiming"`` (He et al. 2015): variance ``gain^2 / fan``, ``fan`` = fan_in or fan_out by ``mode``.
    - ``"orthogonal"`` (Saxe et al. 2014): ``gain`` times an orthogonal matrix (the weight flattened to 2-D).
    - ``"lecun"`` (LeCun et al. 1998): variance ``1 / fan_in``, no gain.
    - ``"auto"``: per layer, ``"kaiming"`` when a ReLU-family activation follows (ReLU, LeakyReLU, GELU, SiLU, ELU,
      ...), ``"lecun"`` when SELU follows, ``"xavier"`` when tanh, sigmoid or nothing (linear) follows.

    Fans follow ``torch.nn.init._calculate_fan_in_and_fan_out``: a conv kernel's size multiplies both.

    The activation that follows a layer is found without running the model, by registration order: the first
    activation module (``nn.ReLU``, ``nn.LeakyReLU`` with its slope, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.GELU``, ...)
    after the layer in ``model.modules()`` and before the next Linear/Conv layer; none means linear (gain 1). GELU,
    SiLU, ELU and other smooth ReLUs take ReLU's gain, sqrt(2). Activations called as functions in ``forward``
    (``F.relu``) are not seen: pass ``activation=`` then.

    Args:
        model: the model, changed in place.
        scheme: one of ``SCHEMES``.
        mode: ``"fan_in"`` (keeps the forward signal's variance) or ``"fan_out"`` (the backward gradient's);
            used by ``"kaiming"`` only.
        distribution: ``"normal"`` or ``"uniform"`` (same variance); not used by ``"orthogonal"``.
        activation: the activation after every layer, overriding the one found: a name (``"relu"``, ``"tanh"``,
            ``"leaky_relu"`` with slope 0.01, ``"sigmoid"``, ``"linear"``, ...) or a module (``nn.LeakyReLU(0.2)``).
        layers: only these layers, by qualified module name (``["0", "blocks.3.fc"]``); or a dict from name to
            scheme to choose per layer (``scheme`` is then unused). Other layers are left as they are.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown scheme, mode, distribution or activation; a name in ``layers`` that is not a
            Linear/Conv layer; a model without Linear/Conv layers.
    """
    _check_model(model)
    _check_choice(scheme, SCHEMES, "scheme")
    _check_choice(mode, _MODES, "mode")
    _check_choice(distribution, _DISTRIBUTIONS, "distribution")
    forced = None if activation is None else _parse_activation(activation)
    chosen = _select(_weight_layers(_unwrap(model)), scheme, layers)
    with torch.no_grad():
        for layer, layer_scheme in chosen:
            _init_layer(layer, layer_scheme, forced or layer.act, mode, distribution)
    return model


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer being calibrated has produced its output."""


def _forward_order(model: nn.Module, batch: Tensor, layers: list[_Layer]) -> list[_Layer]:
    seen: list[_Layer] = []
    handles = []
    for layer in layers:

        def hook(module: nn.Module, inputs: object, output: object, layer: _Layer = layer) -> None:
            if layer not in seen:
                seen.append(layer)

        handles.append(layer.module.register_forward_hook(hook))
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _output_variance(model: nn.Module, batch: Tensor, module: nn.Module) -> float:
    outputs: list[Tensor] = []

    def hook(mod: nn.Module, inputs: object, output: Tensor) -> None:
        outputs.append(output)
        raise _StopForward  # the layers after this one do not change its output: skip their cost

    handle = module.register_forward_hook(hook)
    try:
        model(batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not outputs:  # the forward pass took another path than the one that found this layer
        raise RuntimeError(f"{type(module).__name__} did not run on this batch; lsuv needs a deterministic forward.")
    return float(outputs[0].detach().double().var())


def lsuv(model: M, batch: Tensor, *, tol: float = 0.1, max_iter: int = 10) -> M:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas 2016), in place; return the model.

    First every Linear/Conv layer gets an orthogonal weight and a zero bias (``init_(model, "orthogonal")``). Then,
    layer by layer in the order the forward pass calls them, its weight is divided by the standard deviation of its
    output on ``batch`` until that output's variance is within ``tol`` of 1 (at most ``max_iter`` rescalings; a
    warning says when a layer did not get there). The passes run in eval mode under ``torch.no_grad``; each
    module's training flag is restored afterwards and the forward hooks used are removed. A layer the forward
    pass never calls keeps its orthogonal weight; a layer called more than once is calibrated on its first call.

    Args:
        model: the model, changed in place; it must accept ``model(batch)``.
        batch: a representative input batch, on the model's device (a few hundred samples is plenty).
        tol: accepted distance of each layer's output variance from 1.
        max_iter: most rescalings per layer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``batch`` is not a tensor.
        ValueError: the model has no Linear/Conv layer, none of them runs on ``batch``, or a layer's output has zero
            or non-finite variance (so no rescaling can make it 1).
    """
    _check_model(model)
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"lsuv needs the input batch as a torch.Tensor, got {type(batch).__name__}; "
            "pass the tensor your model is called with, e.g. lsuv(model, x) for model(x)."
        )
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model's parameters are on the meta device and have no values: materialise them first "
            "(model.to_empty(device='cpu') then initialise, or load_state_dict(state, assign=True))"
        )
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
    layers = _weight_layers(_unwrap(model))
    init_(model, "orthogonal")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout and batch-norm statistics would otherwise change what is measured
    try:
        with torch.no_grad():
            order = _forward_order(model, batch, layers)
            if not order:
                raise ValueError(
                    "none of the model's Linear/Conv layers ran on this batch, so there is nothing to calibrate."
                )
            for layer in order:
                _calibrate(model, batch, layer, tol, max_iter)
    finally:
        # modules() lists parents before children, so a child's own flag wins over its parent's train(flag).
        for m, flag in flags:
            if m.training != flag:
                m.train(flag)
    return model


def _calibrate(model: nn.Module, batch: Tensor, layer: _Layer, tol: float, max_iter: int) -> None:
    weight = layer.weight
    var = _output_variance(model, batch, layer.module)
    for _ in range(max_iter):
        if not (math.isfinite(var) and var > 0):
            raise ValueError(
                f"the output of layer {layer.name!r} has variance {var} on this batch, so no weight scale makes it 1; "
                "check the batch (constant or non-finite input?) and the layers before it."
            )
        if abs(var - 1.0) < tol:
            return
        weight.div_(math.sqrt(var))
        var = _output_variance(model, batch, layer.module)
    if not abs(var - 1.0) < tol:
        warnings.warn(
            f"lsuv: the output variance of layer {layer.name!r} is {var:.3g} after {max_iter} rescalings "
            f"(wanted 1 +- {tol}); its bias or a nonlinearity inside it may dominate.",
            stacklevel=3,
        )


def zero_init_residual_(model: M, names: Iterable[str] | None = None) -> M:
    """Make every residual block start as the identity by zeroing what scales its branch, in place; return the model.

    With ``names``: the ``weight`` and ``bias`` of each named module are set to 0. Name the last layer of each
    residual branch: its last Linear/Conv, or its last normalisation layer as in Goyal et al. 2017 ("zero-gamma").
    Without ``names``: every parameter called ``skipinit_gain`` or ``gain`` that a module registers itself (the
    scalar multiplying the branch in SkipInit, De & Smith 2020), and the ``alpha`` of every
    :class:`gradguard.remedy.architecture.Residual` (what :func:`residualize` builds), is set to 0.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a name that is not a module of ``model`` or has neither ``weight`` nor ``bias``; no ``names``
            and no SkipInit gain in the model.
    """
    _check_model(model)
    inner = _unwrap(model)
    targets: list[Tensor] = []
    if names is None:
        for module in inner.modules():
            targets += [p for n, p in module._parameters.items() if n in _SKIPINIT_NAMES and p is not None]
            if isinstance(module, Residual) and module.alpha.requires_grad:
                targets.append(module.alpha)  # gradguard's own SkipInit block (residualize)
        if not targets:
            raise ValueError(
                f"{type(inner).__name__} has no 'skipinit_gain' or 'gain' parameter and no Residual block to zero; "
                "pass names= with the last layer of each residual branch (e.g. names=['blocks.0.fc2'])."
            )
    else:
        if isinstance(names, str):
            names = [names]
        modules = dict(inner.named_modules())
        for name in names:
            if name not in modules:
                raise ValueError(f"names= holds {name!r}, which is not a module of {type(inner).__name__}.")
            own = [modules[name]._parameters.get(n) for n in ("weight", "bias")]
            own_params = [p for p in own if p is not None]
            if not own_params:
                raise ValueError(
                    f"module {name!r} ({type(modules[name]).__name__}) has no weight or bias to zero; "
                    "name the last layer of the residual branch."
                )
            targets += own_params
    with torch.no_grad():
        for p in targets:
            p.zero_()
    return model
