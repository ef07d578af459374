"""NonFiniteGuard: skip optimizer steps whose loss or gradients are not finite, and say why.

Use ``guard.step(loss)`` in place of ``optimizer.step()``::

    guard = NonFiniteGuard(optimizer, model=model)
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss)

With fp16 and a ``GradScaler``: ``scaler.scale(loss).backward(); guard.step(loss);
scaler.update()`` with ``NonFiniteGuard(optimizer, scaler=scaler)``.

The check is one fused read of every gradient. With an optimizer that accepts a device
``found_inf`` flag (``fused=True`` Adam, AdamW, SGD, Adagrad) and the ``"skip"`` policy,
nothing synchronises: the optimizer skips the update on the device, and events are read
back in batches (or when ``events``/``skipped`` is read). Other optimizers, and the
``"backoff"`` and ``"restore"`` policies, read one flag per step.

Across processes (DDP, FSDP) every rank takes the same decision: the per-parameter flags
and the loss flag are combined over all ranks (one small all-reduce per step), so a NaN
loss or gradient shard on one rank makes every rank skip; otherwise ranks would diverge.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..probe.distributed import all_reduce_max_, distributed, local
from ..probe.layers import find_layers

__all__ = ["GuardEvent", "Localization", "NonFiniteGuard", "localize"]

POLICIES = ("skip", "backoff", "restore")
_PENDING = 256  # skip-policy flags kept on the device before they are read back


@dataclass
class GuardEvent:
    """What the guard did at one step, and why."""

    step: int
    kind: str  # "step_skipped", "lr_backoff", "lr_recovered", "restored"
    layers: list[str] = field(default_factory=list)  # the first non-finite layer(s)
    loss_finite: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


class NonFiniteGuard:
    """Skips non-finite optimizer steps; see the module docstring.

    Args:
        optimizer: the optimizer to step.
        model: the model, to name layers in events (else parameters are named by position)
            and, with ``policy="restore"``, to snapshot its buffers too.
        policy: ``"skip"`` (skip the step), ``"backoff"`` (skip, and multiply the learning
            rate by ``backoff`` until ``recover_after`` clean steps in a row restore it), or
            ``"restore"`` (skip, and after ``restore_after`` bad steps in a row load the last
            good snapshot of model and optimizer, taken every ``snapshot_every`` clean steps).
        scaler: a ``torch.amp.GradScaler`` whose loss scale gradients carry (fp16).
        max_layers: how many non-finite layers an event names.
        check_params: also check, after each optimizer step, that the parameters and the
            optimizer's state are finite. A gradient can be finite and the update not (a NaN in
            Adam's ``exp_avg_sq``): such a step is undone by loading the last good snapshot of
            model and optimizer (taken every ``snapshot_every`` clean steps; 1 undoes only the
            bad step) and reported as a skipped step. Reads one flag per step.
        max_events: how many events ``events`` holds, the most recent (a run that skips many
            steps would otherwise grow it without end); ``events_total`` and ``skipped`` count all.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        policy: str = "skip",
        backoff: float = 0.5,
        recover_after: int = 100,
        restore_after: int = 3,
        snapshot_every: int = 100,
        scaler: Any = None,
        max_layers: int = 3,
        check_params: bool = False,
        max_events: int = 10_000,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {backoff!r}")
        for name, value in (("recover_after", recover_after), ("restore_after", restore_after),
                            ("snapshot_every", snapshot_every), ("max_layers", max_layers),
                            ("max_events", max_events)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self.params:
            raise ValueError("the optimizer has no parameters: there is nothing to guard")
        self.optimizer = optimizer
        self.model = model
        self.policy = policy
        self.backoff, self.recover_after = backoff, recover_after
        self.restore_after, self.snapshot_every = restore_after, snapshot_every
        self.scaler = scaler
        self.max_layers = max_layers
        self.check_params = bool(check_params)
        self.names = _param_names(self.params, model)
        self.step_count = 0
        self._events: deque[GuardEvent] = deque(maxlen=max_events)
        self._events_total = 0
        self._skipped_total = 0
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, skipped, bad per param)
        self._loss_flags: list[torch.Tensor] = []  # loss finite, per pending step
        self._bad_run = 0
        self._clean_run = 0
        self._base_lrs = [g["lr"] for g in optimizer.param_groups]
        self._snapshot: tuple[list[torch.Tensor], dict[str, Any], list[torch.Tensor]] | None = None
        self._snapshot_step = 0
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        self._on_ranks = distributed()  # combine the skip decision over the ranks
        self._sync_free = policy == "skip" and scaler is None and fused and not self.check_params
        if policy == "restore" or self.check_params:
            self._take_snapshot()

    # -- the check --------------------------------------------------------------------
    @torch.no_grad()
    def _check(
        self, loss: torch.Tensor | float | None, grad_norms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(any bad: bool 0-d, loss finite: bool 0-d, bad per parameter: bool [P]) on the device.

        ``grad_norms``: the L2 norms of the gradients present, in parameter order, when the
        caller has them already (a clip by the total norm computes the same ones): no second read.
        """
        device = self.params[0].device
        bad = torch.zeros(len(self.params), dtype=torch.bool, device=device)
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        if with_grad:
            if grad_norms is None:
                grad_norms = self._grad_norms(with_grad, device)
            elif len(grad_norms) != len(with_grad):
                raise ValueError(f"grad_norms has {len(grad_norms)} entries for {len(with_grad)} gradients")
            # A norm is non-finite exactly when an element is NaN/inf (or the sum overflows).
            bad[torch.tensor(with_grad, device=device)] = ~torch.isfinite(grad_norms.to(device))
        if loss is None:
            loss_ok = torch.ones((), dtype=torch.bool, device=device)
        else:
            loss_ok = torch.isfinite(torch.as_tensor(loss, device=device)).all()
        if self._on_ranks:
            # One rank's NaN (its loss, or the shard of a gradient it holds) is every rank's.
            flags = all_reduce_max_(torch.cat([bad, (~loss_ok).reshape(1)]).to(torch.uint8))
            bad, loss_ok = flags[:-1].bool(), flags[-1] == 0
        return bad.any() | ~loss_ok, loss_ok, bad

    def _grad_norms(self, with_grad: list[int], device: torch.device) -> torch.Tensor:
        """L2 norms of the gradients of ``self.params[i]`` for ``i`` in ``with_grad``, stacked on ``device``."""
        grads: list[torch.Tensor] = [self.params[i].grad for i in with_grad]  # type: ignore[misc]
        if self._on_ranks:
            grads = [local(g) for g in grads]  # FSDP2: this rank's shard of each gradient
        # nn.Embedding(sparse=True): the values hold every element there is (norms take dense tensors).
        grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
        norms: list[torch.Tensor] = [grads[0]] * len(grads)  # filled in parameter order below
        for idx in _by_device_indices(grads).values():  # one fused call per device
            for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx])):
                norms[i] = n.to(device)
        return torch.stack(norms)

    # -- stepping -----------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None = None, closure: Callable[[], Any] | None = None) -> None:
        """Step the optimizer unless the loss or a gradient is non-finite (then act per policy)."""
        if closure is not None:
            raise ValueError("NonFiniteGuard.step does not take a closure: call backward first, then guard.step(loss)")
        step = self.step_count
        self.step_count += 1
        if self.scaler is not None:
            self._step_with_scaler(step, loss)
            return
        any_bad, loss_ok, bad = self._check(loss)
        if self._sync_free:
            self.optimizer.found_inf = any_bad.to(torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                # None, not del: torch's optimizers read getattr(self, "found_inf", None), and a
                # del inside a torch.compile'd function fails when dynamo replays the setattr.
                self.optimizer.found_inf = None  # type: ignore[attr-defined]
            self._pending.append((step, any_bad, bad))
            self._loss_flags.append(loss_ok)
            if len(self._pending) >= _PENDING:
                self._drain()
            return
        if bool(any_bad):  # one read per step: this optimizer cannot skip on the device
            self._on_bad(step, bool(loss_ok), bad)
        else:
            self.optimizer.step()
            if not self._undone(step):
                self._on_clean()

    def _step_with_scaler(self, step: int, loss: torch.Tensor | float | None) -> None:
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        if state["stage"] is OptState.READY:
            self.scaler.unscale_(self.optimizer)  # now the gradients are the true ones
        any_bad, loss_ok, bad = self._check(loss)
        if bool(any_bad):
            # GradScaler would skip this step too; the guard says which layer overflowed, and
            # tells the scaler so it backs off its scale (it found inf in the same gradients).
            self._on_bad(step, bool(loss_ok), bad, stepped_by_scaler=True)
            # The scaler's own flag can be clean (a NaN loss, or a gradient gone bad after unscale_).
            for found_inf in state["found_inf_per_device"].values():
                found_inf.fill_(1.0)
            self.scaler.step(self.optimizer)
        else:
            self.scaler.step(self.optimizer)
            if not self._undone(step):
                self._on_clean()

    def _on_bad(self, step: int, loss_ok: bool, bad: torch.Tensor, stepped_by_scaler: bool = False) -> None:
        layers = self._layers(bad)
        self._record(GuardEvent(step, "step_skipped", layers, loss_ok, {"policy": self.policy}))
        self._bad_run += 1
        self._clean_run = 0
        if self.policy == "backoff":
            for g in self.optimizer.param_groups:
                g["lr"] *= self.backoff
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self._record(GuardEvent(step, "lr_backoff", layers, loss_ok, {"lr": lrs}))
        elif self.policy == "restore" and self._bad_run >= self.restore_after and self._snapshot is not None:
            self._restore()
            self._record(GuardEvent(step, "restored", layers, loss_ok, {"bad_steps": self._bad_run}))
            self._bad_run = 0

    def _record(self, event: GuardEvent) -> None:
        self._events.append(event)
        self._events_total += 1
        self._skipped_total += event.kind == "step_skipped"

    def _on_clean(self) -> None:
        self._bad_run = 0
        self._clean_run += 1
        if self.policy == "backoff" and self._clean_run >= self.recover_after:
            changed = False
            for g, base in zip(self.optimizer.param_groups, self._base_lrs):
                if g["lr"] < base:
                    g["lr"] = min(base, g["lr"] / self.backoff)
                    changed = True
            if changed:
                self._record(GuardEvent(self.step_count - 1, "lr_recovered", detail={
                    "lr": [g["lr"] for g in self.optimizer.param_groups]}))
            self._clean_run = 0
        if (self.policy == "restore" or self.check_params) and self._clean_run % self.snapshot_every == 0:
            self._take_snapshot()

    @torch.no_grad()
    def _undone(self, step: int) -> bool:
        """check_params: if the step left a parameter or its optimizer state non-finite, undo it."""
        if not self.check_params:
            return False
        tensors: list[torch.Tensor] = []
        owner: list[int] = []
        for i, p in enumerate(self.params):
            for t in (p, *self.optimizer.state.get(p, {}).values()):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    tensors.append(local(t) if self._on_ranks else t)  # FSDP2: this rank's shard
                    owner.append(i)
        device = self.params[0].device
        bad_tensor = torch.zeros(len(tensors), dtype=torch.int32, device=device)
        for idx in _by_device_indices(tensors).values():
            # The max-abs norm: finite for any finite tensor (an fp16 L2 norm can overflow).
            norms = torch._foreach_norm([tensors[i] for i in idx], float("inf"))
            flags = ~torch.isfinite(torch.stack([n.to(device) for n in norms]))
            bad_tensor[torch.tensor(idx, device=device)] = flags.to(torch.int32)
        bad = torch.zeros(len(self.params), dtype=torch.int32, device=device)
        bad.index_add_(0, torch.tensor(owner, device=device), bad_tensor)
        if self._on_ranks:  # every rank undoes the step, or none
            bad = all_reduce_max_(bad)
        if not bool(bad.any()):
            return False
        self._restore()
        self._record(GuardEvent(step, "step_skipped", self._layers(bad > 0), True, {
            "policy": self.policy, "after_step": True, "restored_to_step": self._snapshot_step}))
        self._bad_run += 1
        self._clean_run = 0
        return True

    # -- snapshots --------------------------------------------------------------------
    @torch.no_grad()
    def _take_snapshot(self) -> None:
        buffers = [b.detach().clone() for b in self.model.buffers()] if self.model is not None else []
        self._snapshot_step = self.step_count  # the first step the snapshot has not seen
        self._snapshot = (
            [p.detach().clone() for p in self.params],
            copy.deepcopy(self.optimizer.state_dict()),
            buffers,
        )

    @torch.no_grad()
    def _restore(self) -> None:
        assert self._snapshot is not None
        params, opt_state, buffers = self._snapshot
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(opt_state))
        if self.model is not None:
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)

    # -- reading back -----------------------------------------------------------------
    def _layers(self, bad: torch.Tensor) -> list[str]:
        idx = torch.nonzero(bad).reshape(-1)[: self.max_layers].tolist()
        seen: list[str] = []
        for i in idx:
            if self.names[i] not in seen:
                seen.append(self.names[i])
        return seen

    def _drain(self) -> None:
        """Read the pending skip flags back (one synchronisation for many steps)."""
        if not self._pending:
            return
        flags = torch.stack([s for _, s, _ in self._pending]).cpu().tolist()
        loss_ok = torch.stack(self._loss_flags).cpu().tolist()
        for (step, _, bad), skipped, ok in zip(self._pending, flags, loss_ok):
            if skipped:
                self._record(GuardEvent(step, "step_skipped", self._layers(bad), bool(ok), {"policy": "skip"}))
        self._pending.clear()
        self._loss_flags.clear()

    @property
    def events(self) -> list[GuardEvent]:
        """What the guard did, in order: the last ``max_events`` events (reading it may synchronise once)."""
        self._drain()
        return list(self._events)

    @property
    def events_total(self) -> int:
        """How many events there were, including those ``events`` no longer holds."""
        self._drain()
        return self._events_total

    @property
    def skipped(self) -> int:
        """How many steps were skipped."""
        self._drain()
        return self._skipped_total


def _by_device_indices(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return out


def _param_names(params: list[torch.Tensor], model: nn.Module | None) -> list[str]:
    """The layer (qualified module name) of each parameter, or its position without a model."""
    if model is None:
        return [f"param[{i}] {tuple(p.shape)}" for i, p in enumerate(params)]
    index = find_layers(model)
    layer_of = {id(p): index.names[layer] for p, layer in zip(index.params, index.param_layer)}
    return [layer_of.get(id(p), f"param[{i}] {tuple(p.shape)}") for i, p in enumerate(params)]


# -- localize -----------------------------------------------------------------------------


@dataclass
class Localization:
    """The first module whose output (forward) or input gradient (backward) went bad."""

    module: str | None
    phase: str | None  # "forward" or "backward"
    kind: str | None  # "nonfinite" or "exploded"
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.module is None:
            return "no module produced a non-finite or exploded value"
        return f"{self.module} produced a {self.kind} value in {self.phase} ({self.detail})"


def localize(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    *,
    explode_threshold: float = 1e6,
) -> Localization:
    """Replay a bad batch in eager mode and name the first module that went non-finite or exploded.

    ``batch`` is ``(inputs, target)`` (``loss_fn(model(inputs), target)``) or just inputs
    (``loss_fn(model(inputs))``). Forward: the first module, in execution order, whose
    output has a NaN/inf or an element above ``explode_threshold`` in magnitude while its
    inputs had none. Backward: the first module, in backward order, whose input gradient
    is bad while the gradient it received was finite. Gradients are left as computed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"localize expects an nn.Module, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model's parameters are on the meta device and have no values: materialise them first "
            "(model.to_empty(device='cpu') then initialise, or load_state_dict(state, assign=True))"
        )
    names = {id(m): n or "(root)" for n, m in model.named_modules()}
    found: dict[str, Localization] = {}
    handles = []

    def bad_kind(tensors: Sequence[Any]) -> str | None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                if not torch.isfinite(t).all():
                    return "nonfinite"
                if t.abs().max() > explode_threshold:
                    return "exploded"
        return None

    def forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if "forward" in found or list(module.children()):
            return  # leaves only: a container's output is its last child's
        outs = output if isinstance(output, (tuple, list)) else (output,)
        kind = bad_kind(outs)
        if kind is not None and bad_kind(inputs) is None:
            detail = {"module_type": type(module).__name__}
            found["forward"] = Localization(names[id(module)], "forward", kind, detail)

    def backward_hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        if "backward" in found or list(module.children()):
            return
        kind = bad_kind([g for g in grad_input if g is not None])
        if kind is not None and bad_kind([g for g in grad_output if g is not None]) is None:
            detail = {"module_type": type(module).__name__}
            found["backward"] = Localization(names[id(module)], "backward", kind, detail)

    for m in model.modules():
        handles.append(m.register_forward_hook(forward_hook))
        handles.append(m.register_full_backward_hook(backward_hook))
    try:
        inputs, target = (batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None))
        out = model(inputs)
        loss = loss_fn(out) if target is None else loss_fn(out, target)
        if "forward" in found:
            return found["forward"]
        if not torch.isfinite(loss).all():
            return Localization("(loss)", "forward", "nonfinite", {"loss": float(loss.detach().float().sum())})
        with warnings.catch_warnings():
            # The first module's inputs need no gradient; its hook still sees its output's.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        if "backward" in found:
            return found["backward"]
        for n, p in model.named_parameters():  # a parameter's own gradient can be the first bad one
            if p.grad is not None and bad_kind([p.grad]) is not None:
                layer = n.rpartition(".")[0] or "(root)"
                return Localization(layer, "backward", bad_kind([p.grad]), {"parameter": n})
        return Localization(None, None, None)
    finally:
        for h in handles:
            h.remove()
