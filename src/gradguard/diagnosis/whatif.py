"""What-if: apply each proposed fix to a copy of the model, re-measure, and rank the fixes by what they achieved."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..remedy.architecture import insert_normalization, prepend_standardizer, residualize, swap_activation
from ..remedy.init import init_
from .jsonsafe import plain

if TYPE_CHECKING:
    from .run import Diagnosis, OptimizerSpec


@dataclass
class Change:
    """A fixed setup: the model, the optimizer spec and the clipping threshold of the short run."""

    model: nn.Module
    spec: OptimizerSpec
    clip: float | None = None
    note: str = ""


Applier = Callable[[Change, "Diagnosis"], Change]


def _swap_saturating(c: Change, d: Diagnosis) -> Change:
    present = [cls for cls in (nn.Sigmoid, nn.Tanh) if any(isinstance(m, cls) for m in c.model.modules())]
    if not present:
        raise ValueError("the model has no nn.Sigmoid or nn.Tanh module to replace")
    model = c.model
    for cls in present:
        model = swap_activation(model, cls, nn.ReLU, inplace=True)
    init_(model, "kaiming")
    names = " and ".join(cls.__name__ for cls in present)
    return Change(model, c.spec, c.clip, f"{names} -> ReLU, He init")


def _init(scheme: str) -> Applier:
    def apply(c: Change, d: Diagnosis) -> Change:
        return Change(init_(c.model, scheme), c.spec, c.clip, f'init_(model, "{scheme}")')

    return apply


def _batchnorm(c: Change, d: Diagnosis) -> Change:
    return Change(insert_normalization(c.model, "batch", inplace=True), c.spec, c.clip, "BatchNorm1d after each Linear")


def _residual(c: Change, d: Diagnosis) -> Change:
    return Change(residualize(c.model, inplace=True), c.spec, c.clip, "residual blocks (SkipInit)")


def _standardize(c: Change, d: Diagnosis) -> Change:
    x = d._context["batch"][0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("the inputs are not a floating-point tensor")
    return Change(prepend_standardizer(c.model, x, inplace=True), c.spec, c.clip, "standardised inputs")


def _clip(c: Change, d: Diagnosis) -> Change:
    return Change(c.model, c.spec, 1.0, "clip_grad_norm_ at 1.0")


def _lower_lr(c: Change, d: Diagnosis) -> Change:
    return Change(c.model, c.spec.with_lr(0.1), c.clip, "learning rate x 0.1")


def _adam(c: Change, d: Diagnosis) -> Change:
    from .run import OptimizerSpec

    if c.spec.cls is torch.optim.Adam:
        raise ValueError("the run already uses Adam")
    return Change(c.model, OptimizerSpec.create(c.model, "adam", None), c.clip, "Adam (lr 1e-3)")


def _leaky(c: Change, d: Diagnosis) -> Change:
    model = swap_activation(c.model, nn.ReLU, lambda: nn.LeakyReLU(0.01), inplace=True)
    return Change(model, c.spec, c.clip, "ReLU -> LeakyReLU(0.01)")


def _zero_bias(c: Change, d: Diagnosis) -> Change:
    named = {f.layer for f in d.findings if f.kind == "dead_units" and f.layer}
    modules = dict(c.model.named_modules())
    targets = [modules[n] for n in named if n in modules] or [m for m in c.model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in targets:
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return Change(c.model, c.spec, c.clip, f"zero bias in {', '.join(sorted(named)) or 'every Linear'}")


def _gated(c: Change, d: Diagnosis) -> Change:
    replaced = []
    for name, module in list(c.model.named_modules()):
        if type(module) is nn.RNN:
            # nn.GRU takes the same arguments and returns the same (output, h_n): a drop-in replacement.
            gru = nn.GRU(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                         batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional)
            gru = gru.to(next(module.parameters()).device)
            parent_name, _, attr = name.rpartition(".")
            parent = c.model.get_submodule(parent_name) if parent_name else c.model
            if not name:
                raise ValueError("the model itself is an nn.RNN; wrap it to replace it")
            setattr(parent, attr, gru)
            replaced.append(name)
    if not replaced:
        raise ValueError("the model has no vanilla nn.RNN to replace")
    return Change(c.model, c.spec, c.clip, f"nn.GRU in place of {', '.join(replaced)}")


def _orthogonal(c: Change, d: Diagnosis) -> Change:
    done = []
    with torch.no_grad():
        for name, module in c.model.named_modules():
            if isinstance(module, (nn.RNN, nn.LSTM, nn.GRU)):
                for pname, w in module.named_parameters(recurse=False):
                    if pname.startswith("weight_hh"):
                        nn.init.orthogonal_(w)
                        done.append(f"{name}.{pname}" if name else pname)
    if not done:
        raise ValueError("the model has no recurrent weights")
    return Change(c.model, c.spec, c.clip, "orthogonal recurrent weights")


# The fixes that can be applied automatically, by the names the findings' fixes carry.
FIXES: dict[str, Applier] = {
    "relu_he": _swap_saturating,
    "he_init": _init("auto"),
    "auto_init": _init("auto"),
    "xavier_init": _init("xavier"),
    "batchnorm": _batchnorm,
    "residual": _residual,
    "standardize_input": _standardize,
    "clip_norm": _clip,
    "lower_lr": _lower_lr,
    "adam": _adam,
    "leaky_relu": _leaky,
    "zero_bias": _zero_bias,
    "gated_rnn": _gated,
    "orthogonal_recurrent": _orthogonal,
}
# Names that do the same thing: measured once.
_SAME = {"auto_init": "he_init"}


@dataclass(frozen=True)
class FixResult:
    """One measured what-if: the gradient ratio first/last layer and the loss after N steps, before and after."""

    name: str
    title: str
    applied: bool
    note: str
    ratio_before: float
    ratio_after: float
    loss_before: float
    loss_after: float
    kinds_after: list[str] = field(default_factory=list)
    errors_after: int = 0

    @property
    def improvement(self) -> float:
        """How much lower the loss after N steps is than without the fix (positive: better)."""
        return self.loss_before - self.loss_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["improvement"] = self.improvement
        return plain(d)


def proposed(d: Diagnosis) -> list[str]:
    """Fix names the findings propose, most severe finding first, that can be applied automatically."""
    names: list[str] = []
    for f in d.findings:
        for fix in f.fixes:
            name = _SAME.get(fix.name, fix.name)
            if name in FIXES and name not in names:
                names.append(name)
    return names


def _titles(d: Diagnosis) -> dict[str, str]:
    return {_SAME.get(fix.name, fix.name): fix.title for f in d.findings for fix in f.fixes}


def try_fixes(d: Diagnosis, fixes: list[str] | None, *, steps: int | None, progress: bool) -> list[FixResult]:
    """Measure each fix on a copy of the model; ranked by the loss reached, doing nothing included."""
    from .run import Progress, _diagnose

    if not d._context:
        raise RuntimeError("this Diagnosis was not made by gradguard.diagnose(); there is no model to try fixes on")
    names = proposed(d) if fixes is None else list(fixes)
    unknown = [n for n in names if n not in FIXES]
    if unknown:
        raise ValueError(f"unknown fix(es) {unknown}; known: {sorted(FIXES)}")
    ctx = d._context
    n_steps = d.settings["steps"] if steps is None else steps
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"steps must be a positive integer, got {n_steps!r}")
    x, y = ctx["batch"]
    stages = Progress(progress)

    def measure(change: Change) -> Diagnosis:
        devices = [p.device for p in change.model.parameters() if p.device.type == "cuda"]
        with torch.random.fork_rng(devices=sorted({dev.index or 0 for dev in devices})):
            torch.manual_seed(ctx["seed"])
            return _diagnose(change.model, x, y, ctx["loss_fn"], steps=n_steps, spec=change.spec,
                             th=ctx["thresholds"], hessian=False, stages=Progress(False), clip=change.clip)

    base = d if n_steps == d.settings["steps"] else measure(Change(copy.deepcopy(ctx["model"]), ctx["spec"]))
    ratio0, loss0 = base.gradient_ratio(), base.final_loss()
    titles = _titles(d)
    results = [FixResult("none", "Change nothing", True, "the model as given", ratio0, ratio0, loss0, loss0,
                         base.kinds, len(base.errors))]
    skipped = []
    with stages.stage("trying fixes", total=len(names)) as advance:
        for name in names:
            title = titles.get(name, name.replace("_", " "))
            try:
                change = FIXES[name](Change(copy.deepcopy(ctx["model"]), ctx["spec"]), d)
            except ValueError as err:
                skipped.append(FixResult(name, title, False, f"not applicable: {err}", ratio0, math.nan, loss0,
                                         math.nan))
                advance()
                continue
            after = measure(change)
            results.append(FixResult(name, title, True, change.note, ratio0, after.gradient_ratio(), loss0,
                                     after.final_loss(), after.kinds, len(after.errors)))
            advance()
    # Lower loss after N steps first; a run that went non-finite last; ties: closer gradient ratio to 1.
    results.sort(key=lambda r: (not math.isfinite(r.loss_after), r.loss_after if math.isfinite(r.loss_after) else 0,
                                abs(math.log10(r.ratio_after)) if r.ratio_after > 0 else math.inf))
    return results + skipped


def format_fix_table(results: list[FixResult], steps: int) -> str:
    """A plain-text table of measured fixes, best first."""
    header = ("fix", "grad ratio first/last", f"loss after {steps} steps", "errors left")
    rows = []
    for r in results:
        if not r.applied:
            rows.append((r.name, "-", "-", r.note))
            continue
        rows.append((
            r.name,
            f"{r.ratio_before:.2e} -> {r.ratio_after:.2e}",
            f"{r.loss_before:.4g} -> {r.loss_after:.4g}",
            str(r.errors_after),
        ))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
