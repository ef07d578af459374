"""Lab cases on batch normalisation and residual connections.

Internal covariate shift and deep sigmoid nets trained with batch normalisation (Ioffe & Szegedy 2015),
the degradation of deep plain nets (He et al. 2016), shattered gradients (Balduzzi et al. 2017), the
variance of the residual stream (De & Smith 2020) and residual nets trained without normalisation by
SkipInit (De & Smith 2020) and Fixup (Zhang et al. 2019). Gradient statistics come from
:func:`gradguard.watch`, the signal per block from :func:`gradguard.diagnose`'s profile, and the
remedies are gradguard's own (``insert_normalization``, ``residualize``, ``Residual``, ``init_``,
``zero_init_residual_``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard.lab.case import Context, Outcome, Source, case, finite
from gradguard.lab.data import digits
from gradguard.lab.models import mlp
from gradguard.remedy import Residual
from gradguard.report.html import new_figure
from gradguard.theory import product_bound

if TYPE_CHECKING:
    from matplotlib.axes import Axes

GROUP = "normalization"
CHANCE = 0.1  # ten balanced digit classes
LN10 = math.log(10.0)  # the cross-entropy of a uniform guess over ten classes
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# -- shared helpers --------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: gradguard's trace (per-step loss and gradient statistics), test accuracy, divergence."""

    trace: gradguard.Trace
    test_accuracy: float
    diverged_at: int | None  # the first step whose loss was not finite; None if training finished

    @property
    def loss(self) -> np.ndarray:
        """Training loss of each recorded step (the minibatch loss, in train mode)."""
        return self.trace.loss

    def final_loss(self, fraction: float = 0.1) -> float:
        """Mean minibatch loss over the last ``fraction`` of the steps; inf when training diverged."""
        if self.diverged_at is not None or len(self.loss) == 0:
            return math.inf
        tail = max(1, int(len(self.loss) * fraction))
        return float(np.mean(self.loss[-tail:]))

    def grad_norms_at_init(self) -> np.ndarray:
        """Per-layer gradient norm of the first step, as watch measured it (NaN if no step was recorded)."""
        norms = self.trace.metric("grad_norm")
        return norms[0] if len(norms) else np.full(len(self.trace.layers), np.nan)

    def largest_grad_at_init(self) -> float | None:
        """The largest per-layer gradient norm of the first step (None if not finite or not recorded)."""
        g = self.grad_norms_at_init()
        return finite(float(np.max(g))) if np.all(np.isfinite(g)) else None


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy in eval mode (BatchNorm on its running statistics)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was_training)
    return acc


def train(
    model: nn.Module,
    data: Data,
    *,
    steps: int,
    lr: float,
    seed: int,
    batch: int = 128,
    momentum: float = 0.9,
    on_step: Callable[[int], None] | None = None,
) -> Run:
    """Train on digits with SGD under :func:`gradguard.watch`; stop at the first non-finite loss.

    ``on_step(step)`` runs before each step (and once after the last, with ``step == steps``).
    """
    x, y, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    diverged: int | None = None
    model.train()
    # Statistics on every step; weights and activations are not needed here, so they are not sampled.
    with gradguard.watch(model, optimizer=opt, weights_every=0, activations_every=0, seed=seed) as w:
        for step in range(steps):
            if on_step is not None:
                on_step(step)
            idx = torch.randint(0, len(x), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                diverged = step  # a NaN/inf loss never comes back: running on would only cost time
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            w.log_loss(loss)
            opt.step()
        else:
            if on_step is not None:
                on_step(steps)
    return Run(w.trace, accuracy(model, x_test, y_test), diverged)


def linear_layers(trace: gradguard.Trace, model: nn.Module) -> list[int]:
    """Indices (into ``trace.layers``) of the model's ``nn.Linear`` layers, in order."""
    modules = dict(model.named_modules())
    return [i for i, name in enumerate(trace.layers) if isinstance(modules.get(name), nn.Linear)]


def layer_axis(ax: Axes) -> None:
    """Label an axis of linear layers, numbered from the input, with whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("linear layer (input to output)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def sci(x: float | None) -> str:
    """A number for an interpretation sentence: 3 significant digits, 'not finite' for None/NaN/inf."""
    if x is None or not math.isfinite(x):
        return "not finite"
    return f"{x:.3g}"


def mean(values: list[float]) -> float:
    """Plain mean (inf when any value is inf)."""
    return float(np.mean(values))


# -- ioffe2015-input-drift -------------------------------------------------------------------------

PERCENTILES = (0.15, 0.50, 0.85)


def sigmoid_input_percentiles(model: nn.Module, probe: torch.Tensor) -> np.ndarray:
    """15th/50th/85th percentile over ``probe`` of each unit's input to the last ``nn.Sigmoid``: [3, units].

    Read by a forward pre-hook in train mode, as in training (BatchNorm normalises with the probe
    batch's statistics); BatchNorm's running statistics are restored afterwards, so probing does not
    change the model.
    """
    last = [m for m in model.modules() if isinstance(m, nn.Sigmoid)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    q = torch.quantile(seen[0].double(), torch.tensor(PERCENTILES, dtype=torch.float64), dim=0)
    return q.numpy()


@dataclass
class Drift:
    """Percentiles of the last hidden layer's sigmoid inputs over training, and how far they moved."""

    steps: list[int]
    percentiles: np.ndarray  # [checkpoints, 3, units]
    test_accuracy: float

    def per_unit(self) -> np.ndarray:
        """Per unit: the largest move of any of its three percentiles away from its value at step 0."""
        return np.abs(self.percentiles - self.percentiles[0]).max(axis=(0, 1))

    def median(self) -> float:
        """The typical unit's drift: the median over units."""
        return float(np.median(self.per_unit()))

    def typical_unit(self) -> int:
        """The unit whose drift is the median one (the 'typical sigmoid' plotted)."""
        d = self.per_unit()
        return int(np.argsort(d)[len(d) // 2])


def drift_run(model: nn.Module, data: Data, *, steps: int, every: int, seed: int) -> Drift:
    """Train with plain SGD (lr 0.5, batches of 60) and read the percentiles every ``every`` steps."""
    probe = data[0][:500]
    at: list[int] = []
    rows: list[np.ndarray] = []

    def record(step: int) -> None:
        if step % every == 0:
            at.append(step)
            rows.append(sigmoid_input_percentiles(model, probe))

    run = train(model, data, steps=steps, lr=0.5, seed=seed, batch=60, momentum=0.0, on_step=record)
    return Drift(at, np.stack(rows), run.test_accuracy)


@case(
    "ioffe2015-input-drift",
    title="Batch normalisation keeps a sigmoid's input distribution still during training",
    question="Does the distribution of a sigmoid's input drift while the network learns, and does batch "
             "normalisation keep it stable?",
    setup="Digits; an MLP with three hidden layers of 100 sigmoid units, weights N(0, 1/fan_in), with and without "
          "BatchNorm before each sigmoid (insert_normalization, same initial weights); plain SGD, lr 0.5, batches "
          "of 60, 3000 steps (20000 and 3 seeds with --full). Every 100 steps (500) a forward hook reads the "
          "15th/50th/85th percentiles of each last-hidden-layer unit's input over 500 fixed training digits.",
    source=Source(
        citation="Ioffe & Szegedy 2015, Batch Normalization, ICML, Sec. 4.1 and Fig. 1(b,c)",
        claim="\"The evolution of input distributions to a typical sigmoid, over the course of training, shown as "
              "{15, 50, 85}th percentiles. Batch Normalization makes the distribution more stable and reduces the "
              "internal covariate shift.\" (Fig. 1 caption); without it the distribution changes significantly "
              "over time, both in its mean and its variance (Sec. 4.1, paraphrase).",
        qualitative=True,
    ),
    group=GROUP,
)
def ioffe2015_input_drift(ctx: Context) -> Outcome:
    """Percentile drift of the last hidden layer's sigmoid inputs, with and without BatchNorm."""
    steps = ctx.pick(3000, 20000)
    every = ctx.pick(100, 500)
    plain_drift: list[float] = []
    bn_drift: list[float] = []
    runs: dict[str, Drift] = {}
    for seed in ctx.seeds(1, 3):
        data = digits(seed)
        # "Small random Gaussian values" (the paper's init): N(0, 1/fan_in), biases zero.
        plain = mlp([64, 100, 100, 100, 10], "sigmoid", sigma_w2=1.0, seed=seed)
        normed = gradguard.insert_normalization(plain, "batch")  # a copy: both nets start from the same weights
        a = drift_run(plain, data, steps=steps, every=every, seed=seed)
        b = drift_run(normed, data, steps=steps, every=every, seed=seed)
        plain_drift.append(a.median())
        bn_drift.append(b.median())
        if seed == ctx.seed:
            runs = {"without BatchNorm": a, "with BatchNorm": b}

    ratios = [b / a for a, b in zip(plain_drift, bn_drift)]
    drift_plain, drift_bn, ratio = mean(plain_drift), mean(bn_drift), mean(ratios)
    first = runs["without BatchNorm"]
    second = runs["with BatchNorm"]
    spread = {name: [float(np.median(r.percentiles[i, 2] - r.percentiles[i, 0])) for i in (0, -1)]
              for name, r in runs.items()}
    measured = {
        "drift_without_bn": drift_plain,
        "drift_with_bn": drift_bn,
        "drift_ratio_bn_over_plain": ratio,
        "drift_without_bn_per_seed": plain_drift,
        "drift_with_bn_per_seed": bn_drift,
        "spread_15_85_without_bn_start_end": spread["without BatchNorm"],
        "spread_15_85_with_bn_start_end": spread["with BatchNorm"],
        "test_accuracy_without_bn": first.test_accuracy,
        "test_accuracy_with_bn": second.test_accuracy,
        "steps": steps,
    }
    expected = {
        "drift_without_bn_above": 0.5,
        "drift_ratio_bn_over_plain_at_most": 0.5,
        "rule": "drift = largest move of a unit's 15th/50th/85th input percentile from its step-0 value (median "
                "over the 100 units); 'changes significantly' = more than 0.5 (in the sigmoid's input units), 'much "
                "more stable' = at most half the drift without BatchNorm, in every seed",
    }
    passed = all(a > 0.5 and b <= 0.5 * a for a, b in zip(plain_drift, bn_drift))

    fig = new_figure(9.0, 3.6)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    styles = ("--", "-", "--")
    for ax, (name, r) in zip(axes, runs.items()):
        unit = r.typical_unit()
        for k, q in enumerate(PERCENTILES):
            ax.plot(r.steps, r.percentiles[:, k, unit], styles[k], color="C0" if "without" in name else "C1",
                    label=f"{int(q * 100)}th percentile")
        ax.set_title(f"{name}: unit {unit} (drift {r.per_unit()[unit]:.2f})", fontsize=10)
        ax.set_xlabel("training step")
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("input to the sigmoid")
    lo = min(ax.get_ylim()[0] for ax in axes)
    hi = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(lo, hi)  # one scale, so the two drifts compare by eye

    (s0, s1), (t0, t1) = spread["without BatchNorm"], spread["with BatchNorm"]
    interpretation = (
        f"Without BatchNorm the typical sigmoid's input percentiles move by {sci(drift_plain)} "
        f"over training (its 15-85 spread goes from {s0:.2f} to {s1:.2f}: the next layer keeps seeing a new input "
        f"distribution); with BatchNorm they move by {sci(drift_bn)}, "
        f"{ratio:.2f} times as much (spread {t0:.2f} to {t1:.2f}). "
        "BatchNorm re-standardises each unit on every batch, so the input can only change through its learned "
        "scale and shift, which move slowly; without it every weight update of the layers below moves it. "
        f"Test accuracy: {first.test_accuracy:.3f} without, {second.test_accuracy:.3f} with BatchNorm. The "
        "percentiles are read by a forward hook: watch's activation statistics are the mean and spread of the "
        "sigmoid's output pooled over a layer, not per-unit percentiles of its input, which is what the paper plots."
    )
    rows = [[name, f"{r.percentiles[0, 1, r.typical_unit()]:.2f}", f"{r.percentiles[-1, 1, r.typical_unit()]:.2f}",
             f"{r.median():.3f}", f"{r.test_accuracy:.3f}"] for name, r in runs.items()]
    table = (["network", "median at step 0 (typical unit)", "median at the end", "drift (median unit)",
              "test accuracy"], rows)
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- ioffe2015-deep-sigmoid ------------------------------------------------------------------------

SIGMOID_DEPTH = 20


@case(
    "ioffe2015-deep-sigmoid",
    title="Batch normalisation makes a 20-layer sigmoid network trainable",
    question="Does a deep sigmoid MLP that stays at chance with default initialisation train once batch "
             "normalisation is inserted, with the same optimizer and steps?",
    setup=f"Digits; an MLP with {SIGMOID_DEPTH} hidden sigmoid layers of 64 units, PyTorch's default "
          "initialisation, with and without BatchNorm before each sigmoid (insert_normalization, same initial "
          "weights); SGD with momentum 0.9, lr 0.1, batches of 128, 800 steps (3000 and 3 seeds with --full); "
          "gradients per layer from watch.",
    source=Source(
        citation="Ioffe & Szegedy 2015, Batch Normalization, ICML, Sec. 4.2",
        claim="\"Indeed, BN-x5-Sigmoid achieves the accuracy of 69.8%. Without Batch Normalization, Inception with "
              "sigmoid never achieves better than 1/1000 accuracy.\" (a deep sigmoid network stays at chance "
              "without batch normalisation and trains with it)",
        qualitative=True,
    ),
    group=GROUP,
)
def ioffe2015_deep_sigmoid(ctx: Context) -> Outcome:
    """A deep sigmoid MLP with and without BatchNorm: test accuracy against chance, gradients per layer."""
    steps = ctx.pick(800, 3000)
    results: dict[str, list[Run]] = {"without BatchNorm": [], "with BatchNorm": []}
    grad_ratio: dict[str, float] = {}
    models: dict[str, nn.Module] = {}
    for seed in ctx.seeds(1, 3):
        data = digits(seed)
        plain = mlp([64] + [64] * SIGMOID_DEPTH + [10], "sigmoid", seed=seed)
        normed = gradguard.insert_normalization(plain, "batch")
        for name, model in (("without BatchNorm", plain), ("with BatchNorm", normed)):
            run = train(model, data, steps=steps, lr=0.1, seed=seed)
            results[name].append(run)
            if seed == ctx.seed:
                lin = linear_layers(run.trace, model)
                g0 = run.grad_norms_at_init()
                # first hidden layer against the last hidden one: the depth the gradient crossed
                grad_ratio[name] = float(g0[lin[0]] / g0[lin[-2]])
                models[name] = model

    acc = {name: [r.test_accuracy for r in runs] for name, runs in results.items()}
    loss = {name: [r.final_loss() for r in runs] for name, runs in results.items()}
    bound = product_bound("sigmoid", SIGMOID_DEPTH)
    measured = {
        "test_accuracy_without_bn": mean(acc["without BatchNorm"]),
        "test_accuracy_with_bn": mean(acc["with BatchNorm"]),
        "final_train_loss_without_bn": finite(mean(loss["without BatchNorm"])),
        "final_train_loss_with_bn": finite(mean(loss["with BatchNorm"])),
        "grad_first_over_last_hidden_without_bn": finite(grad_ratio["without BatchNorm"]),
        "grad_first_over_last_hidden_with_bn": finite(grad_ratio["with BatchNorm"]),
        "sigmoid_product_bound": bound,
        "steps": steps,
    }
    expected = {
        "test_accuracy_without_bn_at_most": CHANCE + 0.05,
        "final_train_loss_without_bn_at_least": round(0.98 * LN10, 4),
        "test_accuracy_with_bn_at_least": 0.8,
        "rule": "at chance = test accuracy within 5 points of 10% and training loss within 2% of ln 10 (a uniform "
                "guess); trains = test accuracy of at least 80%; in every seed",
    }
    passed = (
        all(a <= CHANCE + 0.05 for a in acc["without BatchNorm"])
        and all(v >= 0.98 * LN10 for v in loss["without BatchNorm"])
        and all(a >= 0.8 for a in acc["with BatchNorm"])
    )

    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, (name, runs) in enumerate(results.items()):
        ax1.plot(runs[0].loss, color=f"C{k}", lw=1, label=f"{name} (test acc. {runs[0].test_accuracy:.2f})")
        lin = linear_layers(runs[0].trace, models[name])
        ax2.semilogy(range(1, len(lin) + 1), runs[0].grad_norms_at_init()[lin], "o-", ms=3, color=f"C{k}",
                     label=name)
    ax1.axhline(LN10, color="0.5", ls=":", label="ln 10 (chance)")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss", fontsize=10)
    ax1.legend(fontsize=8)
    layer_axis(ax2)
    ax2.set_ylabel("gradient norm at step 0 (watch)")
    ax2.set_title("gradient per layer at initialisation", fontsize=10)
    ax2.legend(fontsize=8)

    interpretation = (
        f"Without BatchNorm the {SIGMOID_DEPTH}-layer sigmoid net ends at {measured['test_accuracy_without_bn']:.3f} "
        f"test accuracy (chance 0.1) with its loss still at {sci(measured['final_train_loss_without_bn'])} (ln 10 = "
        f"{LN10:.3f}); with BatchNorm, same optimizer and steps, it reaches {measured['test_accuracy_with_bn']:.3f}. "
        f"At initialisation the first hidden layer gets {sci(grad_ratio['without BatchNorm'])} of the last one's "
        f"gradient without BatchNorm (each sigmoid passes at most 1/4, so {SIGMOID_DEPTH} layers allow at most "
        f"{bound:.2g}, and the small default weights shrink it further), against "
        f"{sci(grad_ratio['with BatchNorm'])} with it: re-standardising every pre-activation keeps each sigmoid in "
        "its steep middle range and the signal from collapsing to a constant, so gradient reaches every layer."
    )
    table = (["network", "test accuracy", "final training loss", "grad. first / last hidden layer (step 0)"],
             [[name, f"{mean(acc[name]):.3f}", sci(mean(loss[name])), sci(grad_ratio[name])] for name in results])
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- he2016-degradation ----------------------------------------------------------------------------


def bn_unit(width_in: int, width_out: int) -> list[nn.Module]:
    """Linear followed by BatchNorm, the weight layer of He et al.'s nets."""
    return [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out)]


def he_net(depth: int, residual: bool, *, width: int = 64, seed: int = 0) -> nn.Sequential:
    """``depth`` weight layers: Linear-BN-ReLU layers, in pairs wrapped in a shortcut when ``residual``.

    The residual version is He et al.'s: ``relu(x + BN(W2 relu(BN(W1 x))))`` for each pair of layers (the
    shortcut through gradguard's ``Residual`` with its scale starting at 1), the same layers as the plain net.
    He initialisation (``init_``), biases zero.
    """
    if depth < 4 or depth % 2:
        raise ValueError(f"depth must be even and at least 4, got {depth}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = [*bn_unit(64, width), nn.ReLU()]
    for _ in range((depth - 2) // 2):
        pair = [*bn_unit(width, width), nn.ReLU(), *bn_unit(width, width)]
        layers += [Residual(nn.Sequential(*pair), alpha_init=1.0)] if residual else pair
        layers.append(nn.ReLU())
    layers.append(nn.Linear(width, 10))
    return gradguard.init_(nn.Sequential(*layers), "kaiming")


@case(
    "he2016-degradation",
    title="Degradation: a deeper plain net trains worse, its residual version does not",
    question="Does a 50-layer plain network (with BatchNorm) reach a higher training loss than an 8-layer one in "
             "the same budget, and does adding shortcuts to the 50-layer net remove the gap?",
    setup="Digits; MLPs of width 64 built from Linear-BN-ReLU layers with He initialisation: plain with 8 and with "
          "50 weight layers, and the 50-layer one with an identity shortcut around each pair of layers (gradguard's "
          "Residual); SGD with momentum 0.9, lr 0.05, batches of 128, 400 steps (1500 and 3 seeds with "
          "--full); training loss over the last 10% of steps; gradients per layer from watch.",
    source=Source(
        citation="He, Zhang, Ren & Sun 2016, Deep Residual Learning for Image Recognition, CVPR, Sec. 4.1, "
                 "Fig. 1 and Fig. 4",
        claim="\"The deeper network has higher training error, and thus test error.\" (Fig. 1, plain nets); "
              "\"the 34-layer ResNet exhibits considerably lower training error and is generalizable to the "
              "validation data. This indicates that the degradation problem is well addressed in this setting\" "
              "(Sec. 4.1)",
        qualitative=True,
    ),
    group=GROUP,
)
def he2016_degradation(ctx: Context) -> Outcome:
    """Training loss of plain 8- and 50-layer nets and of the residual 50-layer net after a fixed budget."""
    steps = ctx.pick(400, 1500)
    deep = 50
    nets = {"plain-8": (8, False), f"plain-{deep}": (deep, False), f"residual-{deep}": (deep, True)}
    runs: dict[str, list[Run]] = {name: [] for name in nets}
    models: dict[str, nn.Module] = {}
    for seed in ctx.seeds(1, 3):
        data = digits(seed)
        for name, (depth, residual) in nets.items():
            model = he_net(depth, residual, seed=seed)
            runs[name].append(train(model, data, steps=steps, lr=0.05, seed=seed))
            if seed == ctx.seed:
                models[name] = model

    shallow, plain, res = (runs[n] for n in nets)
    loss = {name: [r.final_loss() for r in rs] for name, rs in runs.items()}
    grad_spread = {}
    for name, rs in runs.items():
        lin = linear_layers(rs[0].trace, models[name])
        g0 = rs[0].grad_norms_at_init()[lin]
        grad_spread[name] = float(g0[0] / g0[-1])
    tolerance = 0.05  # nats, ~2% of the initial ln 10: minibatch noise once both nets fit the data
    measured = {
        "train_loss_plain_8": finite(mean(loss["plain-8"])),
        f"train_loss_plain_{deep}": finite(mean(loss[f"plain-{deep}"])),
        f"train_loss_residual_{deep}": finite(mean(loss[f"residual-{deep}"])),
        "test_accuracy": {name: mean([r.test_accuracy for r in rs]) for name, rs in runs.items()},
        "grad_first_over_last_layer_at_init": {name: finite(v) for name, v in grad_spread.items()},
        "steps": steps,
    }
    expected = {
        f"train_loss_plain_{deep}_above": "train_loss_plain_8",
        f"train_loss_residual_{deep}_below": f"train_loss_plain_{deep}",
        f"train_loss_residual_{deep}_at_most": f"train_loss_plain_8 + {tolerance}",
        "rule": "degradation = the deeper plain net ends with the higher training loss; the residual net does not "
                f"degrade = lower than the deep plain net and not above the shallow one by more than {tolerance} "
                "nats; in every seed",
    }
    passed = all(
        p > s and r < p and r <= s + tolerance
        for s, p, r in zip(loss["plain-8"], loss[f"plain-{deep}"], loss[f"residual-{deep}"])
    )

    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    window = max(1, steps // 40)
    kernel = np.ones(window) / window
    for k, (name, rs) in enumerate(runs.items()):
        smooth = np.convolve(rs[0].loss, kernel, mode="valid")  # running mean: minibatch losses are noisy
        ax1.semilogy(np.arange(len(smooth)) + window, smooth, color=f"C{k}", label=name)
        lin = linear_layers(rs[0].trace, models[name])
        ax2.semilogy(range(1, len(lin) + 1), rs[0].grad_norms_at_init()[lin], "o-", ms=2, color=f"C{k}", label=name)
    ax1.set_xlabel("training step")
    ax1.set_ylabel(f"training loss (running mean of {window})")
    ax1.set_title("training loss", fontsize=10)
    ax1.legend(fontsize=8)
    layer_axis(ax2)
    ax2.set_ylabel("gradient norm at step 0 (watch)")
    ax2.set_title("gradient per layer at initialisation", fontsize=10)
    ax2.legend(fontsize=8)

    s, p, r = (mean(loss[n]) for n in nets)
    spread_plain, spread_res = grad_spread[f"plain-{deep}"], grad_spread[f"residual-{deep}"]
    interpretation = (
        f"After {steps} steps the {deep}-layer plain net is at training loss {sci(p)} against {sci(s)} for the 8-layer "
        "one: " + ("more layers, worse fit of the training data itself, so the gap is optimisation, not overfitting"
                   if p > s else "no degradation at this budget") + ". "
        f"The same {deep} layers with a shortcut around every pair reach {sci(r)}. "
        f"With BatchNorm the plain net's first layer gets {sci(spread_plain)} times the last one's gradient at "
        "initialisation: "
        + ("not vanishing, as He et al. argue, but growing towards the input, the gradient explosion of deep "
           "BatchNorm nets (Yang et al. 2019), so the deep plain map is hard to optimise"
           if spread_plain > 10 else "within an order of magnitude, healthy as He et al. report")
        + f"; with the shortcuts the ratio is {sci(spread_res)}: each pair learns a correction to the identity, "
        "so the gradient reaches the first layers through the skip path and depth no longer costs trainability."
    )
    table = (["network", "weight layers", "training loss (last 10%)", "test accuracy", "grad. first / last (step 0)"],
             [[name, nets[name][0], sci(mean(loss[name])), f"{mean([x.test_accuracy for x in runs[name]]):.3f}",
               sci(grad_spread[name])] for name in nets])
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- balduzzi2017-shattered ------------------------------------------------------------------------

SHATTER_WIDTH = 200  # the paper's 200 rectifiers per hidden layer
WHITE_NOISE = 0.2  # |lag-1 autocorrelation| of white noise over 256 points: sd 1/16, so 0.2 is ~3 sd


def grid_statistics(model: nn.Module) -> None:
    """Make every BatchNorm normalise with the statistics of the next batch it sees, then keep them fixed."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics


def feedforward_1d(depth: int, seed: int) -> nn.Module:
    """1 -> 200 -> ... -> 1 with ``depth`` hidden Linear-BN-ReLU layers, He initialisation."""
    model = gradguard.insert_normalization(mlp([1] + [SHATTER_WIDTH] * depth + [1], "relu", init="kaiming",
                                               seed=seed), "batch")
    grid_statistics(model)
    return model


def resnet_1d(depth: int, seed: int) -> nn.Module:
    """1 -> 200, then ``depth - 1`` blocks ``x + W relu(BN(x))`` (gradguard's Residual), ReLU, -> 1; He init."""
    torch.manual_seed(seed)
    blocks = [Residual(nn.Sequential(nn.BatchNorm1d(SHATTER_WIDTH), nn.ReLU(), nn.Linear(SHATTER_WIDTH, SHATTER_WIDTH)),
                       alpha_init=1.0) for _ in range(depth - 1)]
    model = nn.Sequential(nn.Linear(1, SHATTER_WIDTH), *blocks, nn.ReLU(), nn.Linear(SHATTER_WIDTH, 1))
    # Every Linear inside a block reads a ReLU's output: He's gain sqrt(2) throughout.
    gradguard.init_(model, "kaiming", activation="relu")
    grid_statistics(model)
    return model


def input_gradient(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """d output / d input at each point of ``x`` [n, 1], BatchNorm fixed to the grid's statistics."""
    model.train()
    with torch.no_grad():
        model(x)  # BatchNorm takes the grid's statistics (momentum None: exactly this batch's)
    model.eval()  # then each point's output depends on that point only, so the gradient is per point
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    assert xg.grad is not None
    return xg.grad[:, 0].double().numpy()


def lag1_autocorrelation(g: np.ndarray) -> float:
    """Sample autocorrelation at lag 1: near 1 for brown noise (a random walk), near 0 for white noise."""
    d = g - g.mean()
    return float(np.dot(d[:-1], d[1:]) / np.dot(d, d))


@case(
    "balduzzi2017-shattered",
    title="Shattered gradients: deep plain nets' input gradients become white noise, resnets' do not",
    question="Along a line of inputs, does the gradient of a deep feedforward ReLU net lose its correlation between "
             "neighbouring points as depth grows, while a residual net's stays correlated?",
    setup="1-D input, 256 points evenly spaced in [-2, 2]; 200 ReLU units per hidden layer with BatchNorm (its "
          "statistics those of the grid), He initialisation, untrained; feedforward Linear-BN-ReLU layers against "
          "residual blocks x + W relu(BN(x)); gradient of the output with respect to the input by autograd (watch "
          "measures parameter gradients, not input ones); lag-1 autocorrelation, averaged over 4 nets per depth "
          "(20, depths up to 100 with --full).",
    source=Source(
        citation="Balduzzi, Frean, Leary, Lewis, Ma & McWilliams 2017, The Shattered Gradients Problem, ICML, "
                 "Figs. 1-2 and Sec. 3",
        claim="\"the correlation between gradients in standard feedforward networks decays exponentially with depth "
              "resulting in gradients that resemble white noise whereas, in contrast, the gradients in "
              "architectures with skip-connections are far more resistant to shattering, decaying sublinearly\" "
              "(abstract); with batch normalisation a resnet's gradient correlations decay like 1/sqrt(L) (Sec. 3, "
              "paraphrase)",
        qualitative=False,
    ),
    group=GROUP,
)
def balduzzi2017_shattered(ctx: Context) -> Outcome:
    """Lag-1 autocorrelation of d output / d input along a line, feedforward vs residual, depth 2 to 50."""
    depths = ctx.pick([2, 5, 10, 20, 30, 50], [2, 3, 5, 10, 15, 20, 30, 40, 50, 75, 100])
    nets = ctx.pick(4, 20)  # the paper averages 20 runs
    x = torch.linspace(-2.0, 2.0, 256).reshape(-1, 1)
    builders = {"feedforward": feedforward_1d, "resnet": resnet_1d}
    acf: dict[str, list[float]] = {name: [] for name in builders}
    examples: dict[str, np.ndarray] = {}
    for depth in depths:
        for name, build in builders.items():
            values = []
            for k in range(nets):
                g = input_gradient(build(depth, ctx.seed * 1000 + k), x)
                values.append(lag1_autocorrelation(g))
                # Fig. 1's three curves: a shallow feedforward net, and both architectures at the largest depth.
                if k == 0 and (depth == depths[-1] or (depth == depths[0] and name == "feedforward")):
                    examples[f"{name}, depth {depth}"] = g
            acf[name].append(mean(values))

    deepest, shallowest = depths[-1], depths[0]
    ff, res = acf["feedforward"], acf["resnet"]
    sqrt_floor = res[0] * math.sqrt(shallowest / deepest)  # a 1/sqrt(L) decay from the shallowest net
    at_50 = depths.index(50)
    measured = {
        "depths": depths,
        "acf_lag1_feedforward": ff,
        "acf_lag1_resnet": res,
        "feedforward_acf_at_50": ff[at_50],
        "resnet_acf_at_50": res[at_50],
        "feedforward_acf_at_2": ff[0],
        "resnet_one_over_sqrt_depth_floor_at_deepest": sqrt_floor,
        "nets_per_depth": nets,
    }
    expected = {
        "feedforward_acf_at_50_within": [-WHITE_NOISE, WHITE_NOISE],
        "feedforward_acf_at_2_above": 0.8,
        "resnet_acf_at_deepest_at_least": "resnet_acf_at_shallowest * sqrt(shallowest / deepest)",
        "rule": "white noise = |lag-1 autocorrelation| < 0.2 (3 standard deviations of white noise's over 256 "
                "points); a shallow net's gradient is brown-noise-like (> 0.8); sublinear decay = the resnet's "
                "autocorrelation falls no faster than 1/sqrt(depth)",
    }
    passed = abs(ff[at_50]) < WHITE_NOISE and ff[0] > 0.8 and res[-1] >= sqrt_floor

    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, label in enumerate(sorted(examples, key=lambda e: ("resnet" in e, int(e.rsplit(" ", 1)[1])))):
        g = examples[label]
        color = "C1" if label.startswith("resnet") else "C0"
        ax1.plot(x[:, 0].numpy(), g / np.abs(g).max() + 2.5 * k, color=color, lw=0.8)
        ax1.text(-2.0, 2.5 * k + 1.05, label, fontsize=8, color=color)  # the curve's name, just above it
    ax1.set_xlabel("input x")
    ax1.set_ylabel("d output / dx (scaled, offset)")
    ax1.set_title("the gradient along the input line", fontsize=10)
    ax1.set_yticks([])
    ax2.plot(depths, ff, "o-", label="feedforward")
    ax2.plot(depths, res, "s-", label="resnet")
    ref = np.array(depths, dtype=float)
    ax2.plot(ref, res[0] * np.sqrt(shallowest / ref), "k:", label="1/sqrt(depth) from depth 2")
    ax2.axhspan(-WHITE_NOISE, WHITE_NOISE, color="0.85", label="white-noise band")
    ax2.set_xscale("log")
    ax2.set_xticks(depths, labels=[str(d) for d in depths])
    ax2.minorticks_off()
    ax2.set_xlabel("depth (hidden layers)")
    ax2.set_ylabel("lag-1 autocorrelation of the gradient")
    ax2.set_title("correlation between neighbouring gradients", fontsize=10)
    ax2.legend(fontsize=8)

    interpretation = (
        f"The feedforward net's input gradient goes from lag-1 autocorrelation {ff[0]:.2f} at depth {shallowest} "
        f"(a smooth, brown-noise-like curve) to {ff[at_50]:.3f} at depth 50, "
        + ("indistinguishable from white noise" if abs(ff[at_50]) < WHITE_NOISE else "still above white noise's band")
        + f", while the resnet's is {res[at_50]:.2f} at depth 50 and {res[-1]:.2f} at depth {deepest} (a 1/sqrt(depth) "
        f"decay from depth {shallowest} would give {sqrt_floor:.2f}). Each "
        "BatchNorm-centred ReLU layer switches half its units somewhere along the line, so the number of linear "
        "pieces multiplies with depth and neighbouring inputs soon take unrelated paths; in the resnet the identity "
        "path is shared by all inputs and each block only adds a small correction, so gradients at nearby points "
        "stay alike."
    )
    table = (["depth", "feedforward lag-1 ACF", "resnet lag-1 ACF"],
             [[d, f"{a:.3f}", f"{b:.3f}"] for d, a, b in zip(depths, ff, res)])
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- residual-variance -----------------------------------------------------------------------------


def stream_net(blocks: int, *, width: int, normalized: bool, alpha: float, seed: int) -> nn.Sequential:
    """Input Linear, then ``blocks`` residual blocks ``x + alpha * W relu([BN](x))``, ReLU, classifier; He init.

    Each block is gradguard's ``Residual``: a layer of its own (it owns ``alpha``), so diagnose's profile
    measures its output, the residual stream.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, width)]
    for _ in range(blocks):
        branch = ([nn.BatchNorm1d(width)] if normalized else []) + [nn.ReLU(), nn.Linear(width, width)]
        layers.append(Residual(nn.Sequential(*branch), alpha_init=alpha))
    layers += [nn.ReLU(), nn.Linear(width, 10)]
    return gradguard.init_(nn.Sequential(*layers), "kaiming", activation="relu")


@dataclass
class Stream:
    """Mean square of the residual stream at the input and after each block, and of each branch's output."""

    input_ms: float  # the input Linear's output: the stream entering block 1
    block_ms: np.ndarray  # [blocks]
    branch_ms: np.ndarray  # [blocks], before the branch's scale alpha
    kinds: list[str]  # diagnose's findings


def measure_stream(model: nn.Module, data: Data, seed: int) -> Stream:
    """The profile at initialisation from :func:`gradguard.diagnose` (no training steps), on 256 training digits."""
    x, y = data[0][:256], data[1][:256]
    d = gradguard.diagnose(model, (x, y), F.cross_entropy, steps=0, hessian=False, seed=seed)
    p = d.profile
    blocks = [i for i in p.order if p.types[i] == "Residual"]
    linears = [i for i in p.order if p.types[i] == "Linear"]
    branch = linears[1:-1]  # between the input layer and the classifier, one per block
    return Stream(float(p.out_ms[linears[0]]), p.out_ms[blocks], p.out_ms[branch], d.kinds)


@case(
    "residual-variance",
    title="The residual stream's variance doubles per block, unless normalisation or a small branch scale holds it",
    question="How does the signal's variance grow with depth in a residual net without normalisation, with "
             "BatchNorm in the branch, and with the branch scaled by 1/sqrt(depth)?",
    setup="Digits (256 training images); an input layer, 50 residual blocks x + alpha W relu([BN](x)) of width 256 "
          "(gradguard's Residual), He initialisation; no normalisation and alpha 1, BatchNorm in the branch and "
          "alpha 1, or no normalisation and alpha 1/sqrt(50); mean square of the stream after each block from "
          "diagnose's profile at initialisation, averaged over 4 nets (100 blocks of width 512, 8 nets with --full).",
    source=Source(
        citation="De & Smith 2020, Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep "
                 "Networks, NeurIPS, Sec. 2 and Fig. 2",
        claim="\"at initialization, batch normalization downscales the residual branch relative to the skip "
              "connection, by a normalizing factor on the order of the square root of the network depth\" "
              "(abstract); without normalisation the variance doubles on every residual block, with batch "
              "normalisation it grows linearly with depth, and a branch scaled by alpha <= 1/sqrt(depth) keeps it "
              "of order one (Sec. 2, paraphrase)",
        qualitative=False,
    ),
    group=GROUP,
)
def residual_variance(ctx: Context) -> Outcome:
    """Per-block mean square of the residual stream for the three variants, against the closed forms."""
    blocks = ctx.pick(50, 100)
    width = ctx.pick(256, 512)
    # The closed forms are expectations over the weights; one net of width n deviates by O(alpha / sqrt(n)) per
    # block (the stream-branch cross term), so each statistic is averaged over several nets.
    nets = ctx.pick(4, 8)
    scale = 1.0 / math.sqrt(blocks)
    variants = {"no normalisation": (False, 1.0), "BatchNorm in the branch": (True, 1.0),
                f"branch scaled by 1/sqrt({blocks})": (False, scale)}
    streams: dict[str, list[Stream]] = {name: [] for name in variants}
    data = digits(ctx.seed)
    for k in range(nets):
        seed = ctx.seed * 1000 + k
        for name, (normalized, alpha) in variants.items():
            model = stream_net(blocks, width=width, normalized=normalized, alpha=alpha, seed=seed)
            streams[name].append(measure_stream(model, data, seed))

    plain, normed, scaled = (streams[n] for n in variants)
    # Unnormalised: E[x_{l+1}^2] = E[x_l^2] + E[(W relu x_l)^2] = 2 E[x_l^2] (He init passes the half relu keeps).
    growth = mean([float(np.exp(np.mean(np.diff(np.log(np.r_[s.input_ms, s.block_ms]))))) for s in plain])
    # BatchNorm: the branch's output has mean square 1 whatever the stream, so E[x_l^2] = E[x_0^2] + l.
    bn_ratio = mean([float(s.block_ms[-1] / (s.input_ms + blocks)) for s in normed])
    # The skip path carries E[x_{L-1}^2] into the last block, the branch adds 1: their RMS ratio ~ sqrt(L).
    skip_over_branch = mean([float(math.sqrt(s.block_ms[-2] / s.branch_ms[-1])) for s in normed])
    # alpha^2 = 1/L: E[x_L^2] = (1 + 1/L)^L E[x_0^2], about e.
    closed_scaled = (1.0 + 1.0 / blocks) ** blocks
    scaled_growth = mean([float(s.block_ms[-1] / s.input_ms) for s in scaled])
    total_growth = mean([float(s.block_ms[-1] / s.input_ms) for s in plain])
    measured = {
        "growth_per_block_no_norm": growth,
        "total_growth_no_norm": total_growth,
        "bn_final_over_input_plus_depth": bn_ratio,
        "bn_skip_over_branch_rms_last_block": skip_over_branch,
        "scaled_total_growth": scaled_growth,
        "diagnose_findings_first_net": {name: ss[0].kinds for name, ss in streams.items()},
        "blocks": blocks,
        "width": width,
        "nets": nets,
    }
    expected = {
        "growth_per_block_no_norm": "2 +- 10%",
        "bn_final_over_input_plus_depth": "1 +- 15% (E[x_L^2] = E[x_0^2] + L)",
        "bn_skip_over_branch_rms_last_block": f"sqrt({blocks}) = {math.sqrt(blocks):.2f} +- 20%",
        "scaled_total_growth": f"(1 + 1/{blocks})^{blocks} = {closed_scaled:.3f} +- 15%",
    }
    passed = (
        abs(growth / 2.0 - 1.0) <= 0.10
        and abs(bn_ratio - 1.0) <= 0.15
        and abs(skip_over_branch / math.sqrt(blocks) - 1.0) <= 0.20
        and abs(scaled_growth / closed_scaled - 1.0) <= 0.15
    )

    # The stream per block averaged over the nets (the closed forms are expectations), from its input on.
    curves = {name: np.mean([np.r_[s.input_ms, s.block_ms] for s in ss], axis=0) for name, ss in streams.items()}
    # The closed forms from the stream entering block 1 (m0) after i blocks, in the order of ``variants``.
    none_name, bn_name, scaled_name = variants
    forms = {none_name: lambda m0, i: m0 * 2.0**i, bn_name: lambda m0, i: m0 + i,
             scaled_name: lambda m0, i: m0 * (1.0 + 1.0 / blocks) ** i}
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    index = np.arange(blocks + 1)
    for k, (name, curve) in enumerate(curves.items()):
        ax.semilogy(index, curve, color=f"C{k}", label=f"{name} (mean of {nets} nets)")
        ax.semilogy(index, forms[name](curve[0], index), "k:", lw=1,
                    label="closed forms: x 2 per block, + 1 per block, (1 + 1/L) per block" if k == 0 else None)
    ax.set_xlabel("residual block l (0: the input layer's output)")
    ax.set_ylabel("mean square of the residual stream (diagnose)")
    ax.set_title("signal propagation at initialisation", fontsize=10)
    ax.legend(fontsize=8)

    interpretation = (
        f"Without normalisation the stream's mean square grows by {growth:.3f} per block, "
        f"{sci(total_growth)} over {blocks} blocks: at He initialisation each branch adds as "
        "much variance as the stream already has, so it doubles. With BatchNorm at the branch's input the branch "
        f"always adds about 1, so the stream ends at {bn_ratio:.3f} times E[x_0^2] + L (linear growth) and in the last "
        f"block the skip path is {skip_over_branch:.2f} times the branch in RMS (sqrt({blocks}) = "
        f"{math.sqrt(blocks):.2f}): the deep blocks start close to the identity. Scaling the unnormalised branch by "
        f"1/sqrt({blocks}) gives the same effect without normalisation: total growth {scaled_growth:.3f} against "
        f"(1 + 1/L)^L = {closed_scaled:.3f}. diagnose's findings on the first net: "
        + "; ".join(f"{name}: {', '.join(ss[0].kinds) or 'none'}" for name, ss in streams.items()) + "."
    )
    table = (["variant", "stream mean square entering block 1", f"after block {blocks}", "closed form"],
             [[name, sci(float(c[0])), sci(float(c[-1])), sci(float(forms[name](c[0], blocks)))]
              for name, c in curves.items()])
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- skipinit-fixup --------------------------------------------------------------------------------

RESIDUAL_LAYERS = 50
FIXUP_M = 2  # weight layers per residual branch in the Fixup net


def one_layer_residual(alpha: float, *, width: int, seed: int) -> nn.Module:
    """An MLP with 50 blocks ``x + alpha * relu(W x + b)`` made by ``gradguard.residualize``; He initialisation."""
    model = mlp([64] + [width] * (RESIDUAL_LAYERS + 1) + [10], "relu", init="kaiming", seed=seed)
    return gradguard.residualize(model, alpha_init=alpha)


def two_layer_residual(fixup: bool, *, width: int, seed: int) -> nn.Module:
    """25 blocks ``x + s * W2 relu(W1 x + b1) + b2`` (gradguard's Residual, s its scalar starting at 1); He init.

    With ``fixup``: Fixup's rules (Zhang et al. 2019) for L = 25 branches of m = 2 layers: the last layer of
    each branch and the classifier zeroed (``zero_init_residual_``), the other branch layer scaled by
    L^(-1/(2m-2)); the scalar multiplier is the Residual's, and the Linear biases (zero) stand for the scalar biases.
    """
    torch.manual_seed(seed)
    branches = RESIDUAL_LAYERS // FIXUP_M
    firsts = [nn.Linear(width, width) for _ in range(branches)]
    blocks = [Residual(nn.Sequential(w1, nn.ReLU(), nn.Linear(width, width)), alpha_init=1.0) for w1 in firsts]
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), *blocks, nn.ReLU(), nn.Linear(width, 10))
    gradguard.init_(model, "kaiming", activation="relu")
    if fixup:
        first = 2  # index of the first block in the Sequential
        last_layers = [f"{first + i}.block.2" for i in range(branches)] + [str(len(model) - 1)]
        gradguard.zero_init_residual_(model, names=last_layers)
        with torch.no_grad():
            for w1 in firsts:
                w1.weight.mul_(branches ** (-1.0 / (2 * FIXUP_M - 2)))
    return model


@case(
    "skipinit-fixup",
    title="SkipInit and Fixup train a 50-layer residual net without normalisation; He initialisation does not",
    question="Without any normalisation, does a 50-layer residual MLP train when initialised with SkipInit or "
             "Fixup, and fail with standard He initialisation at the same learning rate?",
    setup="Digits; width 64, 50 residual weight layers, no normalisation; He init with 50 one-layer blocks "
          "x + alpha relu(Wx) (residualize, alpha 1) vs SkipInit (the same, alpha 0); He init with 25 two-layer "
          "blocks vs Fixup (zeroed last layers, first layers scaled by 25^(-1/2)); SGD with momentum 0.9, lr 0.05, "
          "batches of 128, 300 steps (1500 and 3 seeds with --full), stopped at a non-finite loss; largest layer "
          "gradient per step from watch.",
    source=Source(
        citation="De & Smith 2020, Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep "
                 "Networks, NeurIPS, Sec. 3 (SkipInit); Zhang, Dauphin & Ma 2019, Fixup Initialization: Residual "
                 "Learning Without Normalization, ICLR, Sec. 3",
        claim="\"We use this insight to develop a simple initialization scheme that can train deep residual networks "
              "without normalization.\" (De & Smith, abstract); \"We find training residual networks with Fixup to "
              "be as stable as training with normalization -- even for networks with 10,000 layers.\" (Zhang et "
              "al., abstract); a standard-initialised residual net without normalisation has exploding gradients "
              "at initialisation and does not train at the same learning rate (paraphrase)",
        qualitative=True,
    ),
    group=GROUP,
)
def skipinit_fixup(ctx: Context) -> Outcome:
    """Four 50-layer residual nets without normalisation trained with the same SGD settings."""
    steps = ctx.pick(300, 1500)
    width = 64
    builders: dict[str, Callable[[int], nn.Module]] = {
        "He init, 1-layer blocks": lambda s: one_layer_residual(1.0, width=width, seed=s),
        "SkipInit (alpha = 0)": lambda s: one_layer_residual(0.0, width=width, seed=s),
        "He init, 2-layer blocks": lambda s: two_layer_residual(False, width=width, seed=s),
        "Fixup": lambda s: two_layer_residual(True, width=width, seed=s),
    }
    failing = ("He init, 1-layer blocks", "He init, 2-layer blocks")
    working = ("SkipInit (alpha = 0)", "Fixup")
    runs: dict[str, list[Run]] = {name: [] for name in builders}
    for seed in ctx.seeds(1, 3):
        data = digits(seed)
        for name, build in builders.items():
            runs[name].append(train(build(seed), data, steps=steps, lr=0.05, seed=seed))

    def fails(r: Run) -> bool:
        return r.diverged_at is not None or r.test_accuracy <= CHANCE + 0.1

    def trains(r: Run) -> bool:
        return r.diverged_at is None and r.test_accuracy >= 0.8

    first = {name: rs[0] for name, rs in runs.items()}
    acc = {name: mean([r.test_accuracy for r in rs]) for name, rs in runs.items()}
    loss0 = {name: finite(float(r.loss[0])) if len(r.loss) else None for name, r in first.items()}
    gmax = {name: r.largest_grad_at_init() for name, r in first.items()}
    measured = {
        "test_accuracy": acc,
        "final_train_loss": {name: finite(mean([r.final_loss() for r in rs])) for name, rs in runs.items()},
        "diverged_at_step": {name: [r.diverged_at for r in rs] for name, rs in runs.items()},
        "loss_at_step_0": loss0,
        "largest_layer_grad_norm_at_step_0": gmax,
        "steps": steps,
    }
    expected = {
        "he_init_fails": "loss becomes non-finite, or test accuracy at most 20% (chance 10%)",
        "skipinit_and_fixup_train": "finite loss throughout and test accuracy at least 80%",
        "rule": "the same optimizer, learning rate and steps for all four; in every seed",
    }
    passed = all(fails(r) for n in failing for r in runs[n]) and all(trains(r) for n in working for r in runs[n])

    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, (name, r) in enumerate(first.items()):
        style = "--" if name in failing else "-"
        steps_axis = np.arange(len(r.loss))
        ax1.semilogy(steps_axis, r.loss, style, color=f"C{k}", lw=1, marker="x" if len(r.loss) < 5 else None,
                     label=name + (f" (diverged at step {r.diverged_at})" if r.diverged_at is not None else ""))
        # The largest layer gradient per step: at step 0 SkipInit's and Fixup's zeroed branches give most layers
        # an exactly zero gradient, which a per-layer plot on a log scale would hide.
        largest = r.trace.metric("grad_norm").max(axis=1)
        ax2.semilogy(r.trace.steps, largest, style, color=f"C{k}", lw=1, marker="x" if len(largest) < 5 else None,
                     label=name)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss (no normalisation)", fontsize=10)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("largest layer gradient norm (watch)")
    ax2.set_title("gradient size during training", fontsize=10)
    ax2.legend(fontsize=7)

    he1, skip, he2, fix = builders
    interpretation = (
        f"With He initialisation and no normalisation the residual stream doubles its variance per block, so the "
        f"first loss is already {sci(loss0[he1])} (1-layer blocks) and {sci(loss0[he2])} (2-layer blocks), the "
        f"largest layer gradient {sci(gmax[he1])} and {sci(gmax[he2])}, and SGD diverges at step "
        f"{first[he1].diverged_at} and {first[he2].diverged_at} (test accuracy {acc[he1]:.2f}, {acc[he2]:.2f}). "
        f"SkipInit's alpha = 0 and Fixup's zeroed last layers make every block the identity at initialisation "
        f"(first loss {sci(loss0[skip])}, {sci(loss0[fix])}; largest gradient {sci(gmax[skip])}, {sci(gmax[fix])}), "
        f"and both train at the same learning rate to test accuracy {acc[skip]:.3f} and {acc[fix]:.3f}: the "
        "branches grow only as fast as training asks, which is what BatchNorm's down-scaling of the branch achieves."
    )
    table = (["initialisation", "loss at step 0", "largest grad. norm (step 0)", "diverged at step",
              "test accuracy"],
             [[name, sci(loss0[name]), sci(gmax[name]), "-" if r.diverged_at is None else r.diverged_at,
               f"{acc[name]:.3f}"] for name, r in first.items()])
    return Outcome(measured, expected, passed, fig, interpretation, table)
