"""PyTorch Lightning: watch, clip and guard gradients from a ``Callback``.

    from gradguard.integrations.lightning import GradguardCallback

    cb = GradguardCallback(store="run.db", clip=1.0, guard=True)
    trainer = L.Trainer(callbacks=[cb])          # no gradient_clip_val: the callback clips
    trainer.fit(model, data)
    cb.trace, cb.findings                         # also in run.db and trainer.callback_metrics

Where it acts. For each optimizer step Lightning runs the closure (forward and backward of
every accumulated batch; each loss divided by ``accumulate_grad_batches``), then, with fp16
AMP, ``scaler.unscale_``, then ``on_before_optimizer_step`` (callbacks first, then the
LightningModule's hook), then its own clipping (``gradient_clip_val``), then the optimizer
step (which a ``GradScaler`` skips on inf). In ``on_before_optimizer_step`` this callback:

1. records one Trace row of the accumulated, unscaled, not yet clipped gradients, with the
   step's loss: the sum of the accumulated batches' divided losses, i.e. their mean, the
   loss whose gradient is the one recorded;
2. with ``guard``, checks loss and gradients as :class:`gradguard.NonFiniteGuard` does and
   skips a bad step by setting every gradient to ``None``: PyTorch's optimizers leave a
   parameter without a gradient untouched (no update, no momentum or Adam state change);
3. with ``clip``, clips as gradguard's clippers do and logs the pre-clip total norm as
   ``gradguard/grad_norm`` (Lightning's own clipping discards that number) on the steps the
   Trainer writes its logs (every ``log_every_n_steps``, as Lightning's LearningRateMonitor
   does: a ``log`` call costs ~0.5 ms); every step's per-layer norms are in the Trace.

Findings are raised as rank-zero warnings when first seen (at each flush) and counted in
``gradguard/findings`` (and ``gradguard/skipped_steps`` with a guard) in
``trainer.callback_metrics`` and the logger. Under DDP every rank measures the same
all-reduced gradients and only rank 0 writes the store and sinks.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from ..detect import Finding, Thresholds
from ..probe.distributed import distributed, gather_rows
from ..remedy.guard import _PENDING, NonFiniteGuard
from ..watch import _G, _W, Sink, Watch
from ._options import Clip, Norms, apply_clip, check_clip, guard_policy, shared_norms, watch_options

__all__ = ["GradguardCallback"]


def _import_lightning() -> ModuleType:
    # Prefer the unified package; take the standalone one when only it is installed, or when
    # the program already imported it (a callback must come from its Trainer's package).
    names = ["lightning.pytorch", "pytorch_lightning"]
    if "pytorch_lightning" in sys.modules and "lightning" not in sys.modules:
        names.reverse()
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        "gradguard.integrations.lightning needs PyTorch Lightning: pip install 'gradguard[lightning]'"
    )


pl = _import_lightning()
_Callback: Any = pl.Callback
_rank_zero_warn = pl.utilities.rank_zero_warn

def _logs_this_step(trainer: Any) -> bool:
    """Whether the Trainer sends this step's logged values to its loggers (every ``log_every_n_steps``).

    ``pl_module.log`` costs ~0.5 ms a call, 2-3% of a short step: a value logged every step
    is only worth that on the steps that are written. Lightning's own LearningRateMonitor
    asks the same question.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(trainer.fast_dev_run) or bool(connector.should_update_logs)


def _has_fsdp1(model: Any) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, torch.nn.Module) and any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


class GradguardCallback(_Callback):
    """Records per-layer gradient health once per optimizer step, and optionally clips and guards.

    Args:
        store: path of the SQLite file to record to (rank 0 writes it); ``None`` = in memory only.
        overwrite: replace an existing store instead of raising ``FileExistsError``.
        every, weights_every, activations_every, flush_every, thresholds, strategy, sinks:
            as in :func:`gradguard.watch`; steps are optimizer steps, not batches.
        clip: ``None``; a float ``max_norm`` for :func:`gradguard.clip_grad_norm_`; an
            :class:`gradguard.AutoClip` or :class:`gradguard.ZScoreClip`; or a callable taking the
            list of the optimizer's parameters and returning the total norm (or a ``ClipResult``).
            Replaces Lightning's clipping: leave the Trainer's ``gradient_clip_val`` unset.
        guard: ``True`` (skip non-finite steps) or a :class:`gradguard.NonFiniteGuard` policy
            (``"skip"``, ``"backoff"``, ``"restore"``).
        prefix: the prefix of the names logged with ``pl_module.log``.

    After ``fit`` (or during it), ``cb.watch`` is the :class:`gradguard.Watch`, ``cb.trace`` its
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
        prefix: str = "gradguard/",
    ) -> None:
        super().__init__()
        check_clip(clip)
        self.options = watch_options(
            every=every, weights_every=weights_every, activations_every=activations_every,
            flush_every=flush_every, store=store, overwrite=overwrite, thresholds=thresholds,
            strategy=strategy, sinks=sinks,
        )
        self.clip = clip
        self.policy = guard_policy(guard)
        self.prefix = prefix
        self.watch: Watch | None = None
        self.guard: NonFiniteGuard | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[torch.Tensor] = []
        self._scaler: Any = None
        self._sync_free = False
        self._loss: torch.Tensor | None = None
        self._hook: Any = None
        self._trace_len = 0
        self._flat_shards = False  # FSDP1: every rank holds a flat shard of each layer
        self._warned_findings = 0
        self._warned_events = 0

    # -- what a user reads -------------------------------------------------------------
    @property
    def trace(self) -> Any:
        """The :class:`gradguard.Trace` recorded so far (complete once ``fit`` has ended)."""
        if self.watch is None:
            raise RuntimeError("nothing is recorded yet: the Trace exists once trainer.fit has started")
        return self.watch.trace

    @property
    def findings(self) -> list[Finding]:
        """The findings so far (complete once ``fit`` has ended)."""
        return [] if self.watch is None else list(self.watch.findings)

    # -- set-up -------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"GradguardCallback(clip=...) and Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip "
                "twice: leave gradient_clip_val unset (the callback clips and logs the pre-clip norm as "
                f"{self.prefix}grad_norm), or drop clip= to let Lightning clip"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Here, not in setup(): the strategy has wrapped the model and built the optimizer.
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GradguardCallback watches one optimizer; this LightningModule has {len(trainer.optimizers)}. "
                "Use gradguard.watch(model) by hand in manual optimization with several optimizers"
            )
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy:
            raise ValueError("GradguardCallback does not support DeepSpeed, which keeps its own gradient buffers")
        self._flat_shards = distributed() and _has_fsdp1(trainer.model)
        if self._flat_shards and self.clip is not None:
            raise ValueError(
                "GradguardCallback(clip=...) under FSDP would clip each rank's shard by its own norm: use the "
                "Trainer's gradient_clip_val (FSDP's clip_grad_norm_ of the global norm) and drop clip="
            )
        optimizer = trainer.optimizers[0]
        self._optimizer = optimizer
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and getattr(scaler, "_enabled", True) else None
        self.watch = Watch(pl_module, scaler=self._scaler, **self.options)
        self._trace_len = self._warned_findings = self._warned_events = 0
        if self.policy is not None:
            self.guard = NonFiniteGuard(optimizer, model=pl_module, policy=self.policy)
            # A fused optimizer skips on a device flag: no host read per step (not with a
            # GradScaler, which sets that flag itself).
            self._sync_free = self.guard._sync_free and self._scaler is None
        self._hook = optimizer.register_step_post_hook(self._after_step)

    # -- the step -----------------------------------------------------------------------
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if self._scaler is not None:  # the loss given here is already multiplied by the loss scale
            loss = loss / self._scaler._scale.to(loss.device)
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        watch = self.watch
        if watch is None or watch.closed:
            return
        loss, self._loss = self._loss, None
        flushed_before = len(watch.trace)
        watch.step(loss=loss)
        if self._flat_shards:
            self._globalize(watch, weights=True)
        self._snapshot(watch)
        norms = shared_norms(self.clip, self.guard is not None, self._params)
        skipped = self._guard(loss, norms) if self.guard is not None else False
        if self.clip is not None and not skipped:
            total = apply_clip(self.clip, self._params, norms)
            if total is not None and _logs_this_step(trainer):
                pl_module.log(f"{self.prefix}grad_norm", total.detach(), on_step=True, on_epoch=False)
        if len(watch.trace) != flushed_before or skipped:
            self._report(pl_module)

    def _snapshot(self, watch: Watch) -> None:
        """On a recorded full step, keep the parameters, so the post-step hook can measure the update."""
        step = watch._calls - 1
        if step % watch.every == 0 and watch._is_full(step):
            watch._snapshot()
        else:
            watch._before = None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._sync_free and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf  # type: ignore[attr-defined]
        watch = self.watch
        if watch is not None and not watch.closed and watch._before is not None:
            watch._post_optimizer(optimizer, args, kwargs)
            if self._flat_shards:
                self._globalize(watch, weights=False)

    @torch.no_grad()
    def _globalize(self, watch: Watch, weights: bool) -> None:
        """FSDP1: turn this step's per-rank shard statistics into whole-layer ones (every rank)."""
        if not watch._ring_steps or watch._ring_steps[-1] != watch._calls - 1:
            return  # this step was not recorded
        row = watch._ring[len(watch._ring_steps) - 1]
        # Sums of squares and non-finite counts add up over the shards, max-abs takes the maximum;
        # a layer is missing (NaN) only where no rank holds a piece of it.
        norms = [row[_W]] if weights else [row[_W + 1]]
        if weights:
            norms.insert(0, row[_G])
        parts = [torch.stack([torch.nan_to_num(n, nan=0.0) ** 2, (~torch.isnan(n)).double()]) for n in norms]
        extra = torch.nan_to_num(row[_G + 1 : _G + 3], nan=0.0) if weights else row[:0]
        gathered = gather_rows(torch.cat([*parts, extra]))  # [world, k, L], in rank order
        summed = gathered.sum(dim=0)
        out = [torch.where(summed[2 * i + 1] > 0, summed[2 * i].sqrt(), torch.nan) for i in range(len(norms))]
        if weights:
            present = summed[1] > 0
            row[_G] = out[0]
            # The max-abs is measured on full steps only (NaN, taken as 0 above, on the others).
            full = watch._is_full(watch._ring_steps[-1])
            row[_G + 1] = torch.where(present, gathered[:, 4].amax(dim=0), torch.nan) if full else torch.nan
            row[_G + 2] = torch.where(present, summed[5], torch.nan)
            row[_W] = out[1]
        else:
            row[_W + 1] = out[0]
            row[_W + 2] = out[0] / row[_W]

    def _guard(self, loss: torch.Tensor | None, norms: Norms | None) -> bool:
        """Check this step as NonFiniteGuard does; returns True when it is skipped here (known on the host)."""
        guard = self.guard
        assert guard is not None and self._optimizer is not None
        step = guard.step_count
        guard.step_count += 1
        any_bad, loss_ok, bad = guard._check(loss, None if norms is None else norms[0])
        if self._sync_free:
            # We run inside optimizer.step(closure), after the closure: a fused optimizer reads
            # found_inf next and skips on the device.
            self._optimizer.found_inf = any_bad.to(torch.float32)  # type: ignore[attr-defined]
            guard._pending.append((step, any_bad, bad))
            guard._loss_flags.append(loss_ok)
            if len(guard._pending) >= _PENDING:
                guard._drain()
            return False
        if bool(any_bad):  # one host read: this optimizer cannot skip on the device
            guard._on_bad(step, bool(loss_ok), bad)
            if self._scaler is not None:
                # The scaler skips the step and backs off its scale, also when its own flag was clean (a NaN loss).
                state = self._scaler._per_optimizer_states[id(self._optimizer)]
                for found_inf in state["found_inf_per_device"].values():
                    found_inf.fill_(1.0)
            for p in self._params:
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
            return True
        guard._on_clean()
        return False

    # -- reporting ----------------------------------------------------------------------
    def _report(self, pl_module: Any | None) -> dict[str, float]:
        """Warn about new findings and guard events; log their counts (returns them)."""
        assert self.watch is not None
        self._trace_len = len(self.watch.trace)
        findings = self.watch.findings
        for f in findings[self._warned_findings :]:
            _rank_zero_warn(f"gradguard: {f}")
        self._warned_findings = len(findings)
        counts = {f"{self.prefix}findings": float(len(findings))}
        if self.guard is not None:
            events = self.guard.events  # reads pending skip flags back (one synchronisation)
            # events holds only the last max_events: the new ones are its tail
            new = min(self.guard.events_total - self._warned_events, len(events))
            for e in events[len(events) - new :]:
                where = f" (non-finite in {', '.join(e.layers)})" if e.layers else ""
                loss = "" if e.loss_finite else " (non-finite loss)"
                _rank_zero_warn(f"gradguard: optimizer step {e.step}: {e.kind}{where}{loss}")
            self._warned_events = self.guard.events_total
            counts[f"{self.prefix}skipped_steps"] = float(self.guard.skipped)
        if pl_module is not None:
            for name, value in counts.items():
                pl_module.log(name, value, on_step=True, on_epoch=False)
        return counts

    def _finish(self, trainer: Any) -> None:
        if self.watch is None or self.watch.closed:
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.watch.close()  # the last flush: the findings are complete now
        counts = self._report(None)
        # Logging is closed at this point of fit: put the final counts in callback_metrics directly.
        for name, value in counts.items():
            trainer.callback_metrics[name] = torch.tensor(value)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # also after an exception: close the store so it stays readable
            self._finish(trainer)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state_dict = getattr(self.clip, "state_dict", None)
        return {"clip": state_dict()} if callable(state_dict) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load = getattr(self.clip, "load_state_dict", None)
        if "clip" in state_dict and callable(load):
            load(state_dict["clip"])
