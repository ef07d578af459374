"""Which modules are layers, and which unique parameters each one owns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ROOT_NAME = "(root)"


@dataclass
class LayerIndex:
    """The layers of a model: modules that own parameters directly, in registration order.

    Tied (shared) parameters are counted once, in the first layer that registers them.
    """

    names: list[str]
    types: list[str]
    modules: list[nn.Module]
    params: list[nn.Parameter]
    param_names: list[str]
    param_layer: list[int]
    numel: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def summary(self) -> list[dict[str, object]]:
        """One JSON-friendly dict per layer: name, module type, parameter count."""
        return [
            {"name": n, "type": t, "numel": k}
            for n, t, k in zip(self.names, self.types, self.numel)
        ]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel / torch.compile wrappers keep the real model in .module / ._orig_mod;
    # layer names should be those of the user's model, without a wrapper prefix.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


# Wrapper modules that FSDP1 and activation checkpointing insert between a module and its
# children: their attribute names are not part of the user's layer names.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def find_layers(model: nn.Module) -> LayerIndex:
    """Index the layers of ``model``; raises ``ValueError`` when it has no parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gradguard expects a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model itself (e.g. watch(model)), not its parameters or output."
        )
    model = _unwrap(model)
    seen: set[int] = set()
    names: list[str] = []
    types: list[str] = []
    modules: list[nn.Module] = []
    params: list[nn.Parameter] = []
    param_names: list[str] = []
    param_layer: list[int] = []
    numel: list[int] = []
    for raw_name, module in model.named_modules(remove_duplicate=True):
        mod_name = _clean(raw_name)
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        own = [(n, p) for n, p in own if id(p) not in seen]
        if not own:
            continue
        layer = len(names)
        names.append(mod_name or ROOT_NAME)
        types.append(type(module).__name__)
        modules.append(module)
        count = 0
        for pname, p in own:
            seen.add(id(p))
            params.append(p)
            param_names.append(f"{mod_name}.{pname}" if mod_name else pname)
            param_layer.append(layer)
            count += p.numel()
        numel.append(count)
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no parameters, so there is no gradient to watch. "
            "Pass the model you train (the one whose parameters the optimizer updates)."
        )
    for p, pname in zip(params, param_names):
        if p.is_complex():
            raise TypeError(
                f"parameter {pname!r} is complex ({p.dtype}); gradguard measures real "
                "floating-point parameters only. Represent it as a real tensor with "
                "torch.view_as_real, or leave this module out of the watched model."
            )
        if not p.is_floating_point():
            raise TypeError(f"parameter {pname!r} has dtype {p.dtype}, which has no gradient.")
    return LayerIndex(names, types, modules, params, param_names, param_layer, numel)


def devices_of(index: LayerIndex) -> list[torch.device]:
    """The distinct devices of the indexed parameters, in first-seen order."""
    out: list[torch.device] = []
    for p in index.params:
        if p.device not in out:
            out.append(p.device)
    return out
