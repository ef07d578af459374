"""watch: per-layer gradient health in any training loop, at near-zero overhead.

Two ways to use it::

    w = gradguard.watch(model)                    # 1. call w.step() yourself
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        w.step(loss=loss)                         # after backward, before optimizer.step()
        optimizer.step(); optimizer.zero_grad()
    w.close()

    with gradguard.watch(model, optimizer=opt) as w:   # 2. records on every opt.step()
        ...

Statistics stay on the device in a preallocated buffer and reach the host every
``flush_every`` steps (and at ``close()``): an ordinary step never synchronises.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sqlite3
import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .detect import Finding, Thresholds, detect
from .probe.activations import N_ACT, ActivationProbe
from .probe.distributed import local
from .probe.grads import STRATEGIES, GradProbe
from .probe.layers import find_layers
from .record import on_exit
from .record.background import SinkWriter
from .record.store import DEFAULT_KEEP, Recorder
from .trace import METRICS, Trace
from .trace_history import downsample


class Sink(Protocol):
    """Receives every flush: a Trace of the new rows and the findings first seen in them."""

    def write(self, rows: Trace, findings: Sequence[Finding]) -> None: ...


DEFAULT_HISTORY = 10_000
_G, _W, _A = 0, 3, 6  # first row of the gradient, weight/update and activation metrics
_N = len(METRICS)


def _positive_int(name: str, value: object, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        need = "a non-negative integer (0 turns it off)" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return value


def _history(value: object, least: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"history must be None (keep every row) or an integer of at least {least} rows (4 times the rows "
            f"the detectors read at a flush), got {value!r}"
        )
    return value


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _scalar_loss(loss: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}: pass the reduced loss "
            "(loss.mean() or loss.sum()) that backward() was called on"
        )
    return loss


def _key(f: Finding) -> tuple[str, str | None]:
    # Depth-wide findings name their worst layer, which can move between flushes: one per kind.
    if f.kind in ("vanishing_gradient", "exploding_gradient"):
        return (f.kind, "*" if f.layer is not None else None)
    return (f.kind, f.layer)


class Watch:
    """A running monitor; see :func:`watch`. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 1,
        weights_every: int = 10,
        activations_every: int = 50,
        flush_every: int = 50,
        store: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        scaler: Any = None,
        thresholds: Thresholds | None = None,
        strategy: str = "auto",
        seed: int | None = None,
        dead_window: int = 4,
        sinks: Sequence[Sink] = (),
        history: int | None = DEFAULT_HISTORY,
        store_keep: int | None = DEFAULT_KEEP,
    ) -> None:
        self.every = _positive_int("every", every)
        self.weights_every = _positive_int("weights_every", weights_every, allow_zero=True)
        self.activations_every = _positive_int("activations_every", activations_every, allow_zero=True)
        self.flush_every = _positive_int("flush_every", flush_every)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None and not hasattr(scaler, "_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        sinks = list(sinks)
        for sink in sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(
                    f"sinks must have a write(rows, findings) method (see gradguard.sinks), got {type(sink).__name__}"
                )
        index = find_layers(model)  # raises on a non-module or a model without parameters
        if any(p.device.type == "meta" for p in index.params) and store is not None:
            raise ValueError("the model's parameters are on the meta device: there is nothing to record")
        self.index = index
        self.layers = index.names
        self.device = index.params[0].device
        self.thresholds = thresholds or Thresholds()
        least = 4 * self._detect_rows()
        # The default grows with flush_every; a history given explicitly is checked.
        self.history = _history(max(history, least) if history == DEFAULT_HISTORY else history, least)
        self.optimizer = optimizer
        self.scaler = scaler
        self.trace = Trace(index.names, self._metadata(model, seed))
        self.findings: list[Finding] = []
        self._recorder = (
            Recorder(store, index.names, self.trace.meta, overwrite=overwrite, keep=store_keep)
            if store is not None and _rank() == 0
            else None
        )
        self.store_error: Exception | None = None  # why recording to the store stopped, if it did
        if self._recorder is not None:
            on_exit.track(self)  # commit the buffered steps at exit and on SIGTERM
        # Like the store, sinks are written by rank 0 only.
        self.sinks: list[Sink] = sinks if _rank() == 0 else []
        self._sink_writer = SinkWriter(self.sinks) if self.sinks else None
        self._grads = GradProbe(index, self.device, strategy)
        self._acts = (
            ActivationProbe(model, index, self.device, dead_window=dead_window, persistent=_is_compiled(model))
            if self.activations_every
            else None
        )
        L = len(index)
        self._ring = torch.full((self.flush_every, _N, L), math.nan, dtype=torch.float64, device=self.device)
        self._ring_loss = torch.full((self.flush_every,), math.nan, dtype=torch.float64, device=self.device)
        # numpy views of the same memory on the host: writing through them costs ~1 us, a torch op ~10 us
        self._ring_host = self._ring.numpy() if self.device.type == "cpu" else None
        self._ring_loss_host = self._ring_loss.numpy() if self.device.type == "cpu" else None
        self._ring_steps: list[int] = []
        self._ring_given: list[bool] = []
        self._calls = 0  # training steps seen (w.step() calls / optimizer steps), recorded or not
        self._awaiting_optimizer = False
        self._pending_loss: Any = None
        self._snapshot_due = False  # this step measures updates: copy the parameters before the step
        self._before: list[torch.Tensor] | None = None  # that copy, between the optimizer's pre- and post-hook
        self._snapshot_buffers: list[torch.Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self._closed = False
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_optimizer))
            self._handles.append(optimizer.register_step_post_hook(self._post_optimizer))
        self._grads.full_armed = bool(self.weights_every)  # step 0 is a full step
        if self._acts is not None:
            self._acts.attach()  # step 0 is a sampled step

    # -- metadata -------------------------------------------------------------------
    def _metadata(self, model: nn.Module, seed: int | None) -> dict[str, Any]:
        from . import __version__

        return {
            "model": type(model).__name__,
            "parameters": int(sum(self.index.numel)),
            "layers": self.index.summary(),
            "torch_version": torch.__version__,
            "gradguard_version": __version__,
            "python_version": platform.python_version(),
            "device": str(self.device),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in self.index.params}),
            "seed": seed if seed is not None else torch.initial_seed(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "every": self.every,
            "weights_every": self.weights_every,
            "activations_every": self.activations_every,
        }

    # -- the step -------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record this step: call after ``backward()`` and before ``optimizer.step()``.

        With a ``GradScaler``, call it after ``scaler.unscale_(optimizer)``. The loss is
        optional; a tensor stays on the device (no synchronisation).
        """
        self._check_open()
        if loss is not None:
            self._pending_loss = _scalar_loss(loss)
        self._record()
        self._awaiting_optimizer = self.optimizer is not None

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss of the current step when recording through the optimizer's hooks."""
        self._check_open()
        self._pending_loss = _scalar_loss(loss)

    @torch.no_grad()
    def _pre_optimizer(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._awaiting_optimizer:
            self._record()  # nobody called w.step(): record from the optimizer's hook
        if self._snapshot_due:
            self._snapshot()

    @torch.no_grad()
    def _snapshot(self) -> None:
        """Copy the parameters, so the post-step hook can measure the optimizer's update."""
        self._snapshot_due = False
        params = self._local_params()
        if self.device.type != "cpu":  # the caching allocator reuses the block: a fresh copy is free
            # fp16/bf16 parameters are copied to float32 so the update is not rounded to them.
            self._before = [p.to(_wide(p.dtype), copy=True) for p in params]
            return
        # Host memory: fresh multi-MB blocks come from the OS page by page (zero-filled faults
        # cost 5-10x the copy itself), so the buffers are allocated once and kept until close().
        if self._snapshot_buffers is None:
            self._snapshot_buffers = [torch.empty_like(p, dtype=_wide(p.dtype)) for p in params]
        torch._foreach_copy_(self._snapshot_buffers, params)
        self._before = self._snapshot_buffers

    def _local_params(self) -> list[torch.Tensor]:
        """The parameters as plain tensors (this rank's shard of an FSDP2 DTensor): foreach ops take those."""
        return [local(p) for p in self.index.params]

    @torch.no_grad()
    def _post_optimizer(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._awaiting_optimizer = False
        before, self._before = self._before, None
        if before is None or not self._ring_steps:
            return
        upd = self._grads.measure_update(before, self._local_params())  # before - after: the update's negative
        row = self._ring[len(self._ring_steps) - 1]  # the row of the step just recorded
        row[_W + 1] = upd
        row[_W + 2] = upd / row[_W]

    def _record(self) -> None:
        step = self._calls  # training steps are numbered by calls, recorded or not
        self._calls += 1
        if step % self.every == 0:
            self._record_step(step)
        # Prepare the next step: in-backward hooks only when it will be recorded, and
        # forward hooks only when it is a sampled step.
        nxt = step + 1
        recorded = nxt % self.every == 0
        self._grads.armed = recorded
        self._grads.full_armed = recorded and self._is_full(nxt)
        if self._acts is not None and recorded and nxt % self.activations_every == 0:
            self._acts.attach()

    def _is_full(self, step: int) -> bool:
        """Whether a recorded step also measures gradient max-abs, weights and the update."""
        return bool(self.weights_every) and step % self.weights_every == 0

    def _record_step(self, step: int) -> None:
        # No torch.no_grad() around an ordinary step: on the host it only reads values, and right
        # after backward entering the context costs ~25 us (cold caches). The rest takes it.
        if len(self._ring_steps) == self.flush_every:
            self.flush()
        slot = len(self._ring_steps)
        full = self._is_full(step)
        hook_scale, step_scale = self._inverse_scales()
        row: Any
        if self._ring_host is not None:  # numpy: a write costs ~1 us, a torch op ~10 us right after backward
            row = self._ring_host[slot]
            row.fill(math.nan)
            if not full and self._grads.host_ordinary:
                self._grads.host_norms(row[_G : _G + 3], hook_scale, step_scale)
            else:
                row[_G : _G + 3] = self._grads.measure(hook_scale, step_scale, full=full).numpy()
        else:
            row = self._ring[slot]
            row.fill_(math.nan)
            row[_G : _G + 3] = self._grads.measure(hook_scale, step_scale, full=full)
        # For this step only: if the optimizer step never comes (a GradScaler skipped it), the
        # snapshot must not carry over to the next one.
        self._snapshot_due = full and self.optimizer is not None
        self._before = None
        if full:
            self._ring[slot, _W] = self._grads.measure_weights()
        if self._acts is not None and self._acts.attached:
            with torch.no_grad():
                self._ring[slot, _A : _A + N_ACT] = self._acts.collect()
            self._acts.detach()
        loss, self._pending_loss = self._pending_loss, None
        given = loss is not None
        if isinstance(loss, torch.Tensor):
            if self._ring_loss_host is not None and loss.is_cpu:
                self._ring_loss_host[slot] = loss.item()  # a host value: no synchronisation, no detach
            else:
                self._ring_loss[slot].copy_(loss.detach().reshape(()), non_blocking=True)
        else:
            self._ring_loss[slot] = float(loss) if given else math.nan
        self._ring_steps.append(step)
        self._ring_given.append(given)

    def _inverse_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """AMP: (factor for gradients measured in backward, factor for those measured now)."""
        if self.scaler is None or not getattr(self.scaler, "_enabled", True) or self.scaler._scale is None:
            return None, None
        # GradScaler's scale is a power of two, so multiplying by its inverse is exact.
        inv = (1.0 / self.scaler._scale.to(self.device, torch.float64)).reshape(())
        states = self.scaler._per_optimizer_states
        if self.optimizer is not None:
            stages = [states[id(self.optimizer)]["stage"]] if id(self.optimizer) in states else []
        else:
            stages = [st["stage"] for st in states.values()]
        unscaled = any(getattr(stage, "name", "") == "UNSCALED" for stage in stages)
        # In-backward hooks always saw the scaled gradient; p.grad now is scaled unless unscale_ ran.
        return inv, (None if unscaled else inv)

    # -- flushing -------------------------------------------------------------------
    @on_exit.holds_sigterm  # a SIGTERM mid-commit takes effect after it
    def flush(self) -> None:
        """Copy buffered statistics to the host, update findings, commit to the store, queue for the sinks.

        Sinks are written on a background thread (``close()`` waits for them).
        """
        n = len(self._ring_steps)
        if n == 0:
            return
        # The one synchronisation, every flush_every steps. copy=True: on CPU, .cpu() would
        # alias the ring, which the next steps overwrite.
        if self.device.type == "meta":  # shapes only, no values: nothing was measured
            values, loss = np.full((n, _N, len(self.layers)), np.nan), np.full(n, np.nan)
        else:
            values = self._ring[:n].to("cpu", copy=True).numpy()
            loss = self._ring_loss[:n].to("cpu", copy=True).numpy()
        steps = np.array(self._ring_steps, dtype=np.int64)
        given = np.array(self._ring_given, dtype=bool)
        self._ring_steps.clear()
        self._ring_given.clear()
        self.trace.append(steps, values, loss, given)
        new = self._update_findings()
        if self.history is not None:
            downsample(self.trace, self.history, protect=[f.step for f in self.findings if f.step is not None])
        if self._recorder is not None:
            try:
                self._recorder.write(steps, values, loss, given, self.findings)
            except (sqlite3.Error, OSError) as err:  # a full disk, a lost volume: not a reason to stop training
                self._stop_recording(err, int(steps[0]))
        if self._sink_writer is not None:
            rows = Trace(self.layers, self.trace.meta)
            rows.append(steps, values, loss, given)
            self._sink_writer.submit(rows, new)

    def _detect_rows(self) -> int:
        """How many recent rows the detectors read at a flush (kept whole by ``history``)."""
        return max(self.thresholds.window, self.flush_every) + self.thresholds.growth_min_history

    def _stop_recording(self, err: Exception, step: int) -> None:
        """Warn once, close the store (it keeps every step committed so far), and go on without it."""
        assert self._recorder is not None
        path = self._recorder.path
        with contextlib.suppress(Exception):  # closing rolls back the failed transaction
            self._recorder.close()
        self._recorder = None
        self.store_error = err
        warnings.warn(
            f"gradguard: cannot write to the store {path} ({err}); recording to it stopped at step {step} "
            "(it holds every step before). Training goes on, and Watch.trace keeps recording: save it "
            "elsewhere with w.trace.save('run.npz').",
            RuntimeWarning,
            stacklevel=2,
        )

    def _update_findings(self) -> list[Finding]:
        """Merge this flush's detections into ``self.findings``; returns those seen for the first time."""
        new = detect(self.trace.tail(self._detect_rows()), self.thresholds)
        known = {_key(f): i for i, f in enumerate(self.findings)}
        first: list[Finding] = []
        for f in new:
            key = _key(f)
            if key not in known:
                known[key] = len(self.findings)
                self.findings.append(f)
                first.append(f)
            elif f.kind != "nonfinite":  # nonfinite keeps the first occurrence
                self.findings[known[key]] = f
        return first

    # -- lifecycle ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Watch is closed; create a new one with gradguard.watch(model)")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Flush, remove every hook gradguard added, and close the store. Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._grads.close()
            if self._acts is not None:
                self._acts.detach(final=True)
            if self._recorder is not None:
                self._recorder.close()
            on_exit.untrack(self)
            if self._sink_writer is not None:
                self._sink_writer.close()  # every queued flush is written first
            # Drop every reference to the model, its parameters and optimizer: the Trace
            # and findings outlive them, the model can be garbage-collected.
            self._grads = None  # type: ignore[assignment]
            self._acts = None
            self.index = None  # type: ignore[assignment]
            self.optimizer = None
            self._before = self._snapshot_buffers = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A Watch dropped without close() must not leave hooks on the model.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # never raise from a finaliser
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Watch({len(self.layers)} layers, {len(self.trace) + len(self._ring_steps)} steps recorded, {state})"


def watch(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    every: int = 1,
    weights_every: int = 10,
    activations_every: int = 50,
    flush_every: int = 50,
    store: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    scaler: Any = None,
    thresholds: Thresholds | None = None,
    strategy: str = "auto",
    seed: int | None = None,
    dead_window: int = 4,
    sinks: Sequence[Sink] = (),
    history: int | None = DEFAULT_HISTORY,
    store_keep: int | None = DEFAULT_KEEP,
) -> Watch:
    """Watch a model's per-layer gradient health; returns a :class:`Watch` (a context manager).

    Args:
        model: the ``nn.Module`` being trained (DDP/compiled wrappers are unwrapped for names).
        optimizer: if given, a step is recorded on every ``optimizer.step()`` (through its
            step hooks) unless :meth:`Watch.step` was called, and update sizes are measured.
        every: record every N-th step (1 = every step).
        weights_every: full steps: on recorded steps whose number is a multiple of N, also measure
            the gradient max-abs, weight norms and (with ``optimizer``) update norms; 0 = never.
            Other steps read each gradient once (norm and non-finite count). On the host, the
            update needs a float32 copy of the parameters, kept from the first full step to ``close()``.
        activations_every: sample activation statistics on recorded steps whose number is a
            multiple of N (forward hooks exist only on those steps); 0 = never.
        flush_every: copy statistics to the host, run the detectors and commit to the store
            every N recorded steps (the only host-device synchronisation).
        store: path of an SQLite file to record to (crash-safe, readable while running).
        overwrite: replace an existing store instead of raising ``FileExistsError``.
        scaler: the ``torch.amp.GradScaler`` in use, so statistics are of unscaled gradients.
        thresholds: detector thresholds (see :class:`gradguard.Thresholds`).
        strategy: ``"auto"`` (default), ``"fused"`` (all statistics after backward, fused ops)
            or ``"hooks"`` (every host parameter measured inside backward).
        seed: recorded in the run metadata (default: ``torch.initial_seed()``).
        dead_window: how many sampled batches a unit must stay inactive to count as dead.
        sinks: where else each flush goes (rank 0 only): objects with ``write(rows, findings)``
            and optionally ``close()``, such as ``gradguard.sinks.TensorBoard(...)``; ``rows`` is a
            :class:`Trace` of the flushed steps, ``findings`` those first seen in this flush. They are
            written on a background thread, in order, so a slow tracker does not stall training;
            ``close()`` waits for them, and a sink that raises is dropped with a warning.
        history: the most rows ``Watch.trace`` holds in host memory (default 10,000, or 4 times
            the rows the detectors read if that is more; ``None`` keeps every row). Past it the
            trace is thinned to 3/4 of it: the last quarter at full resolution; non-finite steps
            and steps named by findings, with 2 rows either side, at full resolution (earliest
            first, up to a quarter); older rows downsampled to two real rows per bucket of steps,
            the one of largest gradient norm (or a non-finite one) and the most-measured one, so a
            spike survives (see :mod:`gradguard.trace_history`). Memory: about
            ``history x 80 x layers`` bytes.
        store_keep: the most rows the store keeps, by the same policy (default 100,000; ``None``
            keeps every row); the store file stays under ``store_keep x (80 x layers + 40) x 1.5``
            bytes + 1 MiB (see :mod:`gradguard.record.store`).
    """
    return Watch(
        model, optimizer=optimizer, every=every, weights_every=weights_every,
        activations_every=activations_every, flush_every=flush_every, store=store,
        overwrite=overwrite, scaler=scaler, thresholds=thresholds, strategy=strategy, seed=seed,
        dead_window=dead_window, sinks=sinks, history=history, store_keep=store_keep,
    )
