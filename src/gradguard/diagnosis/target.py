"""Turn ``gradguard diagnose TARGET`` and its flags into a ready model, batch, loss and optimizer.

TARGET is ``path/to/file.py:callable`` or ``package.module:callable``. The callable is called with no
arguments and returns either an ``nn.Module`` (the data then comes from ``--data`` and the loss from
``--loss``) or a tuple ``(model, (inputs, targets), loss_fn)`` with an optional fourth item, the optimizer.

Security: TARGET files and modules are executed as Python code, with your permissions. Only point
``gradguard diagnose`` at code you trust.

Every mistake in TARGET or the flags raises :class:`TargetError`, whose text is one line saying what is
wrong and how to fix it; nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import itertools
import math
import os
import random
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["DATASETS", "LOSSES", "Setup", "TargetError", "load_callable", "make_batch", "make_loss", "resolve"]

DATASETS = ("digits", "diabetes", "breast_cancer", "random")
LOSSES = ("ce", "mse", "bce")
OPTIMIZERS = ("sgd", "adam")

_USAGE = "TARGET must be path/to/file.py:callable or package.module:callable"
# The default loss for each bundled data set; "random" follows --loss and otherwise regresses.
_DEFAULT_LOSS = {"digits": "ce", "diabetes": "mse", "breast_cancer": "ce", "random": "mse"}
_THIS_FILE = os.path.normcase(os.path.abspath(__file__))
_module_ids = itertools.count()


class TargetError(Exception):
    """A mistake in TARGET or the flags; ``str(err)`` is one line saying what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        # The command prints this as "Error: <message>": keep it to one line whatever the parts contained.
        super().__init__(" ".join(line.strip() for line in message.splitlines() if line.strip()))


@dataclass
class Setup:
    """Everything the diagnosis needs for its short run."""

    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer | None  # from the 4-tuple, else None
    optimizer_name: str  # "sgd" | "adam" | "given"
    lr: float | None  # from --lr, else None (the diagnosis applies its defaults)
    description: str  # e.g. "digits: 128 samples x 64 features, 10 classes; loss ce"


@dataclass
class _Target:
    """A loaded TARGET: the callable, how the user wrote it, and where its code lives."""

    fn: Callable[[], object]
    label: str  # TARGET as written, for messages
    file: str | None  # absolute path of the file or module that defines it, for locating errors
    shown_file: str  # that file as the messages show it
    directory: str | None  # put on sys.path while TARGET's code runs (file targets only)


# ---------------------------------------------------------------------------------------------------------
# Loading TARGET


def load_callable(spec: str) -> Callable[[], object]:
    """The no-argument callable that TARGET (``file.py:name`` or ``package.module:name``) names."""
    return _load(spec).fn


def _load(spec: str) -> _Target:
    """Import or execute TARGET's module and look up its callable."""
    spec = spec.strip()
    if ":" not in spec:
        raise TargetError(f"{_USAGE}, got {spec!r}")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise TargetError(f"{_USAGE}, got {spec!r}")
    file: str | None
    directory: str | None
    if where.endswith(".py"):
        module, file, directory = _exec_file(where)
        shown = where
    elif "/" in where or "\\" in where:
        raise TargetError(f"{where!r} is not a .py file: {_USAGE}")
    else:
        module = _import_module(where)
        file = _module_file(module)
        shown = file or where
        directory = None
    fn = _lookup(module, attr, where)
    return _Target(fn=fn, label=spec, file=file, shown_file=shown, directory=directory)


def _exec_file(where: str) -> tuple[types.ModuleType, str, str]:
    """Execute ``where`` as a fresh module; returns (module, its absolute path, its directory)."""
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise TargetError(f"no such file: {path} (from TARGET {where}:...)")
    # A unique name: two targets called model.py must not share a module, nor replace a real "model".
    name = f"_gradguard_target_{next(_module_ids)}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, as a normal import would be: dataclasses and pickle look modules up there.
    sys.modules[name] = module
    try:
        with _on_sys_path(str(path.parent)):
            module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise TargetError(f"executing {where} raised {_describe(exc)}{_location(exc, str(path), where)}") from exc
    return module, str(path), str(path.parent)


def _import_module(name: str) -> types.ModuleType:
    """``importlib.import_module(name)`` with its failures as TargetError."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise TargetError(
                f"cannot import {name!r}: {_first_line(exc)}; is it installed or on PYTHONPATH? "
                f"(a file is given as path/to/file.py:callable)"
            ) from exc
        raise TargetError(f"importing {name} raised {_describe(exc)}{_location(exc, None, None)}") from exc
    except (Exception, SystemExit) as exc:
        raise TargetError(f"importing {name} raised {_describe(exc)}{_location(exc, None, None)}") from exc


def _module_file(module: types.ModuleType) -> str | None:
    """The absolute path of a module's source file, if it has one."""
    file = getattr(module, "__file__", None)
    return os.path.abspath(file) if file else None


def _lookup(module: types.ModuleType, attr: str, where: str) -> Callable[[], object]:
    """``module.attr`` (dotted names reach into classes), checked to be a no-argument callable."""
    obj: object = module
    for depth, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = where if depth == 0 else f"{where}:{'.'.join(attr.split('.')[:depth])}"
            raise TargetError(f"{owner} has no attribute {part!r}; {_hint_callables(obj, module.__name__)}")
        obj = getattr(obj, part)
    label = f"{where}:{attr}"
    if isinstance(obj, nn.Module):
        raise TargetError(
            f"{label} is a model ({type(obj).__name__}), not a function that builds one: "
            f"name a function that returns it, e.g. def make(): return {attr.split('.')[-1]}"
        )
    if not callable(obj):
        raise TargetError(
            f"{label} is a {type(obj).__name__}, not callable: TARGET must name a function (or class) "
            f"that takes no arguments and returns the model"
        )
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: let the call itself tell
        signature = None
    if signature is not None:
        try:
            signature.bind()
        except TypeError:
            needed = [p.name for p in signature.parameters.values()
                      if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            raise TargetError(
                f"{label} needs arguments ({', '.join(needed)}) but is called with none: give them defaults, "
                f"or point TARGET at a small function that calls it"
            ) from None
    return obj


def _hint_callables(obj: object, module_name: str) -> str:
    """Up to ten public callables of ``obj``, preferring those it defines itself, as a hint."""
    names = vars(obj) if isinstance(obj, types.ModuleType) else {n: getattr(obj, n, None) for n in dir(obj)}
    public = {n: v for n, v in names.items() if not n.startswith("_") and callable(v)}
    own = [n for n, v in public.items() if getattr(v, "__module__", None) == module_name]
    candidates = own if own else list(public)
    if not candidates:
        return "it defines no public callables"
    more = ", ..." if len(candidates) > 10 else ""
    return f"callables there: {', '.join(candidates[:10])}{more}"


@contextlib.contextmanager
def _on_sys_path(directory: str | None) -> Iterator[None]:
    """Put ``directory`` first on sys.path (so a target's sibling imports work), and take it off again."""
    if directory is None:
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        # Remove our entry only: the target's code may have edited sys.path for its own reasons.
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _describe(exc: BaseException) -> str:
    """``ValueError: message`` (the message's first line; SyntaxError without its location)."""
    message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else _first_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _location(exc: BaseException, file: str | None, shown: str | None) -> str:
    """`` (model.py:12)``: the last traceback frame in ``file``, else the last one outside gradguard."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f" ({_shown(exc.filename, file, shown)}:{exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    mine = [f for f in frames if file is not None and _same_file(f.filename, file)]
    others = [f for f in frames if not _same_file(f.filename, _THIS_FILE)]
    chosen = mine[-1] if mine else (others[-1] if others else None)
    if chosen is None:
        return ""
    return f" ({_shown(chosen.filename, file, shown)}:{chosen.lineno})"


def _shown(filename: str, file: str | None, shown: str | None) -> str:
    """The target file as the user wrote it; any other file by its full path."""
    return shown if file is not None and shown is not None and _same_file(filename, file) else filename


def _same_file(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


# ---------------------------------------------------------------------------------------------------------
# resolve


def resolve(
    spec: str,
    *,
    data: str | None = None,
    loss: str | None = None,
    batch_size: int = 128,
    optimizer: str | None = None,
    lr: float | None = None,
    seed: int = 0,
) -> Setup:
    """Load TARGET, call it, and return a checked Setup: the model runs on the batch and the loss is a scalar."""
    # The flags first: a typo should not wait for the user's code to run.
    _check_batch_size(batch_size)
    if data is not None:
        _check_data_name(data)
    if loss is not None:
        _check_loss_name(loss)
    if optimizer is not None and optimizer.lower() not in OPTIMIZERS:
        raise TargetError(f"unknown --optimizer {optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise TargetError(f"--lr must be a positive number, got {lr}")

    target = _load(spec)
    # Seeded before the call so that the model's random initialisation is the same on every run.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        with _on_sys_path(target.directory):
            result = target.fn()
    except (Exception, SystemExit) as exc:
        raise TargetError(
            f"calling {target.label} raised {_describe(exc)}{_location(exc, target.file, target.shown_file)}"
        ) from exc

    if isinstance(result, nn.Module):
        _check_model(result, f"the model from {target.label}")
        name = data if data is not None else "digits"
        batch, loss_name, description = make_batch(name, result, loss, batch_size, seed)
        loss_fn = make_loss(loss_name)
        hint = f"--data {name} gives inputs of shape {_shape(batch[0])}"
        _check_loss(result, batch, loss_fn, f"--loss {loss_name}", hint, suggest_other_loss=True)
        chosen = optimizer.lower() if optimizer is not None else "sgd"
        return Setup(result, batch, loss_fn, None, chosen, lr, description)

    if isinstance(result, (tuple, list)) and len(result) in (3, 4):
        return _from_tuple(tuple(result), target.label, data=data, loss=loss, optimizer=optimizer, lr=lr)

    received = f"a {type(result).__name__} of {len(result)} items" if isinstance(result, (tuple, list)) else (
        f"a {type(result).__name__}")
    raise TargetError(
        f"{target.label} returned {received}; expected an nn.Module, or a tuple (model, (inputs, targets), loss_fn) "
        f"with an optional fourth item, the optimizer"
    )


def _from_tuple(
    result: tuple[object, ...], label: str, *, data: str | None, loss: str | None, optimizer: str | None,
    lr: float | None,
) -> Setup:
    """Check a ``(model, batch, loss_fn[, optimizer])`` result and build its Setup."""
    given = [flag for flag, value in (("--data", data), ("--loss", loss)) if value is not None]
    if given:
        raise TargetError(
            f"{label} returns (model, batch, loss_fn), so {' and '.join(given)} would be ignored: "
            f"drop {'them' if len(given) > 1 else 'it'}, or return just the model"
        )
    model, batch, loss_fn = result[0], result[1], result[2]
    if not isinstance(model, nn.Module):
        raise TargetError(f"the first item {label} returned is a {type(model).__name__}, not an nn.Module")
    _check_model(model, f"the model from {label}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) else (
            f"a {type(batch).__name__}")
        raise TargetError(f"the batch (second item) {label} returned must be (inputs, targets), got {got}")
    inputs, targets = batch
    for role, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TargetError(
                f"the batch's {role} from {label} is a {type(value).__name__}, not a tensor: the batch must be "
                f"two tensors (inputs, targets); wrap a model that takes several inputs so that it takes one"
            )
    if not callable(loss_fn):
        raise TargetError(f"the loss_fn (third item) {label} returned is a {type(loss_fn).__name__}, not callable")
    loss_fn = cast(Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loss_fn)

    given_optimizer: torch.optim.Optimizer | None = None
    if len(result) == 4:
        candidate = result[3]
        if not isinstance(candidate, torch.optim.Optimizer):
            raise TargetError(
                f"the fourth item {label} returned is a {type(candidate).__name__}, not a torch.optim.Optimizer"
            )
        flags = [flag for flag, value in (("--optimizer", optimizer), ("--lr", lr)) if value is not None]
        if flags:
            raise TargetError(
                f"{label} returns its own optimizer, so {' and '.join(flags)} would be ignored: "
                f"drop {'them' if len(flags) > 1 else 'it'}, or return (model, batch, loss_fn) without the optimizer"
            )
        _check_optimizer(candidate, model, label)
        given_optimizer = candidate

    checked_batch = (inputs, targets)
    hint = f"the batch from {label} has inputs of shape {_shape(inputs)}"
    _check_loss(model, checked_batch, loss_fn, f"the loss_fn from {label}", hint, suggest_other_loss=False)
    loss_name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
    description = (
        f"batch from {label}: inputs {_shape(inputs)} {_dtype(inputs)}, targets {_shape(targets)} {_dtype(targets)}; "
        f"loss {loss_name}"
    )
    if given_optimizer is not None:
        description += f"; optimizer {type(given_optimizer).__name__} (given)"
        return Setup(model, checked_batch, loss_fn, given_optimizer, "given", None, description)
    chosen = optimizer.lower() if optimizer is not None else "sgd"
    return Setup(model, checked_batch, loss_fn, None, chosen, lr, description)


def _check_model(model: nn.Module, label: str) -> None:
    """A model worth diagnosing has at least one trainable parameter."""
    params = list(model.parameters())
    if not params:
        raise TargetError(f"{label} ({type(model).__name__}) has no parameters: there are no gradients to diagnose")
    if not any(p.requires_grad for p in params):
        raise TargetError(f"{label} ({type(model).__name__}) has no trainable parameters (all requires_grad=False)")


def _check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, label: str) -> None:
    """Every parameter the optimizer updates must be one of the model's (by identity)."""
    own = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(1 for p in held if id(p) not in own)
    if foreign:
        raise TargetError(
            f"the optimizer from {label} holds {foreign} of {len(held)} parameters that are not the returned "
            f"model's: build it from model.parameters() of the model you return"
        )


def _check_loss(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[..., object],
    loss_label: str,
    hint: str,
    *,
    suggest_other_loss: bool,
) -> None:
    """Run the model once on the batch and the loss once on its output; every failure is a TargetError."""
    inputs, targets = batch
    output = _forward(model, inputs, hint)
    shapes = f"output {_shape(output)}, targets {_shape(targets)}"
    advice = f"; try {_other_losses(loss_label)}" if suggest_other_loss else ""
    try:
        with torch.no_grad():
            value = loss_fn(output, targets)
    except Exception as exc:
        raise TargetError(f"{loss_label} failed on {shapes}: {_describe(exc)}{advice}") from exc
    if not isinstance(value, torch.Tensor):
        raise TargetError(f"{loss_label} returned a {type(value).__name__}, not a tensor ({shapes})")
    if value.numel() != 1:
        raise TargetError(
            f"{loss_label} returned a tensor of shape {_shape(value)}, not a scalar ({shapes}): reduce it, e.g. .mean()"
        )


def _other_losses(loss_label: str) -> str:
    """The --loss choices other than the one that failed."""
    return " or ".join(f"--loss {name}" for name in LOSSES if not loss_label.endswith(f" {name}"))


def _forward(model: nn.Module, inputs: torch.Tensor, hint: str) -> object:
    """``model(inputs)`` without gradients, leaving buffers such as BatchNorm statistics as they were."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers() if not is_lazy(b)}
    try:
        with torch.no_grad():
            return model(inputs)
    except Exception as exc:
        raise TargetError(f"the model could not run on the batch: {_describe(exc)} ({hint})") from exc
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved and buffer.shape == saved[name].shape:
                    buffer.copy_(saved[name])


# ---------------------------------------------------------------------------------------------------------
# Data and losses


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss that ``--loss NAME`` means: ce (class logits), mse (same shapes), bce (logits, 0/1 targets)."""
    _check_loss_name(name)
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "mse":
        return _SameShapeMSELoss()
    return nn.BCEWithLogitsLoss()


class _SameShapeMSELoss(nn.MSELoss):
    """MSELoss that refuses to broadcast: output [N, 1] against targets [N] would silently compare N x N pairs."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"mse needs output and targets of one shape, got {_shape(input)} and {_shape(target)}")
        return super().forward(input, target)


def make_batch(
    data: str, model: nn.Module, loss: str | None, batch_size: int, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], str, str]:
    """``(inputs, targets)`` from ``--data`` fitted to the model's output, the loss name, and a description."""
    _check_batch_size(batch_size)
    _check_data_name(data)
    if loss is not None:
        _check_loss_name(loss)
    generator = torch.Generator().manual_seed(seed)
    if data == "random":
        return _random_batch(model, loss, batch_size, generator)

    if data.endswith(".npz"):
        x, y = _load_npz(data)
        regression = not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_)
    else:
        x, y = _load_sklearn(data)
        regression = data == "diabetes"
    loss_name = loss if loss is not None else ("mse" if regression else "ce")
    rows = torch.randperm(len(x), generator=generator)[:batch_size].numpy()
    inputs = torch.from_numpy(np.ascontiguousarray(x[rows]))
    targets = torch.from_numpy(np.ascontiguousarray(y[rows]))
    if inputs.is_floating_point() or not _has_embedding(model):
        inputs = inputs.float()  # integer inputs stay integer only for a model that looks them up (token ids)
    else:
        inputs = inputs.long()
    inputs, targets = _to_model(model, inputs), _to_model(model, targets, cast=False)

    hint = f"--data {data} gives inputs of shape {_shape(inputs)} {_dtype(inputs)}"
    output = _forward(model, inputs, hint)
    targets = _fit_targets(targets, output, loss_name, data, regression)

    features = "x".join(str(d) for d in inputs.shape[1:]) or "1"
    kind = "regression" if regression else f"{len(np.unique(y))} classes"
    description = f"{data}: {len(inputs)} samples x {features} features, {kind}; loss {loss_name}"
    return (inputs, targets), loss_name, description


def _random_batch(
    model: nn.Module, loss: str | None, batch_size: int, generator: torch.Generator
) -> tuple[tuple[torch.Tensor, torch.Tensor], str, str]:
    """N(0, 1) inputs sized from the model's first nn.Linear, targets shaped from its output."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None or first.in_features < 1:
        why = "has no nn.Linear" if first is None else "starts with a lazy nn.Linear of unknown size"
        raise TargetError(
            f"--data random sizes its inputs from the model's first nn.Linear, but this model ({type(model).__name__}) "
            f"{why}: return (model, (inputs, targets), loss_fn) from TARGET instead"
        )
    loss_name = loss if loss is not None else _DEFAULT_LOSS["random"]
    inputs = _to_model(model, torch.randn(batch_size, first.in_features, generator=generator))
    hint = f"--data random gives inputs of shape {_shape(inputs)}, sized from the model's first nn.Linear"
    output = _forward(model, inputs, hint)
    if not isinstance(output, torch.Tensor):
        raise TargetError(_not_a_tensor(output, loss_name))
    if loss_name == "ce":
        if output.dim() < 2 or output.shape[1] < 2:
            raise TargetError(
                f"--loss ce needs class logits shaped [N, classes] with 2 or more classes, but the model's output "
                f"is {_shape(output)}: use --loss mse, or --loss bce for one logit per sample"
            )
        classes = output.shape[1]
        shape = (output.shape[0], *output.shape[2:])
        targets = torch.randint(0, classes, shape, generator=generator)
        kind = f"{classes} classes (from the model's output)"
    elif loss_name == "mse":
        targets = torch.randn(output.shape, generator=generator)
        kind = f"targets ~ N(0,1) shaped {_shape(output)}"
    else:
        targets = torch.randint(0, 2, output.shape, generator=generator).float()
        kind = f"targets 0/1 shaped {_shape(output)}"
    targets = _to_model(model, targets, cast=loss_name != "ce")
    description = f"random: {batch_size} samples x {first.in_features} features ~ N(0,1), {kind}; loss {loss_name}"
    return (inputs, targets), loss_name, description


def _fit_targets(targets: torch.Tensor, output: object, loss: str, data: str, regression: bool) -> torch.Tensor:
    """Targets in the dtype and shape that ``loss`` needs against this output, or a TargetError saying why not."""
    if not isinstance(output, torch.Tensor):
        raise TargetError(_not_a_tensor(output, loss))
    shapes = f"output {_shape(output)}, targets {_shape(targets)}"
    if loss == "ce":
        # diabetes' targets happen to be whole numbers, but they are measurements, not classes.
        if regression and (data in DATASETS or not bool((targets == targets.round()).all())):
            raise TargetError(
                f"--loss ce needs integer class labels, but --data {data} has real-valued targets ({shapes}): "
                f"use --loss mse"
            )
        targets = targets.long()
        if output.dim() < 2 or output.shape[1] < 2:
            # One column would make cross-entropy 0 whatever the weights: nothing to learn or diagnose.
            raise TargetError(
                f"--loss ce needs class logits shaped [N, classes] with 2 or more classes ({shapes}): "
                f"use --loss mse, or --loss bce for one logit per sample"
            )
        classes, low, high = output.shape[1], int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise TargetError(
                f"--loss ce: --data {data} has class labels {low}..{high} but the model's output has {classes} "
                f"class column(s) ({shapes}): give the last layer {high + 1} outputs, or use --loss mse"
            )
        return targets

    targets = targets.to(output.dtype if output.is_floating_point() else torch.float32)
    if loss == "bce":
        smallest, largest = float(targets.min()), float(targets.max())
        if smallest < 0 or largest > 1:
            raise TargetError(
                f"--loss bce needs targets in [0, 1], but --data {data} has {smallest:g}..{largest:g} ({shapes}): "
                f"use --loss ce for class labels"
            )
    # One output per sample against one target per sample: [N, 1] and [N] mean the same thing.
    if output.dim() == targets.dim() + 1 and output.shape[-1] == 1 and output.shape[:-1] == targets.shape:
        targets = targets.unsqueeze(-1)
    if output.shape != targets.shape:
        fix = "use --loss ce for class labels" if not regression else "give the model one output per target"
        raise TargetError(f"--loss {loss} needs the output shaped like the targets ({shapes}): {fix}")
    return targets


def _not_a_tensor(output: object, loss: str) -> str:
    return (
        f"the model returns a {type(output).__name__}, not a tensor, so --loss {loss} cannot use it: "
        f"return (model, (inputs, targets), loss_fn) from TARGET with a loss_fn that takes what the model returns"
    )


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays x/y (or inputs/targets) from an .npz file, with the same number of rows."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TargetError(f"no such file: {file.resolve()} (from --data {path})")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise TargetError(f"cannot read --data {path} as an .npz file: {_describe(exc)}") from exc
    x_key = next((k for k in ("x", "inputs") if k in arrays), None)
    y_key = next((k for k in ("y", "targets") if k in arrays), None)
    if x_key is None or y_key is None:
        found = ", ".join(sorted(arrays)) or "none"
        raise TargetError(f"--data {path} needs arrays x and y (or inputs and targets); it has: {found}")
    x, y = arrays[x_key], arrays[y_key]
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise TargetError(
            f"--data {path}: {x_key} {list(x.shape)} and {y_key} {list(y.shape)} must have the same number of rows"
        )
    if len(x) == 0:
        raise TargetError(f"--data {path} has no rows")
    for key, array in ((x_key, x), (y_key, y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TargetError(f"--data {path}: array {key} has dtype {array.dtype}; it must be numeric")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float32)
    return x, y


@functools.cache
def _load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A data set bundled with scikit-learn, as shipped (not standardised): float32 inputs, its targets."""
    try:
        from sklearn import datasets
    except ImportError:
        raise TargetError(f"--data {name} needs scikit-learn: pip install 'gradguard[demo]'") from None
    loaders = {
        "digits": datasets.load_digits,
        "diabetes": datasets.load_diabetes,
        "breast_cancer": datasets.load_breast_cancer,
    }
    bunch = loaders[name]()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.float32 if name == "diabetes" else np.int64)
    return x, y


def _has_embedding(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())


def _to_model(model: nn.Module, tensor: torch.Tensor, cast: bool = True) -> torch.Tensor:
    """``tensor`` on the model's device, and (if ``cast`` and both are floating) in the model's dtype."""
    param = next(model.parameters(), None)
    if param is None:
        return tensor
    dtype = param.dtype if cast and tensor.is_floating_point() and param.is_floating_point() else None
    return tensor.to(device=param.device, dtype=dtype)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TargetError(f"--batch must be a positive whole number, got {batch_size}")


def _check_data_name(data: str) -> None:
    if data in DATASETS:
        return
    if data.endswith(".npz"):
        if not Path(data).expanduser().is_file():
            raise TargetError(f"no such file: {Path(data).expanduser().resolve()} (from --data {data})")
        return
    raise TargetError(f"unknown --data {data!r}: choose {', '.join(DATASETS)}, or a path to an .npz file")


def _check_loss_name(loss: str) -> None:
    if loss not in LOSSES:
        raise TargetError(f"unknown --loss {loss!r}: choose {', '.join(LOSSES)}")


def _shape(tensor: object) -> str:
    """``[128, 64]`` for a tensor; the type name for anything else."""
    if isinstance(tensor, torch.Tensor):
        return "[" + ", ".join(str(d) for d in tensor.shape) + "]"
    return type(tensor).__name__


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
