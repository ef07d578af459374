"""Hugging Face Transformers: watch, clip and guard gradients in a ``Trainer``.

    from gradguard.integrations.transformers import GradguardCallback

    trainer = Trainer(model=model, args=args, train_dataset=data)
    cb = GradguardCallback(store="run.db", guard=True).attach(trainer)
    trainer.train()
    cb.trace, cb.findings            # also in run.db, and gradguard/* in the Trainer's logs

Where it acts, and why ``attach``. For each optimizer step the Trainer runs
``training_step`` on every accumulated micro-batch (each loss divided by the number of
micro-batches), then clips with ``accelerator.clip_grad_norm_`` (with ``max_grad_norm``,
or with ``inf`` only to measure the norm when it is 0), then calls ``on_pre_optimizer_step``,
``optimizer.step()`` and ``on_optimizer_step``. A callback alone therefore sees gradients
only after clipping, and never sees the loss: the Trainer's logs average it over the
logging window and, with ``logging_nan_inf_filter`` (the default), replace a NaN or inf
loss by the running mean. So ``attach(trainer)`` wraps two overridable points of that one
``Trainer`` object (nothing global, no subclass needed):

1. ``trainer.training_step``: each micro-batch's returned loss is added into a device
   tensor (no synchronisation). Their sum is the step's loss as the Trainer defines it
   (the mean over its micro-batches), NaN included.
2. ``trainer.accelerator.clip_grad_norm_``: the Trainer calls it once per optimizer step,
   after the last micro-batch's backward. There gradguard records the step (one Trace row
   of the accumulated gradients, before any clipping; under fp16 AMP they are measured
   unscaled), then clips: the Trainer's way, or with ``clip=`` gradguard's clipper in its
   place (the Trainer's ``max_grad_norm`` is then not applied). The pre-clip total norm is
   returned, so the Trainer's ``grad_norm`` log is unchanged. If a Trainer does not call it
   in a step (older versions with ``max_grad_norm=0``, where nothing clips), the step is
   recorded in ``on_pre_optimizer_step`` instead, still before any clipping.

The alternatives were worse: asking for ``max_grad_norm=0`` and clipping in
``on_pre_optimizer_step`` leaves the loss unseen and records after clipping whenever a user
forgets the setting; a ``Trainer`` subclass makes users change their class and would
override the private ``_clip_grad_norm``.

With ``guard=``, the torch optimizer's ``step`` goes through a :class:`gradguard.NonFiniteGuard`
for the length of ``train()``: a step whose loss or gradients are not finite is skipped
(with the Trainer's default fused AdamW, on the device, without synchronising). The
learning-rate schedule still advances. Under fp16 AMP the ``GradScaler`` already skips such
steps and the guard stays off. The guard checks the gradients after clipping: the
Trainer's clipping spreads one NaN to every gradient, so its events may name every layer;
the Trace, taken before clipping, counts the non-finite values of each layer as they were.

The callback puts itself first among the Trainer's callbacks, so the values it adds to
the logs in ``on_log`` reach every ``report_to`` integration; they are also added to
``trainer.state.log_history``. At each logging step it flushes the Watch (the Trainer has
just synchronised to log its loss) and adds: ``gradguard/loss`` (the mean real loss since
the last log: NaN if a step's loss was NaN), ``gradguard/nonfinite_loss_steps``,
``gradguard/grad_norm`` (the last step's pre-clip total norm), ``gradguard/findings``,
``gradguard/skipped_steps`` (with a guard) and, per layer, ``gradguard/<metric>/<layer>``
for each of ``log_metrics`` (their last measured values). New findings and guard events
are raised as warnings. The Trace and the store hold every optimizer step; Trace step
``k`` is optimizer step ``k`` (from 0) of this ``train()`` call, i.e. ``global_step - 1``
in a run that did not resume. DeepSpeed, which clips inside its engine, is not supported.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradguard.integrations.transformers needs Hugging Face Transformers: pip install 'gradguard[transformers]'"
    ) from exc

from ..detect import Finding, Thresholds
from ..remedy.guard import NonFiniteGuard
from ..trace import METRICS, Trace
from ..watch import Sink, Watch
from ._options import Clip, apply_clip, check_clip, guard_policy, watch_options

__all__ = ["GradguardCallback"]


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` wrapper(s)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


class GradguardCallback(TrainerCallback):  # type: ignore[misc]
    """Records per-layer gradient health once per optimizer step of a ``Trainer``; optionally clips and guards.

    Call :meth:`attach` with the ``Trainer`` before ``train()`` (see the module docstring).

    Args:
        store: path of the SQLite file to record to (rank 0 writes it); ``None`` = in memory only.
        overwrite: replace an existing store instead of raising ``FileExistsError``.
        every, weights_every, activations_every, flush_every, thresholds, strategy, sinks:
            as in :func:`gradguard.watch`; steps are optimizer steps, not micro-batches.
        clip: ``None`` (the Trainer clips with ``max_grad_norm``); a float ``max_norm`` for
            :func:`gradguard.clip_grad_norm_`; an :class:`gradguard.AutoClip` or
            :class:`gradguard.ZScoreClip`; or a callable taking the list of parameters and
            returning the total norm (or a ``ClipResult``). Replaces the Trainer's clipping.
        guard: ``True`` (skip non-finite steps) or a :class:`gradguard.NonFiniteGuard` policy
            (``"skip"``, ``"backoff"``, ``"restore"``).
        log_metrics: the per-layer metrics (names from ``gradguard.METRICS``) added to the
            Trainer's logs at each logging step; ``()`` logs only the totals.
        prefix: the prefix of the names added to the logs.

    During or after ``train()``, ``cb.watch`` is the :class:`gradguard.Watch`, ``cb.trace`` its
    Trace, ``cb.findings`` the findings and ``cb.guard`` the :class:`gradguard.NonFiniteGuard`.
    """

    def __init__(
        self,
        *,
        store: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        every: int = 1,
        weights_every: int = 10,
        activations_every: int = 50,
        flush_every: int = 50,
        thresholds: Thresholds | None = None,
        strategy: str = "auto",
        sinks: Sequence[Sink] = (),
        clip: Clip | None = None,
        guard: bool | str = False,
        log_metrics: Sequence[str] = ("grad_norm",),
        prefix: str = "gradguard/",
    ) -> None:
        check_clip(clip)
        if isinstance(log_metrics, str) or any(m not in METRICS for m in log_metrics):
            raise ValueError(f"log_metrics must be a list of names from {METRICS}, got {log_metrics!r}")
        self.options = watch_options(
            every=every, weights_every=weights_every, activations_every=activations_every,
            flush_every=flush_every, store=store, overwrite=overwrite, thresholds=thresholds,
            strategy=strategy, sinks=sinks,
        )
        self.clip = clip
        self.policy = guard_policy(guard)
        self.log_metrics = tuple(log_metrics)
        self.prefix = prefix
        self.trainer: Any = None
        self.watch: Watch | None = None
        self.guard: NonFiniteGuard | None = None
        self._loss: torch.Tensor | None = None  # this optimizer step's loss so far, on the device
        self._step_loss: torch.Tensor | None = None  # the loss of the step just recorded, for the guard
        self._recorded = False  # this optimizer step is recorded already
        self._calls_since_log = 0
        self._last_logged = -1  # the last Trace step whose values went to the logs
        self._warned_findings = 0
        self._warned_events = 0
        self._warned_late = False
        self._rank0 = True
        self._optimizer_patch: tuple[Any, bool, Any] | None = None

    # -- what a user reads -------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """The :class:`gradguard.Trace` recorded so far (complete once ``train()`` has ended)."""
        if self.watch is None:
            raise RuntimeError("nothing is recorded yet: the Trace exists once trainer.train() has started")
        return self.watch.trace

    @property
    def findings(self) -> list[Finding]:
        """The findings so far (complete once ``train()`` has ended)."""
        return [] if self.watch is None else list(self.watch.findings)

    # -- set-up -------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> GradguardCallback:
        """Install this callback in ``trainer`` (first in its list) and its two wrappers; returns ``self``."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"attach expects a transformers.Trainer, got {type(trainer).__name__}")
        if self.trainer is trainer:
            return self
        if self.trainer is not None:
            raise RuntimeError("this GradguardCallback is attached to another Trainer already: create one per Trainer")
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        # First: report_to integrations run on_log after it, so they see what it adds to the logs.
        callbacks.insert(0, self)

        training_step = trainer.training_step
        accelerator = trainer.accelerator

        def training_step_and_loss(*args: Any, **kwargs: Any) -> Any:
            watch = self.watch
            if watch is None or watch.closed:
                return training_step(*args, **kwargs)
            probe = watch._grads
            armed = probe.armed
            # Only the last micro-batch's backward leaves the gradient that is recorded: the
            # in-backward statistics of the others would be thrown away, so they are not taken.
            probe.armed = armed and accelerator.sync_gradients
            try:
                loss = training_step(*args, **kwargs)
            finally:
                probe.armed = armed
            if isinstance(loss, torch.Tensor):
                loss = loss.detach()
                self._loss = loss if self._loss is None else self._loss + loss
            return loss

        clip_grad_norm = accelerator.clip_grad_norm_

        def record_and_clip(parameters: Any, max_norm: float, norm_type: float = 2, **kwargs: Any) -> Any:
            if self.watch is None or self.watch.closed:
                return clip_grad_norm(parameters, max_norm, norm_type, **kwargs)
            params = list(parameters)
            self._record()
            if self.clip is None:
                return clip_grad_norm(params, max_norm, norm_type, **kwargs)
            accelerator.unscale_gradients()  # what the Trainer's clip would do first (fp16 AMP)
            return apply_clip(self.clip, params)

        trainer.training_step = training_step_and_loss  # type: ignore[method-assign]
        accelerator.clip_grad_norm_ = record_and_clip  # type: ignore[method-assign]
        self.trainer = trainer
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(
                "GradguardCallback is not attached: call cb.attach(trainer) before trainer.train(). Passed only in "
                "callbacks=, it would see gradients after clipping and no per-step loss"
            )
        accelerator = trainer.accelerator
        if "DEEPSPEED" in str(accelerator.distributed_type):
            raise ValueError("GradguardCallback does not support DeepSpeed, which clips inside its own engine")
        self._finish()  # a previous train() on this Trainer
        self._rank0 = bool(state.is_world_process_zero)
        if self.clip is not None and args.max_grad_norm and args.max_grad_norm > 0 and self._rank0:
            warnings.warn(
                f"gradguard: GradguardCallback(clip=...) replaces the Trainer's clipping; max_grad_norm="
                f"{args.max_grad_norm} is not applied (set max_grad_norm=0 to silence this warning)",
                stacklevel=2,
            )
        optimizer = _inner(trainer.optimizer)
        scaler = accelerator.scaler if getattr(accelerator.scaler, "_enabled", False) else None
        self.watch = Watch(trainer.model, optimizer=optimizer, scaler=scaler, seed=args.seed, **self.options)
        self._loss = self._step_loss = None
        self._recorded = False
        self._calls_since_log = self._warned_findings = self._warned_events = 0
        self._last_logged = -1
        self.guard = None
        if self.policy is not None and scaler is None:
            self.guard = NonFiniteGuard(optimizer, model=trainer.model, policy=self.policy)
            self._patch_optimizer_step(optimizer, self.guard)

    def _patch_optimizer_step(self, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard) -> None:
        """Send the torch optimizer's ``step()`` through the guard (until ``train()`` ends)."""
        step = optimizer.step
        own = vars(optimizer)
        self._optimizer_patch = (optimizer, "step" in own, own.get("step"))
        inside = False

        @functools.wraps(step)
        def guarded_step(closure: Any = None) -> Any:
            nonlocal inside
            if inside or closure is not None:  # the guard's own call to the optimizer
                return step() if closure is None else step(closure)
            inside = True
            try:
                # With fused AdamW (the Trainer's default) the guard skips on a device flag.
                guard.step(self._step_loss)
            finally:
                inside = False
            return None

        optimizer.step = guarded_step  # type: ignore[method-assign]

    # -- the step -----------------------------------------------------------------------
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recorded = False

    def _record(self) -> None:
        """Record this optimizer step (once), with its loss; warn about findings a flush brought."""
        watch = self.watch
        if self._recorded or watch is None or watch.closed:
            return
        self._recorded = True
        loss, self._loss = self._loss, None
        self._step_loss = loss
        watch.step(loss=loss)
        self._calls_since_log += 1
        if len(watch.findings) > self._warned_findings:
            self._warn_new()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._recorded or self.watch is None or self.watch.closed:
            return
        # The Trainer did not call accelerator.clip_grad_norm_ in this step.
        clipped = bool(args.max_grad_norm and args.max_grad_norm > 0)
        if clipped and self.clip is None and not self._warned_late and self._rank0:
            self._warned_late = True
            warnings.warn(
                "gradguard: this Trainer clipped without accelerator.clip_grad_norm_; gradients are recorded after "
                "its clipping. Use GradguardCallback(clip=...) with max_grad_norm=0 to record them before",
                stacklevel=2,
            )
        self._record()
        if self.clip is not None:
            if not clipped:
                self.trainer.accelerator.unscale_gradients()
            apply_clip(self.clip, [p for p in self.trainer.model.parameters() if p.requires_grad])

    # -- logging ------------------------------------------------------------------------
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        watch = self.watch
        if watch is None or watch.closed or logs is None or "loss" not in logs:
            return  # evaluation logs and the end-of-training summary carry no training step
        # The Trainer has just read its loss back from the device: the flush adds no stall of its own.
        watch.flush()
        values = self._values(watch.trace.tail(self._calls_since_log))
        self._calls_since_log = 0
        values.update(self._report())
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)

    def _values(self, rows: Trace) -> dict[str, float]:
        """What the logs get from the steps recorded since the last log."""
        out: dict[str, float] = {}
        new = rows.steps > self._last_logged
        if not new.any():
            return out
        p = self.prefix
        self._last_logged = int(rows.steps[-1])
        loss = rows.loss[new & rows.loss_given]
        if len(loss):
            out[f"{p}loss"] = float(np.mean(loss))  # NaN when a step's loss was: the point of logging it
            out[f"{p}nonfinite_loss_steps"] = float(np.sum(~np.isfinite(loss)))
        grad = rows.metric("grad_norm")[new]
        if not np.isnan(grad[-1]).all():
            out[f"{p}grad_norm"] = math.sqrt(float(np.nansum(grad[-1] ** 2)))
        for name in self.log_metrics:
            table = rows.metric(name)[new]
            measured = np.flatnonzero(~np.isnan(table).all(axis=1))
            if len(measured):
                last = table[measured[-1]]
                out.update({f"{p}{name}/{layer}": float(v) for layer, v in zip(rows.layers, last) if not np.isnan(v)})
        return out

    def _report(self) -> dict[str, float]:
        """Warn about new findings and guard events; their counts for the logs."""
        assert self.watch is not None
        self._warn_new()
        counts = {f"{self.prefix}findings": float(len(self.watch.findings))}
        if self.guard is not None:
            events = self.guard.events  # reads pending skip flags back (one synchronisation)
            if self._rank0:
                # events holds only the last max_events: the new ones are its tail
                new = min(self.guard.events_total - self._warned_events, len(events))
                for e in events[len(events) - new :]:
                    where = f" (non-finite in {', '.join(e.layers)})" if e.layers else ""
                    loss = "" if e.loss_finite else " (non-finite loss)"
                    warnings.warn(f"gradguard: optimizer step {e.step}: {e.kind}{where}{loss}", stacklevel=2)
            self._warned_events = self.guard.events_total
            counts[f"{self.prefix}skipped_steps"] = float(self.guard.skipped)
        return counts

    def _warn_new(self) -> None:
        assert self.watch is not None
        findings = self.watch.findings
        if self._rank0:
            for f in findings[self._warned_findings :]:
                warnings.warn(f"gradguard: {f}", stacklevel=3)
        self._warned_findings = len(findings)

    # -- the end ------------------------------------------------------------------------
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._optimizer_patch is not None:
            optimizer, had_own, own = self._optimizer_patch
            if had_own:
                optimizer.step = own
            else:
                del optimizer.step  # back to the class's method
            self._optimizer_patch = None
        if self.watch is None or self.watch.closed:
            return
        self.watch.close()  # the last flush: the findings are complete now
        self._report()
