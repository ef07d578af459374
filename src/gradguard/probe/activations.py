"""Activation statistics on sampled steps, from forward hooks that exist only on those steps."""

from __future__ import annotations

from collections import deque

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .distributed import all_reduce_max_, distributed, gather_rows
from .layers import LayerIndex

# Activations whose derivative vanishes near the ends of a bounded range: (low, high).
SATURATING: dict[type[nn.Module], tuple[float, float]] = {
    nn.Sigmoid: (0.0, 1.0),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Tanh: (-1.0, 1.0),
    nn.Hardtanh: (-1.0, 1.0),
    nn.Softsign: (-1.0, 1.0),
}
# Activations with a zero-gradient region: a unit is inactive where its output is <= 0.
RECTIFYING: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
_ACTIVATIONS = tuple(SATURATING) + RECTIFYING + (
    nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
N_ACT = 4  # act_mean, act_std, act_saturated, act_dead


def _units(y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Whether each unit (channel) is active for any sample and position: bool [units]."""
    active = y > 0
    if y.dim() <= 1:
        return active.reshape(-1)
    dim = channel_dim % y.dim()
    return active.transpose(0, dim).reshape(y.shape[dim], -1).any(dim=1)


class ActivationProbe:
    """Attaches forward hooks for one step and turns the outputs into per-layer statistics.

    A layer's activation is the output of the activation module that runs right after it
    (``nn.ReLU``, ``nn.Sigmoid``...), else the layer's own output. Saturation is the
    fraction of elements within ``saturation_margin`` (a fraction of the range) of a
    bound of a saturating activation. A unit is dead when a rectifier leaves it inactive
    for every sample of the last ``dead_window`` sampled batches.

    Across processes (DDP, FSDP) the statistics are those of the global batch, the same on
    every rank: each rank's (count, mean, std, saturation) is gathered and pooled exactly
    (the mean weighted by element counts, the std from the pooled sum of squared deviations,
    unbiased), and a unit is active if it is active on any rank.
    """

    def __init__(
        self,
        model: nn.Module,
        index: LayerIndex,
        device: torch.device,
        saturation_margin: float = 0.01,
        dead_window: int = 4,
        persistent: bool = False,
    ) -> None:
        self.model = model
        # torch.compile does not see hooks added after compilation (dynamo skips hook guards),
        # so for a compiled model the hooks stay registered and a flag, which dynamo does
        # guard on, switches them on for sampled steps: one graph without them, one with.
        self.persistent = persistent
        self.enabled = False
        self.index = index
        self.device = device
        self.margin = saturation_margin
        self._layer_of = {id(m): i for i, m in enumerate(index.modules)}
        self._conv = [isinstance(m, _CONV) for m in index.modules]
        self._handles: list[RemovableHandle] = []
        self._current: int | None = None
        self._stats: dict[int, torch.Tensor] = {}
        self._active: dict[int, torch.Tensor] = {}
        self._on_ranks = distributed()
        self._count: dict[int, int] = {}  # elements behind each layer's statistics (across ranks only)
        self._history: list[deque[torch.Tensor]] = [deque(maxlen=max(1, dead_window)) for _ in index.modules]

    @property
    def attached(self) -> bool:
        return self.enabled

    def attach(self) -> None:
        """Measure the next forward pass: install the forward hooks (or switch them on)."""
        self._current = None
        self.enabled = True
        if self._handles:
            return
        for module in self.model.modules():
            if id(module) in self._layer_of or isinstance(module, _ACTIVATIONS):
                self._handles.append(module.register_forward_hook(self._hook))

    def detach(self, final: bool = False) -> None:
        """Stop measuring: remove the hooks (a persistent probe only switches them off)."""
        self.enabled = False
        self._current = None
        if final or not self.persistent:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def _hook(self, module: nn.Module, _inputs: object, output: object) -> None:
        if not self.enabled or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        layer = self._layer_of.get(id(module))
        if layer is not None:
            self._current = layer
            self._record(layer, output.detach(), None)
        elif self._current is not None:
            self._record(self._current, output.detach(), module)

    def _record(self, layer: int, y: torch.Tensor, act: nn.Module | None) -> None:
        y32 = y.float()
        mean = y32.mean()
        std = y32.std() if y32.numel() > 1 else torch.zeros((), device=y.device)
        nan = torch.full((), torch.nan, device=y.device)
        # A later call for this layer replaces an earlier one (last call wins).
        self._active.pop(layer, None)
        sat = nan
        bounds = SATURATING.get(type(act)) if act is not None else None
        if bounds is not None:
            lo, hi = bounds
            eps = self.margin * (hi - lo)
            sat = ((y32 <= lo + eps) | (y32 >= hi - eps)).float().mean()
        if act is not None and isinstance(act, RECTIFYING):
            self._active[layer] = _units(y, 1 if self._conv[layer] else -1)
        self._stats[layer] = torch.stack([mean, std, sat]).to(self.device, torch.float64)
        if self._on_ranks:
            self._count[layer] = y.numel()

    def collect(self) -> torch.Tensor:
        """Statistics of the hooked forward as float64 [4, L] (NaN where not measured)."""
        if self._on_ranks:
            self._pool_ranks()
        out = torch.full((N_ACT, len(self.index)), torch.nan, dtype=torch.float64, device=self.device)
        for layer, s in self._stats.items():
            out[:3, layer] = s
        for layer, active in self._active.items():
            hist = self._history[layer]
            if hist and hist[-1].shape != active.shape:
                hist.clear()
            hist.append(active)
            ever = torch.stack(list(hist)).any(dim=0)
            out[3, layer] = 1.0 - ever.to(torch.float64).mean().to(self.device)
        self._stats.clear()
        self._active.clear()
        return out

    def _pool_ranks(self) -> None:
        """Replace this rank's statistics by those of all ranks' batches together (two collectives)."""
        n_layers = len(self.index)
        mine = torch.zeros(n_layers, 4, dtype=torch.float64, device=self.device)  # count, mean, std, sat
        for layer, s in self._stats.items():
            mine[layer, 0] = float(self._count[layer])
            mine[layer, 1:] = s
        ranks = gather_rows(mine)  # [world, L, 4]
        n, mean, std, sat = ranks.unbind(-1)
        seen = n > 0
        total = n.sum(dim=0)
        w = n / total.clamp_min(1)
        pooled = (w * torch.where(seen, mean, 0.0)).sum(dim=0)
        # Chan et al.: within-rank squared deviations plus each rank's mean offset.
        mean = torch.where(seen, mean, 0.0)
        m2 = (n - 1).clamp_min(0) * torch.where(seen, std, 0.0) ** 2 + n * (mean - pooled) ** 2
        pooled_std = (m2.sum(dim=0) / (total - 1).clamp_min(1)).sqrt()
        pooled_sat = (w * torch.where(seen, sat, 0.0)).sum(dim=0)  # NaN (not saturating) stays NaN
        # A layer no rank measured stays NaN (torch.where: no read of the values, no sync).
        out = torch.where(total > 0, torch.stack([pooled, pooled_std, pooled_sat]), torch.nan)
        self._stats = dict(enumerate(out.T))
        self._count.clear()
        if self._active:
            layers = sorted(self._active)
            flat = torch.cat([self._active[layer].to(self.device, torch.uint8) for layer in layers])
            all_reduce_max_(flat)  # a unit is active if it is active on any rank
            sizes = [self._active[layer].numel() for layer in layers]
            self._active = {layer: part.bool() for layer, part in zip(layers, flat.split(sizes))}
