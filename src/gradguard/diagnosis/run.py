"""diagnose(): run a model on a batch, name the layer, the cause and the fix, and keep what it measured.

Nothing the caller passes is changed: the model is deep-copied (the short run trains the
copy), the optimizer is rebuilt on the copy with the same class and hyperparameters (its
state is not copied), and the global random state is restored afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..detect import SEVERITIES, Finding, Thresholds, detect
from ..detect.finding import KINDS
from ..detect.fixes import SKIP_NONFINITE
from ..probe.layers import LayerIndex, find_layers
from ..remedy.guard import localize
from ..trace import Trace
from ..watch import Watch
from .curvature import Curvature, hessian_top_eigenvalue, learning_rate_findings, stability_limit
from .flow import flow_findings, flowing
from .init_audit import LayerInit, audit, init_findings
from .inputs import InputStats, first_layer_grad_ratio, first_layer_input, input_findings, input_stats
from .jsonsafe import plain
from .prediction import Prediction, predict
from .profile import Profile, measure_profile
from .recurrent import TimeProfile, through_time, through_time_findings

LossFn = Callable[[Any, Any], torch.Tensor]
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
# Within one severity: what breaks training outright first, then causes, then symptoms.
_KIND_ORDER = {k: i for i, k in enumerate((
    "nonfinite", "learning_rate_too_high", "exploding_gradient", "exploding_through_time", "vanishing_gradient",
    "vanishing_through_time", "bad_init_scale", "unnormalized_input", "dead_units", "saturated_activation",
))}
assert set(_KIND_ORDER) == set(KINDS)


# -- the optimizer of the short run ---------------------------------------------------------------------------------
@dataclass
class OptimizerSpec:
    """How to build the short run's optimizer on a copy of the model: a class and per-group hyperparameters."""

    cls: type[torch.optim.Optimizer]
    groups: list[dict[str, Any]]  # hyperparameters per group, plus "indices": positions in model.parameters()
    description: str

    @classmethod
    def create(cls, model: nn.Module, optimizer: torch.optim.Optimizer | str | None, lr: float | None) -> OptimizerSpec:
        """From an optimizer of ``model``, or a name (``"sgd"``: momentum 0.9; ``"adam"``) and a learning rate."""
        if isinstance(optimizer, torch.optim.Optimizer):
            if lr is not None:
                raise ValueError("give lr= only with optimizer='sgd' or 'adam'; this optimizer has its own")
            position = {id(p): i for i, p in enumerate(model.parameters())}
            groups = []
            for g in optimizer.param_groups:
                missing = [p for p in g["params"] if id(p) not in position]
                if missing:
                    raise ValueError(
                        f"the optimizer holds {len(missing)} parameter(s) that are not the model's: pass the "
                        "optimizer built on this model's parameters"
                    )
                hyper = {k: v for k, v in g.items() if k != "params"}
                groups.append({**hyper, "indices": [position[id(p)] for p in g["params"]]})
            first = optimizer.param_groups[0]
            desc = f"{type(optimizer).__name__} (lr {first.get('lr')}" + (
                f", momentum {first['momentum']}" if first.get("momentum") else "") + ")"
            return cls(type(optimizer), groups, desc)
        name = "sgd" if optimizer is None else optimizer
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or one of {OPTIMIZERS}, got {optimizer!r}")
        rate = DEFAULT_LR[name] if lr is None else lr
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        n = len(list(model.parameters()))
        if name == "sgd":
            return cls(torch.optim.SGD, [{"lr": float(rate), "momentum": 0.9, "indices": list(range(n))}],
                       f"SGD (lr {rate:g}, momentum 0.9)")
        return cls(torch.optim.Adam, [{"lr": float(rate), "indices": list(range(n))}], f"Adam (lr {rate:g})")

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer on ``model``'s parameters; one group with the first group's settings if they changed."""
        params = list(model.parameters())
        covered = sorted(i for g in self.groups for i in g["indices"])
        if covered and covered[-1] < len(params) and len(params) == sum(len(g["indices"]) for g in self.groups):
            groups = [{**{k: v for k, v in g.items() if k != "indices"}, "params": [params[i] for i in g["indices"]]}
                      for g in self.groups]
        else:  # a fix changed the parameters (new layers): one group with the first group's settings
            hyper = {k: v for k, v in self.groups[0].items() if k != "indices"}
            groups = [{**hyper, "params": [p for p in params if p.requires_grad]}]
        return self.cls(groups)  # type: ignore[call-arg]  # every hyperparameter is in the groups

    def with_lr(self, factor: float) -> OptimizerSpec:
        """The same optimizer with every group's learning rate multiplied by ``factor``."""
        groups = [{**g, "lr": g["lr"] * factor} if "lr" in g else dict(g) for g in self.groups]
        return OptimizerSpec(self.cls, groups, f"{self.description} with lr x {factor:g}")


# -- progress ---------------------------------------------------------------------------------------------------------
class Progress:
    """Stage messages and bars on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Callable[[], None]]:
        """A stage; yields a function that advances its bar by one."""
        if not self.enabled:
            yield lambda: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task(description, total=total or 1)
            yield lambda: bar.advance(task)
            bar.update(task, completed=total or 1)


# -- the result -----------------------------------------------------------------------------------------------------
@dataclass
class Diagnosis:
    """What diagnose found and measured. ``str()`` reads as a report; ``to_json()`` and ``to_html()`` keep it."""

    findings: list[Finding]
    trace: Trace
    profile: Profile
    init: list[LayerInit]
    theory: Prediction | None
    curvature: Curvature | None
    curvature_note: str
    stability: tuple[float | None, str]
    through_time: list[TimeProfile]
    inputs: InputStats | None
    losses: np.ndarray
    settings: dict[str, Any]
    fix_results: list[Any] = field(default_factory=list)
    _context: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``error``."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def kinds(self) -> list[str]:
        """The kinds found, in rank order, without repeats."""
        return list(dict.fromkeys(f.kind for f in self.findings))

    def by_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown finding kind {kind!r}; kinds are {KINDS}")
        return [f for f in self.findings if f.kind == kind]

    def gradient_ratio(self) -> float:
        """RMS of dL/dy at the first layer over the last, at initialisation (as the depth rules read the layers)."""
        g = self.profile.grad_ms
        order = flowing(self.profile)  # as the depth rules read it
        if len(order) < 2 or not g[order[-1]] > 0:
            return math.nan
        return float(math.sqrt(self.profile.grad_ms[order[0]] / self.profile.grad_ms[order[-1]]))

    def final_loss(self, last: int = 5) -> float:
        """Median training loss over the last ``last`` steps of the short run (inf if it went non-finite)."""
        if len(self.losses) == 0:
            return math.nan
        if not np.all(np.isfinite(self.losses)):
            return math.inf
        return float(np.median(self.losses[-last:]))

    def try_fixes(self, fixes: list[str] | None = None, *, steps: int | None = None,
                  progress: bool = False) -> list[Any]:
        """Apply each proposed fix to a copy of the original model, re-measure, and rank by the loss reached.

        ``fixes``: names (see ``gradguard.diagnosis.whatif.FIXES``); default: every fix the
        findings propose that can be applied automatically. The first row is doing nothing.
        """
        from .whatif import try_fixes

        self.fix_results = try_fixes(self, fixes, steps=steps, progress=progress)
        return self.fix_results

    def to_dict(self) -> dict[str, Any]:
        """Everything measured, JSON-friendly (non-finite numbers become None)."""
        d = {
            "findings": [f.to_dict() for f in self.findings],
            "settings": self.settings,
            "profile": self.profile.to_dict(),
            "init": [a.to_dict() for a in self.init],
            "theory": self.theory.to_dict() if self.theory is not None else None,
            "curvature": {
                **(self.curvature.to_dict() if self.curvature is not None else {"value": None}),
                "limit": self.stability[0],
                "limit_rule": self.stability[1],
                "note": self.curvature_note,
            },
            "through_time": [t.to_dict() for t in self.through_time],
            "inputs": self.inputs.to_dict() if self.inputs is not None else None,
            "losses": [float(x) for x in self.losses],
            "fixes_tried": [r.to_dict() for r in self.fix_results],
        }
        return plain(d)

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text."""
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self, path: str | Any) -> Any:
        """Write a self-contained HTML report to ``path``; returns the path."""
        from .html import write_html

        return write_html(self, path)

    def __str__(self) -> str:
        from .text import render_text

        return render_text(self)


# -- the checks -----------------------------------------------------------------------------------------------------
def _check_args(model: Any, batch: Any, loss_fn: Any, steps: Any) -> tuple[Any, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose expects a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"batch must be a pair (inputs, targets) so that loss_fn(model(inputs), targets) is the loss; got "
            f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model(inputs), targets), got {type(loss_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (0: measure at initialisation only), got {steps!r}")
    return batch[0], batch[1]


def _check_device(index: LayerIndex, x: Any, y: Any) -> None:
    device = index.params[0].device
    if device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device and have no values: materialise them first "
            "(model.to_empty(device='cpu') then initialise, or load_state_dict(state, assign=True))"
        )
    for what, t in (("inputs", x), ("targets", y)):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"the {what} are on {t.device} and the model on {device}: move them with .to({device!s})")


def _loss_of(model: nn.Module, x: Any, y: Any, loss_fn: LossFn) -> torch.Tensor:
    try:
        out = model(x)
    except Exception as err:  # the user's model: any failure is theirs, reported at the boundary
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"the model could not run on the batch: {type(err).__name__}: {first}") from err
    try:
        loss = loss_fn(out, y)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"loss_fn failed on the model's output {shape}: {type(err).__name__}: {first}") from err
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {what}: reduce it with .mean() or .sum()")
    return loss.reshape(())


_PER_LAYER = {"dead_units": "act_dead", "saturated_activation": "act_saturated"}


def _collapse(findings: list[Finding], kind: str) -> list[Finding]:
    """Per-layer findings of one kind as one: the worst layer named, every affected layer in the evidence."""
    mine = [f for f in findings if f.kind == kind]
    if len(mine) <= 1:
        return findings
    metric = _PER_LAYER[kind]
    worst = max(mine, key=lambda f: (_RANK[f.severity], f.evidence.get(metric, 0.0)))
    others = [f.layer for f in mine if f is not worst]
    shown = ", ".join(str(n) for n in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    merged = Finding(
        kind=kind, severity=worst.severity, layer=worst.layer, step=worst.step,
        message=f"{worst.message}; {len(others)} other layer(s) too: {shown}",
        evidence={**worst.evidence, "affected": {str(f.layer): f.evidence.get(metric) for f in mine}},
        fixes=worst.fixes,
    )
    return [f for f in findings if f.kind != kind] + [merged]


def _merge(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, layer) and one per depth-wide kind, the most severe; ranked worst first."""
    for kind in _PER_LAYER:
        findings = _collapse(findings, kind)
    kept: dict[tuple[str, str | None], Finding] = {}
    for f in findings:
        key = (f.kind, "*") if f.kind in ("vanishing_gradient", "exploding_gradient") and f.layer else (f.kind, f.layer)
        if f.kind == "nonfinite":
            key = ("nonfinite", "*")
        old = kept.get(key)
        if old is None or _RANK[f.severity] > _RANK[old.severity]:
            kept[key] = f
    return sorted(kept.values(), key=lambda f: (-_RANK[f.severity], _KIND_ORDER[f.kind]))


def _localized(model: nn.Module, x: Any, y: Any, loss_fn: LossFn) -> list[Finding]:
    """The first module whose output (or input gradient) went non-finite, as a nonfinite finding."""
    loc = localize(copy.deepcopy(model), (x, y), loss_fn)
    if loc.module is None or loc.kind != "nonfinite":
        return []
    return [Finding(
        kind="nonfinite",
        severity="error",
        layer=loc.module,
        step=0,
        message=(
            f"{loc.module} ({loc.detail.get('module_type', '')}) is the first module whose "
            f"{'output' if loc.phase == 'forward' else 'input gradient'} is NaN/inf while its "
            f"{'inputs were' if loc.phase == 'forward' else 'incoming gradient was'} finite ({loc.phase} pass); "
            "everything after it is poisoned"
        ),
        evidence={"phase": loc.phase, **loc.detail},
        fixes=(SKIP_NONFINITE,),
    )]


def diagnose(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    *,
    steps: int = 30,
    optimizer: torch.optim.Optimizer | str | None = None,
    lr: float | None = None,
    thresholds: Thresholds | None = None,
    hessian: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> Diagnosis:
    """Say whether gradients will flow through ``model``, where they vanish or explode, why, and what to change.

    ``batch = (inputs, targets)`` with ``loss_fn(model(inputs), targets)`` the loss. At
    initialisation: the back-propagated gradient and the signal layer by layer, an
    initialisation audit, the input scale, the largest Hessian eigenvalue against the
    optimizer's stability limit, gradient flow through time in RNN/LSTM/GRU modules, and
    mean-field predictions for plain MLP chains. Then ``steps`` training steps on the same
    batch under :func:`gradguard.watch` (statistics every step) on a copy of the model,
    with ``optimizer`` (an optimizer of ``model``, rebuilt on the copy with the same
    hyperparameters and fresh state) or ``"sgd"`` (momentum 0.9, lr 0.01) / ``"adam"``
    (lr 1e-3), ``lr`` overriding the default learning rate. ``hessian=False`` skips the
    eigenvalue (it costs about 2 x iterations backward passes). Nothing passed in is changed.
    """
    x, y = _check_args(model, batch, loss_fn, steps)
    th = thresholds or Thresholds()
    spec = OptimizerSpec.create(model, optimizer, lr)
    stages = Progress(progress)
    pristine = copy.deepcopy(model)
    devices = [p.device for p in pristine.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
        torch.manual_seed(seed)
        result = _diagnose(pristine, x, y, loss_fn, steps=steps, spec=spec, th=th, hessian=hessian, stages=stages)
    result._context = {"model": pristine, "batch": (x, y), "loss_fn": loss_fn, "spec": spec, "thresholds": th,
                       "seed": seed, "hessian": hessian}
    result.settings.update({"seed": seed, "model": type(model).__name__})
    return result


def _diagnose(
    pristine: nn.Module,
    x: Any,
    y: Any,
    loss_fn: LossFn,
    *,
    steps: int,
    spec: OptimizerSpec,
    th: Thresholds,
    hessian: bool,
    stages: Progress,
    clip: float | None = None,
) -> Diagnosis:
    work = copy.deepcopy(pristine)
    index = find_layers(work)
    _check_device(index, x, y)
    found: list[Finding] = []

    with stages.stage("profile at initialisation"):
        profile, _ = measure_profile(work, index, lambda: _loss_of(work, x, y, loss_fn), x)
        work.zero_grad(set_to_none=True)
    finite = math.isfinite(profile.loss) and bool(np.all(np.isfinite(profile.out_ms[profile.order])))
    if not finite:
        found += _localized(pristine, x, y, loss_fn)
    prediction = predict(index, profile) if finite else None
    found += flow_findings(profile, th, prediction) if finite else []
    audited = audit(index, profile)
    found += init_findings(audited, profile)

    first = index.modules[profile.order[0]] if profile.order else None
    stats = input_stats(first_layer_input(work, first, x) if first is not None else x)
    if stats is not None and finite and first is not None:
        ratio = first_layer_grad_ratio(work, first, x, y, loss_fn)
        stats = InputStats(**{**stats.to_dict(), "first_layer": profile.names[profile.order[0]],
                              "first_layer_grad_ratio": ratio})
    found += input_findings(stats)

    curvature, note = None, "not measured"
    optimizer = spec.build(work)
    limit = stability_limit(optimizer)
    if hessian and finite:
        with stages.stage("largest Hessian eigenvalue (power iteration)"):
            try:
                curvature = hessian_top_eigenvalue(work, x, y, loss_fn)
                note = ""
            except ValueError as err:
                note = f"not measured: {err}"
    elif not hessian:
        note = "not measured (hessian=False)"

    profiles: list[TimeProfile] = []
    if finite:
        with stages.stage("gradient through time"):
            profiles = through_time(work, x, y, loss_fn)
        found += through_time_findings(profiles, th)

    losses: list[float] = []
    # Weights and activations every step for short runs; for longer ones every tenth of the run, which still gives
    # the dead-unit rule its window of sampled batches and costs a fraction of measuring them every step.
    sample = max(1, steps // 10)
    with stages.stage(f"short run: {steps} steps of {spec.description}", total=max(steps, 1)) as advance, \
            Watch(work, optimizer=optimizer, every=1, weights_every=sample, activations_every=sample,
                  flush_every=min(max(steps, 1), 256), thresholds=th) as w:
        for _ in range(max(steps, 1)):
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_of(work, x, y, loss_fn)
            loss.backward()
            w.step(loss=loss)
            losses.append(float(loss.detach()))
            if steps == 0:
                break
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(work.parameters(), clip)
            optimizer.step()
            advance()
            if not math.isfinite(losses[-1]):
                break  # the run diverged: what follows is NaN
    trace = w.trace
    loss_arr = np.array(losses, dtype=np.float64)
    found += detect(trace, th)
    found += learning_rate_findings(curvature, optimizer, loss_arr if steps else np.array([]), th)
    return Diagnosis(
        findings=_merge(found),
        trace=trace,
        profile=profile,
        init=audited,
        theory=prediction,
        curvature=curvature,
        curvature_note=note,
        stability=limit,
        through_time=profiles,
        inputs=stats,
        losses=loss_arr,
        settings={"steps": steps, "optimizer": spec.description, "layers": len(index),
                  "parameters": int(sum(index.numel)), "clip": clip},
    )
