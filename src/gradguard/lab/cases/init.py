"""The lab's initialisation cases: how the initial weights decide whether signals and gradients cross depth.

Sigmoid saturation and gradient variance across depth (Glorot & Bengio), Xavier vs He in deep ReLU networks,
dynamical isometry and deep linear learning times (Saxe et al., Pennington et al.), mean-field q* and chi_1
(Poole et al.) and trainability at depth 60 (Schoenholz et al.).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import gradguard
from gradguard.lab.case import Context, Outcome, Source, case, finite
from gradguard.lab.data import digits
from gradguard.lab.models import mlp
from gradguard.theory import critical_sigma_w2, mean_field

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradguard.trace import Trace

GROUP = "init"
LN10 = math.log(10.0)  # cross-entropy of a uniform guess over ten classes: the loss of a network that learnt nothing


# -- shared helpers ---------------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    """A matplotlib figure made without pyplot, as the lab's report wants."""
    from gradguard.report.html import new_figure  # imported here: the report module pulls in jinja2

    return new_figure(width, height)


def _linears(model: nn.Module) -> list[nn.Linear]:
    """The model's Linear layers in registration order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _zero_biases(model: nn.Module) -> None:
    """Set every Linear bias to 0, as the sources do."""
    with torch.no_grad():
        for lin in _linears(model):
            if lin.bias is not None:
                lin.bias.zero_()


def _pixels(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits with raw pixel intensities scaled to [0, 1], the kind of image input the Glorot & Bengio study used."""
    x_train, y_train, x_test, y_test = digits(seed, standardize=False)
    return x_train / 16.0, y_train, x_test / 16.0, y_test  # the digits' grey levels run from 0 to 16


def _generator(seed: int) -> torch.Generator:
    """A generator for data drawn by a case (inputs, mini-batches), on a stream apart from the weights'.

    ``mlp(seed=...)`` draws the weights from a generator seeded with ``seed``; drawing inputs from the same
    stream would make the first weight rows copies of the first inputs.
    """
    return torch.Generator().manual_seed(1_000_003 + seed)


def _batches(n: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Indices of ``steps`` mini-batches drawn with replacement from a seeded generator."""
    g = _generator(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=g)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float((model(x).argmax(1) == y).float().mean())


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch: int,
    seed: int,
    every: int = 1,
    activations_every: int = 0,
) -> tuple[np.ndarray, Trace]:
    """Mini-batch cross-entropy training under ``gradguard.watch``: the loss of every step and the watch's trace."""
    losses = np.empty(steps)
    with gradguard.watch(model, every=every, weights_every=0, activations_every=activations_every) as w:
        for step, idx in enumerate(_batches(len(x), batch, steps, seed)):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            w.step(loss=loss.detach())
            optimizer.step()
            losses[step] = float(loss.detach())
    return losses, w.trace


def _weight_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Each Linear layer's weight-gradient norm for the cross-entropy on (x, y), through ``gradguard.watch``.

    watch's ``grad_norm`` covers all of a layer's parameters; on a copy with frozen biases it is the weights' alone
    (a bias gradient is dL/ds summed over the batch, not scaled by the layer's input, and would swamp a vanishing
    weight gradient).
    """
    probe = copy.deepcopy(model)
    for lin in _linears(probe):
        if lin.bias is not None:
            lin.bias.requires_grad_(False)
    with gradguard.watch(probe, weights_every=0, activations_every=0) as w:
        F.cross_entropy(probe(x), y).backward()
        w.step()
    return w.trace.metric("grad_norm")[0]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so that entry t summarises steps t - window + 1 .. t."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _first_below(values: np.ndarray, threshold: float) -> int | None:
    """Index of the first entry below ``threshold``, or None."""
    hits = np.flatnonzero(values < threshold)
    return int(hits[0]) if len(hits) else None


def _mean(values: list[float]) -> float:
    """The mean as a plain float."""
    return float(np.mean(values))


def _gauss_expect(f: Callable[[np.ndarray], np.ndarray], q: float) -> float:
    """E[f(h)] for h ~ N(0, q), by 100-node Gauss-Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(100)
    return float(np.dot(w / w.sum(), f(math.sqrt(q) * z)))


def _plain_log_ticks(ax: Axes) -> None:
    """Plain numbers (20, 50, 100) instead of powers of ten on a log-scaled y axis."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _pct(x: float) -> str:
    """A fraction as a whole percentage."""
    return f"{100 * x:.0f}%"


# -- Glorot & Bengio 2010: the top sigmoid layer saturates ------------------------------------------------------------
@case(
    "glorot2010-saturation",
    title="Sigmoid networks drive their top hidden layer into saturation",
    question="With the standard initialisation, does a deep sigmoid network push its top hidden layer's activations "
    "to 0 within its first epoch while the lower layers stay at 0.5 or above?",
    setup="Digits (pixels in [0, 1]), 5 hidden sigmoid layers of 256 units (512 with --full), weights "
    "U[-1/sqrt(n), 1/sqrt(n)] and zero biases, plain SGD (learning rate 1, mini-batches of 10) for 1500 steps "
    "(about 10 epochs); gradguard.watch samples every layer's activation mean and saturation every 5 steps.",
    source=Source(
        citation="Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks, "
        "AISTATS, abstract, Sec. 3.1 and Fig. 2",
        claim='"The logistic sigmoid activation is unsuited for deep networks with random initialization because of '
        'its mean value, which can drive especially the top hidden layer into saturation." (abstract); very early in '
        "training all the activations of the last hidden layer are pushed to their lower saturation value 0, while "
        "the other hidden layers keep a mean activation around 0.5 or above (Sec. 3.1, paraphrase).",
        qualitative=True,
    ),
    group=GROUP,
)
def glorot2010_saturation(ctx: Context) -> Outcome:
    """Train a 5-hidden-layer sigmoid MLP and follow each layer's mean activation and saturation through watch."""
    width, steps, sample = ctx.pick(256, 512), ctx.pick(1500, 3000), 5
    runs = []
    for seed in ctx.seeds(1, 3):
        x, y, x_test, y_test = _pixels(seed)
        # PyTorch's default Linear weights are U[-1/sqrt(fan_in), 1/sqrt(fan_in)]: the source's "standard" init.
        model = mlp([64] + [width] * 5 + [10], "sigmoid", seed=seed)
        _zero_biases(model)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        losses, trace = _train(model, x, y, opt, steps=steps, batch=10, seed=seed, activations_every=sample)
        rows = ~np.isnan(trace.metric("act_mean")[:, 0])  # the sampled steps
        runs.append({
            "steps": trace.steps[rows], "mean": trace.metric("act_mean")[rows][:, :5],
            "std": trace.metric("act_std")[rows][:, :5], "sat": trace.metric("act_saturated")[rows][:, :5],
            "loss": losses, "accuracy": _accuracy(model, x_test, y_test),
        })

    epoch = math.ceil(len(_pixels(ctx.seed)[0]) / 10)  # mini-batches of 10 in one pass over the training set
    top_init = _mean([r["mean"][0, 4] for r in runs])
    top_final = _mean([r["mean"][-1, 4] for r in runs])
    sat_final = _mean([r["sat"][-1, 4] for r in runs])
    # The step by which the top layer's mean fell below 0.1, the latest over seeds (None if one never did).
    hits = [_first_below(r["mean"][:, 4], 0.1) for r in runs]
    saturate_step = None if None in hits else max(int(r["steps"][h]) for r, h in zip(runs, hits))
    lower_final = [_mean([r["mean"][-1, k] for r in runs]) for k in range(4)]
    accuracy = _mean([r["accuracy"] for r in runs])
    final_loss = _mean([float(np.mean(r["loss"][-100:])) for r in runs])
    peak_loss = max(float(_smooth(r["loss"], 50).max()) for r in runs)

    expected = {
        "top_layer_mean_at_init_above": 0.4,
        "top_layer_mean_falls_below_0.1_within_steps": epoch,  # "very quickly": within the first epoch
        "top_layer_mean_final_below": 0.1,
        "top_layer_saturated_fraction_final_above": 0.5,
        "lower_layers_mean_final_above": 0.4,
    }
    passed = (
        top_init > 0.4 and saturate_step is not None and saturate_step <= epoch and top_final < 0.1 and sat_final > 0.5
        and min(lower_final) > 0.4
    )
    measured = {
        "top_layer_mean_at_init": top_init,
        "top_layer_mean_falls_below_0.1_at_step": saturate_step,
        "top_layer_mean_final": top_final,
        "top_layer_saturated_fraction_final": sat_final,
        "lower_layers_mean_final": lower_final,
        "final_train_loss": final_loss,
        "peak_train_loss_50_step_mean": peak_loss,
        "test_accuracy": accuracy,
        "seeds": len(runs),
    }

    fig = _figure(10, 3.6)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    r = runs[0]
    for k in range(5):
        label = f"hidden layer {k + 1}" + (" (top)" if k == 4 else "")
        ax.plot(r["steps"], r["mean"][:, k], label=label)
        ax.fill_between(r["steps"], r["mean"][:, k] - r["std"][:, k], r["mean"][:, k] + r["std"][:, k], alpha=0.15)
    ax.set_ylabel("sigmoid output: mean ± std")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("activations per hidden layer")
    ax2.plot(r["steps"], r["sat"][:, 4], color="C4", label="top layer: fraction within 1% of 0 or 1")
    ax2.set_ylabel("fraction saturated")
    ax2.set_ylim(-0.02, 1.05)
    ax2.set_title("saturation of the top layer, and the loss")
    loss_ax = ax2.twinx()
    loss_ax.plot(np.arange(len(r["loss"])), _smooth(r["loss"], 50), color="0.4", lw=1, label="training loss (right)")
    loss_ax.set_ylabel("training loss (50-step mean)")
    for a in (ax, ax2):
        a.set_xscale("symlog", linthresh=10)  # the top layer saturates within tens of steps: stretch the start
        a.set_xlim(0, steps)
        a.set_xlabel("training step (mini-batches of 10)")
    handles = ax2.get_legend_handles_labels()
    extra = loss_ax.get_legend_handles_labels()
    ax2.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="center right")
    ax.legend(fontsize=8)

    interpretation = (
        f"The top hidden layer's mean activation fell from {top_init:.2f} at initialisation to {top_final:.3f} "
        + (f"(below 0.1 by step {saturate_step}) " if saturate_step is not None else "(never below 0.1) ")
        + f"and {_pct(sat_final)} of its outputs ended within 1% of 0, while the lower layers kept means of "
        f"{min(lower_final):.2f} to {max(lower_final):.2f}. "
        "With the standard initialisation each sigmoid layer shrinks how much its output varies with the input, so "
        "early on the top layer's activations (mean about 0.5) carry little information and mainly add an "
        "input-independent offset to the logits; the gradient removes that offset by driving them to 0, where the "
        "sigmoid's slope is small and the units stay stuck (the large first updates of that offset overshoot: the "
        f"loss peaked at {peak_loss:.1f}). The network was still on its plateau at the end (training loss "
        f"{final_loss:.2f} against ln 10 = 2.30, "
        f"test accuracy {_pct(accuracy)}); the slow desaturation the source sees much later is not followed here."
    )
    table = (
        ["hidden layer", "mean at init", "mean at the end", "saturated at the end"],
        [[k + 1, round(_mean([r["mean"][0, k] for r in runs]), 3), round(_mean([r["mean"][-1, k] for r in runs]), 3),
          round(_mean([r["sat"][-1, k] for r in runs]), 3)] for k in range(5)],
    )
    return Outcome(measured, expected, bool(passed), fig, interpretation, table)


# -- Glorot & Bengio 2010: back-propagated gradients shrink towards the input with the standard init ------------------
def _glorot_tanh(width: int, seed: int, normalised: bool) -> nn.Sequential:
    """5 hidden tanh layers with the standard init (PyTorch's default weights, zero biases) or the normalised one."""
    model = mlp([64] + [width] * 5 + [10], "tanh", seed=seed)
    if normalised:
        torch.manual_seed(seed)
        # Glorot & Bengio's normalised init has no activation gain: U[+-sqrt(6 / (fan_in + fan_out))]. gradguard's
        # "xavier" multiplies by the gain of the activation that follows (5/3 for tanh); activation="linear" makes it 1.
        gradguard.init_(model, "xavier", distribution="uniform", activation="linear")
    else:
        _zero_biases(model)
    return model


@case(
    "glorot2010-gradient-variance",
    title="Back-propagated gradients across depth: standard vs normalised initialisation",
    question="At initialisation, does the variance of dL/d(pre-activation) shrink towards the input with the standard "
    "initialisation and stay flat with the normalised one, while the weight gradients' variance is flat in both?",
    setup="Digits (pixels in [0, 1]), 5 hidden tanh layers of 512 units (1000 with --full), one forward and backward "
    "pass on the 1437 training images at initialisation: gradguard.diagnose(steps=0) gives each layer's mean square "
    "of dL/dy, gradguard.watch the weight-gradient norms (biases frozen on a copy); normalised init by "
    "gradguard.init_(model, 'xavier').",
    source=Source(
        citation="Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks, "
        "AISTATS, Sec. 4.2 and Figs. 6-8",
        claim="(paraphrase) With the standard initialisation W ~ U[-1/sqrt(n), 1/sqrt(n)] the variance of the "
        "back-propagated gradients decreases as one goes from the output layer towards the input layer (n Var[W] = "
        "1/3 per layer in the linear regime), whereas with the normalised initialisation, Var[W] = 2/(n_in + n_out), "
        "it stays about the same across layers; the variance of the weight gradients is roughly the same for all "
        "layers in both cases.",
    ),
    group=GROUP,
)
def glorot2010_gradient_variance(ctx: Context) -> Outcome:
    """Per-layer variance of dL/ds (diagnose's profile) and of the weight gradients (watch), both inits."""
    width = ctx.pick(512, 1000)
    results: dict[str, dict[str, list[np.ndarray]]] = {k: {"bp": [], "wg": []} for k in ("standard", "normalised")}
    for seed in ctx.seeds(1, 3):
        x, y, _, _ = _pixels(seed)
        for name in results:
            model = _glorot_tanh(width, seed, normalised=name == "normalised")
            d = gradguard.diagnose(model, (x, y), F.cross_entropy, steps=0, hessian=False, seed=seed)
            results[name]["bp"].append(d.profile.grad_ms[:5])  # the 5 hidden Linear layers, input side first
            numel = np.array([lin.weight.numel() for lin in _linears(model)], dtype=np.float64)
            results[name]["wg"].append((_weight_grad_norms(model, x, y) ** 2 / numel)[:5])

    summary: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        bp = np.exp(np.mean(np.log(np.array(r["bp"])), axis=0))  # geometric mean over seeds
        wg = np.exp(np.mean(np.log(np.array(r["wg"])), axis=0))
        square = wg[1:]  # hidden layers 2-5: fan-in = fan-out = width, where the source's equal-width argument holds
        summary[name] = {
            "backprop_variance": [float(v) for v in bp],
            "backprop_per_layer_factor": float((bp[0] / bp[4]) ** 0.25),  # towards the input, per layer
            "backprop_decreases_towards_input": bool(np.all(np.diff(bp) > 0)),
            "weight_grad_variance": [float(v) for v in wg],
            "weight_grad_spread_square_layers": float(square.max() / square.min()),
        }
    std, norm = summary["standard"], summary["normalised"]
    expected = {
        "standard_backprop_per_layer_factor_below": 0.5,  # theory (linear regime): n Var[W] = 1/3
        "standard_backprop_decreases_towards_input": True,
        "normalised_backprop_per_layer_factor_between": [0.8, 1.25],  # theory: 1
        "weight_grad_spread_square_layers_below": 2.0,  # theory: equal (max/min = 1), both inits
    }
    passed = (
        std["backprop_per_layer_factor"] < 0.5 and std["backprop_decreases_towards_input"]
        and 0.8 <= norm["backprop_per_layer_factor"] <= 1.25
        and std["weight_grad_spread_square_layers"] < 2.0 and norm["weight_grad_spread_square_layers"] < 2.0
    )
    measured = {f"{name}_{k}": v for name, s in summary.items() for k, v in s.items()}
    measured["seeds"] = len(ctx.seeds(1, 3))

    fig = _figure(10, 3.6)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    layers = np.arange(1, 6)
    for name, s, color in (("standard", std, "C3"), ("normalised", norm, "C0")):
        bp = np.array(s["backprop_variance"])
        ax.plot(layers, bp, "o-", color=color, label=f"{name} init")
        ax2.plot(layers, s["weight_grad_variance"], "o-", color=color, label=f"{name} init")
    top = std["backprop_variance"][4]
    ax.plot(layers, top * (1 / 3) ** (5 - layers), ":", color="C3", label="linear-regime theory: x 1/3 per layer")
    ax.plot(layers, np.full(5, norm["backprop_variance"][4]), ":", color="C0", label="linear-regime theory: flat")
    for a, title, ylabel in (
        (ax, "back-propagated gradient", "Var[dL/ds] (mean square)"),
        (ax2, "weight gradient", "mean square of the layer's gradient"),
    ):
        a.set_yscale("log")
        a.set_xticks(layers)
        a.set_xlabel("hidden layer (1 = next to the input)")
        a.set_ylabel(ylabel)
        a.set_title(title)
        a.legend(fontsize=8)

    interpretation = (
        f"With the standard initialisation the variance of dL/ds shrinks by a factor "
        f"{std['backprop_per_layer_factor']:.2f} per layer towards the input "
        f"({std['backprop_variance'][0] / std['backprop_variance'][4]:.1e} over the 5 hidden layers), close to the "
        f"1/3 per layer of n Var[W] = 1/3; with the normalised initialisation the factor is "
        f"{norm['backprop_per_layer_factor']:.2f}, the small remaining shrink being tanh's slope below 1 (the "
        "linear-regime argument ignores it). "
        f"The weight gradients' mean square varies by only {std['weight_grad_spread_square_layers']:.2f}x (standard) "
        f"and {norm['weight_grad_spread_square_layers']:.2f}x (normalised) across the equal-width hidden layers: a "
        "weight gradient is the product of the layer's input, which shrinks going up with the standard init, and of "
        "dL/ds, which shrinks going down, and the two effects cancel."
    )
    table = (
        ["hidden layer", "Var[dL/ds] standard", "Var[dL/ds] normalised", "weight grad standard",
         "weight grad normalised"],
        [[k + 1, f"{std['backprop_variance'][k]:.3g}", f"{norm['backprop_variance'][k]:.3g}",
          f"{std['weight_grad_variance'][k]:.3g}", f"{norm['weight_grad_variance'][k]:.3g}"] for k in range(5)],
    )
    return Outcome(measured, expected, bool(passed), fig, interpretation, table)


# -- He et al. 2015: Xavier stalls a 30-layer ReLU net, He init trains it ----------------------------------------------
def _relu_net(depth: int, seed: int, scheme: str) -> nn.Sequential:
    """``depth`` weight layers of 64 ReLU units on digits, initialised by gradguard.init_ with zero biases."""
    model = mlp([64] + [64] * (depth - 1) + [10], "relu", seed=seed)
    torch.manual_seed(seed)
    if scheme == "xavier":
        # The "Xavier" He et al. compare against is Var[W] = 1/n (no ReLU gain): activation="linear" gives gain 1.
        gradguard.init_(model, "xavier", activation="linear")
    else:
        gradguard.init_(model, "kaiming")  # Var[W] = 2 / fan_in after each ReLU
    return model


@case(
    "he2015-relu-depth",
    title="Xavier vs He initialisation in deep ReLU networks",
    question="Does a 30-layer ReLU network stall with Xavier initialisation but train with He initialisation, while a "
    "shallower one trains with both, He's first?",
    setup="Digits (standardised), plain ReLU MLPs of 64 units with 30 and 12 weight layers, zero biases, SGD with "
    "momentum 0.9 (learning rate 0.003, mini-batches of 64) for 600 steps (30 layers) and 1200 steps (12 layers); "
    "gradguard.watch measures every layer's weight-gradient norm at initialisation.",
    source=Source(
        citation="He, Zhang, Ren & Sun 2015, Delving Deep into Rectifiers, ICCV, Sec. 2.2 and Figs. 2-3",
        claim="(paraphrase) A 22-layer model converges with both initialisations, but the proposed one starts "
        "reducing the error earlier (Fig. 2); for a 30-layer model the proposed initialisation is able to make it "
        "converge, whereas \"Xavier\" completely stalls, its gradients all diminishing (Fig. 3).",
        qualitative=True,
    ),
    group=GROUP,
)
def he2015_relu_depth(ctx: Context) -> Outcome:
    """Train 30- and 12-layer ReLU MLPs with Xavier and He init; compare loss curves, accuracy and gradients."""
    budgets = {30: 600, 12: 1200}
    long_steps = ctx.pick(0, 4000)  # --full: follow the 30-layer Xavier run much longer than the budget
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {(d, s): [] for d in budgets for s in ("xavier", "kaiming")}
    escapes: list[int | None] = []
    for seed in ctx.seeds(1, 3):
        x, y, x_test, y_test = digits(seed)
        for (depth, scheme), out in runs.items():
            model = _relu_net(depth, seed, scheme)
            grad0 = _weight_grad_norms(model, x, y)
            opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
            losses, _ = _train(model, x, y, opt, steps=budgets[depth], batch=64, seed=seed, every=10)
            smooth = _smooth(losses, 50)
            out.append({
                "loss": smooth, "final_loss": float(np.mean(losses[-50:])), "half": _first_below(smooth, 0.5 * LN10),
                "grad0": grad0, "accuracy": _accuracy(model, x_test, y_test),
            })
        if long_steps:
            model = _relu_net(30, seed, "xavier")
            opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
            losses, _ = _train(model, x, y, opt, steps=long_steps, batch=64, seed=seed, every=100)
            escapes.append(_first_below(_smooth(losses, 50), 0.95 * LN10))

    def avg(depth: int, scheme: str, key: str) -> float:
        return _mean([r[key] for r in runs[(depth, scheme)]])

    def half(depth: int, scheme: str) -> int | None:
        hits = [r["half"] for r in runs[(depth, scheme)]]
        return None if None in hits else max(hits)

    # Every hidden layer's weight-gradient norm at initialisation, Xavier over He (largest over layers and seeds).
    pairs = zip(runs[(30, "xavier")], runs[(30, "kaiming")])
    ratios = np.array([rx["grad0"][:-1] / rk["grad0"][:-1] for rx, rk in pairs])
    grad_ratio = float(ratios.max())
    # Signal propagation: Var[W] = 1/n instead of 2/n halves each of the 29 ReLU layers' contribution to the
    # squared norm of both the forward signal and the backward gradient, so a weight gradient is 2^-14.5 as large.
    grad_theory = 0.5 ** ((30 - 1) / 2)
    measured: dict[str, Any] = {}
    for depth in budgets:
        for scheme, label in (("xavier", "xavier"), ("kaiming", "he")):
            measured[f"{label}_{depth}_test_accuracy"] = avg(depth, scheme, "accuracy")
            measured[f"{label}_{depth}_final_loss"] = avg(depth, scheme, "final_loss")
            measured[f"{label}_{depth}_steps_to_half_initial_loss"] = half(depth, scheme)
    measured["xavier_30_hidden_grad_norm_over_he_max"] = grad_ratio
    measured["xavier_30_hidden_grad_norm_over_he_median"] = float(np.median(ratios))
    measured["xavier_30_grad_norm_over_he_theory"] = grad_theory
    if long_steps:
        left = [e for e in escapes if e is not None]
        measured["xavier_30_steps_until_loss_leaves_plateau"] = max(left) if len(left) == len(escapes) else None
        measured["xavier_30_long_run_steps"] = long_steps
    measured["seeds"] = len(ctx.seeds(1, 3))

    expected = {
        "he_30_test_accuracy_above": 0.8,  # trains: far above chance (10%)
        "xavier_30_final_loss_at_least": round(0.95 * LN10, 4),  # stalls: within 5% of the initial ln 10
        "xavier_30_test_accuracy_below": 0.2,
        "xavier_30_hidden_grad_norm_over_he_below": 0.01,  # its gradients all diminish (every hidden layer)
        "both_12_test_accuracy_above": 0.8,
        "he_12_halves_the_loss_first": True,
    }
    h12, x12 = half(12, "kaiming"), half(12, "xavier")
    he_first = h12 is not None and (x12 is None or h12 < x12)
    passed = (
        measured["he_30_test_accuracy"] > 0.8 and measured["xavier_30_final_loss"] >= 0.95 * LN10
        and measured["xavier_30_test_accuracy"] < 0.2 and grad_ratio < 0.01
        and measured["xavier_12_test_accuracy"] > 0.8 and measured["he_12_test_accuracy"] > 0.8 and he_first
    )

    fig = _figure(13, 3.6)
    axes = [fig.add_subplot(1, 3, k) for k in (1, 2, 3)]
    for ax, depth in zip(axes, (30, 12)):
        for scheme, label, color in (("kaiming", "He", "C3"), ("xavier", "Xavier", "C0")):
            curve = runs[(depth, scheme)][0]["loss"]
            ax.plot(np.arange(len(curve)), curve, color=color, label=f"{label} init")
        ax.axhline(LN10, color="0.5", ls=":", lw=1, label="ln 10 (chance)")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (50-step mean)")
        ax.set_title(f"{depth} layers")
        ax.legend(fontsize=8)
    ax = axes[2]
    for scheme, label, color in (("kaiming", "He", "C3"), ("xavier", "Xavier", "C0")):
        g = runs[(30, scheme)][0]["grad0"]
        ax.plot(np.arange(1, len(g) + 1), g, "o-", ms=3, color=color, label=f"{label} init")
    ax.set_yscale("log")
    ax.set_xlabel("layer (1 = next to the input)")
    ax.set_ylabel("weight-gradient norm at initialisation")
    ax.set_title("30 layers: gradients at initialisation")
    ax.legend(fontsize=8)

    long_text = ""
    if long_steps:
        esc = measured["xavier_30_steps_until_loss_leaves_plateau"]
        long_text = (
            f" Followed for {long_steps} steps, the 30-layer Xavier network "
            + (f"left its plateau after at most {esc} steps (the slowest of {len(escapes)} seeds): at this small scale "
               "the stall is a long delay rather than a permanent failure." if esc is not None
               else "did not leave its plateau in every seed.")
        )
    interpretation = (
        f"At 30 layers He initialisation reached {_pct(measured['he_30_test_accuracy'])} test accuracy in 600 steps "
        f"while Xavier stayed at a loss of {measured['xavier_30_final_loss']:.3f} (ln 10 = 2.303) and "
        f"{_pct(measured['xavier_30_test_accuracy'])} accuracy; its hidden layers' weight gradients were "
        f"{measured['xavier_30_hidden_grad_norm_over_he_median']:.1e} of He's (median; at most {grad_ratio:.1e}). "
        "With Var[W] = 1/n each ReLU layer halves the signal's second moment, so after 29 layers the output barely "
        f"depends on the input and every weight gradient is scaled down by 2^-14.5 = {grad_theory:.1e}; He's 2/n "
        "keeps both at scale. "
        f"At 12 layers both train ({_pct(measured['he_12_test_accuracy'])} He, "
        f"{_pct(measured['xavier_12_test_accuracy'])} Xavier), He halving the loss by step {h12} and Xavier by "
        f"step {x12}." + long_text
    )
    table = (
        ["layers", "init", "test accuracy", "final loss", "steps to half the initial loss"],
        [[depth, label, round(measured[f"{key}_{depth}_test_accuracy"], 3),
          round(measured[f"{key}_{depth}_final_loss"], 3), measured[f"{key}_{depth}_steps_to_half_initial_loss"]]
         for depth in budgets for key, label in (("he", "He"), ("xavier", "Xavier"))],
    )
    return Outcome(measured, expected, bool(passed), fig, interpretation, table)


# -- Saxe et al. 2014 / Pennington et al. 2017: dynamical isometry of the input-output Jacobian -----------------------
def _critical_tanh(width: int, depth: int, sigma_w2: float, sigma_b2: float, seed: int, orthogonal: bool) -> nn.Module:
    """``depth`` tanh layers (each Linear followed by tanh) with Gaussian or scaled orthogonal weights."""
    model = mlp([width] * (depth + 1), "tanh", sigma_w2=sigma_w2, sigma_b2=sigma_b2, seed=seed)
    if orthogonal:
        biases = [lin.bias.detach().clone() for lin in _linears(model)]
        torch.manual_seed(seed)
        gradguard.init_(model, "orthogonal", activation="linear")  # gain 1: every singular value of W is 1
        with torch.no_grad():
            for lin, b in zip(_linears(model), biases):
                # init_ has no free gain: scale Q to sigma_w and keep the Gaussian net's biases, so only W differs.
                lin.weight.mul_(math.sqrt(sigma_w2))
                lin.bias.copy_(b)
    return nn.Sequential(*model, nn.Tanh())


def _jacobian_spectrum(net: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Squared singular values of the input-output Jacobian at each input, pooled.

    In float64: a deep Gaussian network's smallest singular values lie far below float32's resolution of the
    largest ones, where they would pile up at round-off.
    """
    net = copy.deepcopy(net).double()
    out = []
    for x in inputs.double():
        jac = torch.autograd.functional.jacobian(net, x, vectorize=True)
        out.append(torch.linalg.svdvals(jac).numpy() ** 2)
    return np.concatenate(out)


@case(
    "saxe2014-orthogonal-jacobian",
    title="Dynamical isometry: the Jacobian's singular values with orthogonal vs Gaussian weights",
    question="At the edge of chaos, do orthogonal weights keep the input-output Jacobian of a deep tanh network "
    "well-conditioned at every depth while Gaussian weights spread its singular values more and more with depth?",
    setup="Random tanh networks of width 256 (512 with --full) and depth 2 to 32 (64 with --full) on the critical "
    "line (sigma_b^2 = 1e-5, sigma_w^2 from gradguard.theory.critical_sigma_w2), Gaussian weights vs "
    "gradguard.init_(model, 'orthogonal') scaled to the same sigma_w; Jacobian by torch.autograd at random inputs "
    "whose pre-activations start at the fixed point q*.",
    source=Source(
        citation="Saxe, McClelland & Ganguli 2014, ICLR, abstract; Pennington, Schoenholz & Ganguli 2017, Resurrecting "
        "the sigmoid in deep learning through dynamical isometry, NeurIPS, abstract and Sec. 2",
        claim='"Ensuring the mean squared singular value of a network\'s input-output Jacobian is O(1) is essential '
        "for avoiding exponentially vanishing or exploding gradients. [...] sigmoidal networks can achieve isometry, "
        'but only with orthogonal weight initialization." (Pennington et al., abstract). Free probability gives the '
        "spread of the squared singular values at criticality as L (v_D - s_1), with s_1 = -1 for Gaussian and 0 for "
        "orthogonal weights and v_D the normalised variance of phi'(h)^2 (Sec. 2, paraphrase).",
    ),
    group=GROUP,
)
def saxe2014_orthogonal_jacobian(ctx: Context) -> Outcome:
    """Measure the Jacobian spectrum against depth for Gaussian and orthogonal critical tanh networks."""
    # Mean-field and free-probability results are wide-network limits: depth stays at most width / 8.
    width = ctx.pick(256, 512)
    depths = ctx.pick([2, 4, 8, 16, 32], [2, 4, 8, 16, 32, 64])
    n_inputs = 4
    sigma_b2 = 1e-5  # small bias: q* is small, the regime where tanh networks can be isometric
    sigma_w2 = critical_sigma_w2("tanh", sigma_b2)
    mf = mean_field("tanh", sigma_w2, sigma_b2)
    # v_D: normalised variance of tanh'(h)^2 at h ~ N(0, q*), the nonlinearity's share of the spectrum's spread.
    m1 = _gauss_expect(lambda h: (1 - np.tanh(h) ** 2) ** 2, mf.q_star)
    m2 = _gauss_expect(lambda h: (1 - np.tanh(h) ** 2) ** 4, mf.q_star)
    v_d = m2 / m1**2 - 1
    spectra: dict[str, dict[int, list[np.ndarray]]] = {k: {d: [] for d in depths} for k in ("gaussian", "orthogonal")}
    for seed in ctx.seeds(1, 3):
        # Inputs scaled so that the first layer's pre-activations have mean square q*, as every later layer's have.
        z = torch.randn(n_inputs, width, generator=_generator(seed))
        inputs = z / z.pow(2).mean(1, keepdim=True).sqrt() * math.sqrt((mf.q_star - sigma_b2) / sigma_w2)
        for depth in depths:
            for name in spectra:
                net = _critical_tanh(width, depth, sigma_w2, sigma_b2, seed, orthogonal=name == "orthogonal")
                spectra[name][depth].append(_jacobian_spectrum(net, inputs))

    stats: dict[str, dict[str, list[float]]] = {}
    for name, by_depth in spectra.items():
        lam = [np.concatenate(by_depth[d]) for d in depths]
        s1 = -1.0 if name == "gaussian" else 0.0
        stats[name] = {
            "mean_sq_singular_value": [float(v.mean()) for v in lam],
            "normalised_variance": [float(v.var() / v.mean() ** 2) for v in lam],
            "normalised_variance_theory": [d * (v_d - s1) for d in depths],
            # The middle half's spread: the Gaussian nets' smallest singular values fall below float64's resolution.
            "singular_value_ratio_p75_p25": [float(np.sqrt(np.percentile(v, 75) / np.percentile(v, 25))) for v in lam],
        }
    gauss, orth = stats["gaussian"], stats["orthogonal"]
    chi_l = [mf.chi1**d for d in depths]
    mean_err = max(abs(m / c - 1) for s in stats.values() for m, c in zip(s["mean_sq_singular_value"], chi_l))
    orth_err = max(abs(m / t - 1) for m, t in zip(orth["normalised_variance"], orth["normalised_variance_theory"]))
    pairs = zip(gauss["normalised_variance"], gauss["normalised_variance_theory"])
    gauss_factor = max(max(m / t, t / m) for m, t in pairs)
    grows = bool(np.all(np.diff(gauss["normalised_variance"]) > 0))
    contrast = gauss["normalised_variance"][-1] / orth["normalised_variance"][-1]

    expected = {
        "orthogonal_normalised_variance_below": 1.0,  # O(1) at every depth: well-conditioned
        "gaussian_normalised_variance_grows_with_depth": True,
        "gaussian_over_orthogonal_at_deepest_above": 10.0,
        "orthogonal_variance_vs_free_probability_rel_error_below": 0.25,
        "gaussian_variance_vs_free_probability_within_factor": 2.0,
        "mean_sq_singular_value_vs_chi1_pow_L_rel_error_below": 0.5,  # holds for both inits
    }
    passed = (
        max(orth["normalised_variance"]) < 1.0 and grows and contrast > 10.0 and orth_err < 0.25
        and gauss_factor < 2.0 and mean_err < 0.5
    )
    measured: dict[str, Any] = {
        "depths": depths, "sigma_w2": sigma_w2, "sigma_b2": sigma_b2, "q_star": mf.q_star, "chi1": mf.chi1,
        "v_d": v_d, **{f"{name}_{k}": v for name, s in stats.items() for k, v in s.items()},
        "gaussian_over_orthogonal_at_deepest": contrast, "orthogonal_variance_rel_error": orth_err,
        "gaussian_variance_factor_from_theory": gauss_factor, "mean_sq_singular_value_rel_error": mean_err,
        "seeds": len(ctx.seeds(1, 3)),
    }

    fig = _figure(10, 3.6)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, color in (("gaussian", "C3"), ("orthogonal", "C0")):
        ax.plot(depths, stats[name]["normalised_variance"], "o", color=color, label=f"{name}: measured")
        ax.plot(depths, stats[name]["normalised_variance_theory"], "-", color=color, label=f"{name}: free probability")
        sv = np.sqrt(np.concatenate(spectra[name][depths[-1]]))
        bins = np.logspace(np.log10(max(float(sv.min()), 1e-16)), np.log10(float(sv.max())), 60)
        ax2.hist(sv, bins=list(bins), color=color, alpha=0.6, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_yscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("Var[lambda] / E[lambda]^2 (lambda = sigma^2)")
    ax.set_title("spread of the Jacobian's squared singular values")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.axvline(1.0, color="0.5", ls=":", lw=1)
    ax2.set_xlabel("singular value of the Jacobian")
    ax2.set_ylabel("count")
    ax2.set_title(f"singular values at depth {depths[-1]}")
    ax2.legend(fontsize=8)

    interpretation = (
        f"On the critical line (sigma_w^2 = {sigma_w2:.4f}, q* = {mf.q_star:.3f}, chi_1 = {mf.chi1:.3f}) the mean "
        f"squared singular value stays at chi_1^L = 1 for both inits (largest deviation {mean_err:.0%}), but its "
        f"spread does not: at depth {depths[-1]} Var/E^2 is {orth['normalised_variance'][-1]:.3f} with orthogonal "
        f"weights and {gauss['normalised_variance'][-1]:.1f} with Gaussian ones ({contrast:.0f}x), the middle half of "
        f"the singular values spanning a factor {orth['singular_value_ratio_p75_p25'][-1]:.2f} against "
        f"{gauss['singular_value_ratio_p75_p25'][-1]:.3g}. "
        "Each Gaussian layer contributes its own Marchenko-Pastur spread (s_1 = -1) so the spread grows like L; an "
        f"orthogonal layer contributes none and only tanh's slope varies (v_D = {v_d:.4f} per layer), which is small "
        f"because q* is small. The free-probability prediction L (v_D - s_1) matches within {orth_err:.0%} for "
        f"orthogonal weights and a factor {gauss_factor:.2f} for Gaussian ones"
        + (" (the prediction is the infinite-width limit; at finite width the Gaussian product's heavy tail of large "
           "singular values adds spread)." if gauss_factor > 1.2 else ".")
    )
    table = (
        ["depth", "E[lambda] Gaussian", "E[lambda] orthogonal", "Var/E^2 Gaussian (theory)",
         "Var/E^2 orthogonal (theory)"],
        [[d, round(gauss["mean_sq_singular_value"][i], 3), round(orth["mean_sq_singular_value"][i], 3),
          f"{gauss['normalised_variance'][i]:.3g} ({gauss['normalised_variance_theory'][i]:.3g})",
          f"{orth['normalised_variance'][i]:.3g} ({orth['normalised_variance_theory'][i]:.3g})"]
         for i, d in enumerate(depths)],
    )
    return Outcome(measured, expected, bool(passed), fig, interpretation, table)


# -- Saxe et al. 2014: learning time of deep linear networks against depth -------------------------------------------
def _whitened_regression(seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least squares of one-hot digit labels on the digits, as a few rows with the same loss surface.

    The squared loss of a linear map P depends on the data only through its input covariance S and input-output
    covariance C: mean ||P x - y||^2 = tr(P S P^T) - 2 tr(P C) + const. Rows a_i = sqrt(lambda_i) u_i and
    b_i = C^T u_i / sqrt(lambda_i) from S's eigenvectors give exactly that (up to the constant), with about 60 rows
    instead of 1437. Returns the rows and the learnable part of the loss, sum ||b_i||^2.
    """
    x, y, _, _ = digits(seed)
    x64 = x.double()
    t = F.one_hot(y, 10).double()
    t = t - t.mean(0)  # the networks have no bias: centre the targets
    cov, cross = x64.T @ x64 / len(x), x64.T @ t / len(x)
    lam, u = torch.linalg.eigh(cov)
    keep = lam > 1e-6 * lam.max()  # constant pixels give zero-variance directions
    a = (u[:, keep] * lam[keep].sqrt()).T
    b = (u[:, keep] / lam[keep].sqrt()).T @ cross
    return a.float(), b.float(), float((b**2).sum())


def _linear_net(depth: int, seed: int, scheme: str) -> nn.Sequential:
    """A deep linear network 64 -> 64 x (depth - 1) -> 10 initialised by gradguard.init_, biases off."""
    model = mlp([64] + [64] * (depth - 1) + [10], "linear", seed=seed)
    torch.manual_seed(seed)
    gradguard.init_(model, scheme)  # "orthogonal" (gain 1) or "lecun" (N(0, 1/fan_in): scaled Gaussian)
    for lin in _linears(model):
        lin.bias.requires_grad_(False)  # the source's networks are products of weight matrices only
    return model


def _steps_to_criterion(
    model: nn.Module, a: torch.Tensor, b: torch.Tensor, lr: float, target: float, cap: int
) -> tuple[int | None, bool]:
    """Full-batch gradient descent until the loss is below ``target``: (steps, or None past ``cap``; diverged)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = None
    for step in range(cap + 1):
        loss = ((model(a) - b) ** 2).sum()
        value = float(loss.detach())
        first = value if first is None else first
        if value < target:
            return step, False
        if not math.isfinite(value) or value > 10 * first:
            return None, True
        if step == cap:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return None, False


def _best_time(depth: int, seed: int, scheme: str, a: torch.Tensor, b: torch.Tensor, rates: list[float],
               target: float, cap: int) -> int | None:
    """The fewest steps to criterion over the learning rates ``rates / depth`` (ascending); None if none got there."""
    best: int | None = None
    for rate in rates:
        # A larger rate only matters if it beats the best so far, so it runs at most that long.
        steps, diverged = _steps_to_criterion(_linear_net(depth, seed, scheme), a, b, rate / depth, target,
                                              cap if best is None else best)
        if diverged:
            break  # larger rates diverge too
        if steps is not None and (best is None or steps < best):
            best = steps
    return best


@case(
    "saxe2014-deep-linear",
    title="Deep linear networks: learning time against depth, orthogonal vs scaled Gaussian initialisation",
    question="With the learning rate tuned for each depth, is the learning time of a deep linear network nearly "
    "independent of depth with orthogonal initialisation, while it grows with depth with scaled Gaussian weights?",
    setup="Deep linear networks 64 -> 64 x (L - 1) -> 10 (L = 2 to 32; 64 with --full) fitting one-hot digit labels "
    "by least squares (full-batch gradient descent on the exact loss), weights by gradguard.init_ 'orthogonal' or "
    "'lecun' (N(0, 1/n)); learning time = steps until 90% of the learnable loss is gone, best of 7 learning rates "
    "from 0.1 / L to 0.8 / L, at most 1000 steps.",
    source=Source(
        citation="Saxe, McClelland & Ganguli 2014, Exact solutions to the nonlinear dynamics of learning in deep "
        "linear neural networks, ICLR, abstract and Sec. 3-4",
        claim='"For a special class of initial conditions on the weights, very deep networks incur only a finite, '
        "depth independent, delay in learning speed relative to shallow networks. [...] scaled random Gaussian "
        "initializations cannot. We further exhibit a new class of random orthogonal initial conditions on weights "
        'that, like unsupervised pre-training, enjoys depth independent learning times." (abstract)',
        qualitative=True,
    ),
    group=GROUP,
)
def saxe2014_deep_linear(ctx: Context) -> Outcome:
    """Time to criterion against depth for orthogonal and scaled Gaussian deep linear networks."""
    depths = ctx.pick([2, 4, 8, 16, 32], [2, 4, 8, 16, 32, 64])
    # Learning rates 0.1 to 0.8 over L in steps of sqrt(2): the best one is within a factor 1.41 of optimal.
    rates, cap = [0.1 * 2 ** (k / 2) for k in range(7)], 1000
    schemes = {"orthogonal": "orthogonal", "gaussian": "lecun"}
    times: dict[str, dict[int, list[int | None]]] = {k: {d: [] for d in depths} for k in schemes}
    spread: dict[str, list[float]] = {k: [] for k in schemes}
    condition: dict[str, list[float]] = {k: [] for k in schemes}
    for seed in ctx.seeds(1, 3):
        a, b, learnable = _whitened_regression(seed)
        target = 0.1 * learnable  # 90% of what a linear map can explain
        for name, scheme in schemes.items():
            for depth in depths:
                times[name][depth].append(_best_time(depth, seed, scheme, a, b, rates, target, cap))
            # Gradient norms of the deepest network's layers at initialisation, through gradguard.watch.
            model = _linear_net(depths[-1], seed, scheme)
            with gradguard.watch(model, activations_every=0) as w:
                ((model(a) - b) ** 2).sum().backward()
                w.step()
            g = w.trace.metric("grad_norm")[0]
            spread[name].append(float(g.max() / g.min()))
            with torch.no_grad():  # the end-to-end map W_L ... W_1 (the biases are 0): its singular values' spread
                sv = torch.linalg.svdvals(model(torch.eye(64)))
            condition[name].append(float(sv.max() / sv.min()))

    def typical(name: str, depth: int) -> int | None:
        """The slowest seed's learning time (None if a seed missed the criterion within the cap)."""
        ts = times[name][depth]
        return None if None in ts else max(t for t in ts if t is not None)

    orth = [typical("orthogonal", d) for d in depths]
    gauss = [typical("gaussian", d) for d in depths]
    orth_done = [t for t in orth if t is not None]
    # Depth independence: the slowest over the fastest depth (None if a depth missed the criterion).
    orth_flat = max(orth_done) / min(orth_done) if len(orth_done) == len(orth) else None
    capped = [cap if t is None else t for t in gauss]  # a missed criterion counts as at least the cap
    gauss_growth = capped[-1] / capped[0]
    expected = {
        "orthogonal_time_max_over_min_across_depths_below": 2.0,  # depth independent
        "gaussian_time_deepest_over_shallowest_at_least": 4.0,  # grows with depth (over a 16x range of depths)
    }
    passed = orth_flat is not None and orth_flat <= 2.0 and gauss_growth >= 4.0
    measured = {
        "depths": depths, "orthogonal_steps": orth, "gaussian_steps": gauss, "orthogonal_time_max_over_min": orth_flat,
        "gaussian_time_deepest_over_shallowest": gauss_growth,
        "deepest_grad_norm_max_over_min_orthogonal": _mean(spread["orthogonal"]),
        "deepest_grad_norm_max_over_min_gaussian": _mean(spread["gaussian"]),
        "deepest_end_to_end_condition_number_orthogonal": _mean(condition["orthogonal"]),
        "deepest_end_to_end_condition_number_gaussian": _mean(condition["gaussian"]),
        "step_cap": cap, "seeds": len(ctx.seeds(1, 3)),
    }

    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    ax.plot(depths, [cap if t is None else t for t in orth], "o-", color="C0", label="orthogonal")
    ax.plot(depths, capped, "s-", color="C3", label="scaled Gaussian N(0, 1/n)")
    missed = [d for d, t in zip(depths, gauss) if t is None]
    if missed:
        ax.plot(missed, [cap] * len(missed), "^", color="C3", ms=10, label=f"not reached in {cap} steps")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("depth L (weight layers)")
    ax.set_ylabel("steps to criterion (best learning rate)")
    ax.set_title("deep linear networks: learning time vs depth")
    ax.legend(fontsize=8)

    gauss_text = ", ".join(f">{cap}" if t is None else str(t) for t in gauss)
    interpretation = (
        f"With orthogonal weights the learning time stayed within a factor {orth_flat or math.nan:.2f} from depth "
        f"{depths[0]} to {depths[-1]} ({', '.join(str(t) for t in orth)} steps), while with scaled Gaussian weights it "
        f"grew from {gauss[0]} to {gauss_text.split(', ')[-1]} steps ({gauss_text}). "
        "A product of orthogonal matrices is orthogonal, so every direction of the data reaches the output and "
        "every layer receives an undistorted gradient; a product of Gaussian matrices has spread-out singular values, "
        "so weak directions are learnt only after a long plateau while the strongest cap the usable learning rate. "
        f"At depth {depths[-1]} the end-to-end map's condition number at initialisation is "
        f"{measured['deepest_end_to_end_condition_number_orthogonal']:.2f} (orthogonal) against "
        f"{measured['deepest_end_to_end_condition_number_gaussian']:.3g} (Gaussian), and the layers' gradient norms "
        f"differ by {measured['deepest_grad_norm_max_over_min_orthogonal']:.2f}x and "
        f"{measured['deepest_grad_norm_max_over_min_gaussian']:.2f}x."
    )
    table = (
        ["depth", "orthogonal: steps", "Gaussian: steps"],
        [[d, o, f">{cap}" if g is None else g] for d, o, g in zip(depths, orth, gauss)],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- Poole et al. 2016 / Schoenholz et al. 2017: mean-field q* and chi_1 against measurement --------------------------

@case(
    "poole2016-meanfield",
    title="Mean-field theory of signal propagation: q* and chi_1 against random tanh networks",
    question="Do the mean-field fixed point q* and the gradient factor chi_1 predict what wide random tanh networks "
    "measure, across the order-to-chaos transition?",
    setup="Random tanh MLPs (64 -> 512 x 20 -> 10; 1000 units with --full), weights N(0, sigma_w^2 / n), biases "
    "N(0, 0.05), sigma_w^2 from 0.5 to 4; gradguard.diagnose(steps=0) on 256 digits measures the pre-activations' "
    "mean square (q) and the per-layer factor of the back-propagated gradient (chi_1); theory from "
    "gradguard.theory.mean_field.",
    source=Source(
        citation="Poole, Lahiri, Raghu, Sohl-Dickstein & Ganguli 2016, Exponential expressivity in deep neural "
        "networks through transient chaos, NeurIPS, Sec. 2 and Figs. 1-2; Schoenholz, Gilmer, Ganguli & "
        "Sohl-Dickstein 2017, Deep information propagation, ICLR, Sec. 3-4",
        claim="(paraphrase) In wide random networks the pre-activations' squared length converges within a few layers "
        "to the fixed point q* of the length map q -> sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2, simulations "
        "matching the theory (Poole et al., Fig. 1); the back-propagated gradient's squared norm is multiplied by "
        "chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] per layer, so gradients vanish in the ordered phase (chi_1 < 1) and "
        "explode in the chaotic phase (chi_1 > 1) (Schoenholz et al.).",
    ),
    group=GROUP,
)
def poole2016_meanfield(ctx: Context) -> Outcome:
    """Sweep sigma_w^2 and compare diagnose's measured q and chi_1 with mean-field theory."""
    width = ctx.pick(512, 1000)
    sweep = ctx.pick([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0], [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0])
    sigma_b2, depth = 0.05, 20
    critical = critical_sigma_w2("tanh", sigma_b2)
    q_meas: dict[float, list[float]] = {s: [] for s in sweep}
    chi_meas: dict[float, list[float]] = {s: [] for s in sweep}
    chain_len = depth - 1  # the square hidden layers (the first one maps the 64 inputs)
    for seed in ctx.seeds(1, 2):
        x, y, _, _ = digits(seed)
        for sw2 in sweep:
            model = mlp([64] + [width] * depth + [10], "tanh", sigma_w2=sw2, sigma_b2=sigma_b2, seed=seed)
            d = gradguard.diagnose(model, (x[:256], y[:256]), F.cross_entropy, steps=0, hessian=False, seed=seed)
            if d.theory is None:  # a plain chain of square tanh layers always gets one
                raise RuntimeError("diagnose made no mean-field prediction for a plain tanh MLP")
            chain = [d.profile.names.index(name) for name in d.theory.layers]
            chain_len = len(chain)
            # q: the output mean square averaged over the chain's second half, where q has settled at q*.
            q_meas[sw2].append(float(np.mean(d.profile.out_ms[chain[len(chain) // 2:]])))
            chi_meas[sw2].append(d.theory.measured_chi1)

    rows: list[dict[str, Any]] = []
    for sw2 in sweep:
        mf = mean_field("tanh", sw2, sigma_b2)
        rows.append({"sigma_w2": sw2, "q_star": mf.q_star, "q_measured": _mean(q_meas[sw2]), "chi1": mf.chi1,
                     "chi1_measured": _mean(chi_meas[sw2]), "phase": mf.phase})
    q_err = max(abs(r["q_measured"] / r["q_star"] - 1) for r in rows)
    chi_err = max(abs(r["chi1_measured"] / r["chi1"] - 1) for r in rows)
    phases_agree = all((r["chi1_measured"] < 1) == (r["sigma_w2"] < critical) for r in rows)
    expected = {
        "q_star_rel_error_below": 0.10,
        "chi1_rel_error_below": 0.05,
        "measured_chi1_below_1_exactly_below_critical_sigma_w2": True,
    }
    passed = q_err < 0.10 and chi_err < 0.05 and phases_agree
    measured = {
        "sigma_w2": sweep, "sigma_b2": sigma_b2, "critical_sigma_w2": critical,
        "q_star_theory": [r["q_star"] for r in rows], "q_measured": [r["q_measured"] for r in rows],
        "chi1_theory": [r["chi1"] for r in rows], "chi1_measured": [r["chi1_measured"] for r in rows],
        "q_star_max_rel_error": q_err, "chi1_max_rel_error": chi_err, "phases_agree": phases_agree,
        "width": width, "seeds": len(ctx.seeds(1, 2)),
    }

    grid = np.linspace(0.3, 4.2, 80)
    theory = [mean_field("tanh", float(s), sigma_b2) for s in grid]
    fig = _figure(10, 3.6)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.plot(grid, [m.q_star for m in theory], color="C0", label="mean-field q*")
    ax.plot(sweep, measured["q_measured"], "o", color="C3", label=f"measured, width {width}")
    ax.set_ylabel("q* (pre-activation mean square)")
    ax2.plot(grid, [m.chi1 for m in theory], color="C0", label="mean-field chi_1")
    ax2.plot(sweep, measured["chi1_measured"], "o", color="C3", label=f"measured, width {width}")
    ax2.axhline(1.0, color="0.5", ls=":", lw=1)
    ax2.set_ylabel("chi_1 (gradient factor per layer)")
    for a, title in ((ax, f"length fixed point, sigma_b^2 = {sigma_b2}"), (ax2, "gradient factor per layer")):
        a.axvline(critical, color="0.5", ls="--", lw=1, label=f"critical sigma_w^2 = {critical:.2f}")
        a.set_xlabel("sigma_w^2")
        a.set_title(title)
        a.legend(fontsize=8)

    lo, hi = rows[0], rows[-1]
    interpretation = (
        f"Across sigma_w^2 = {sweep[0]} to {sweep[-1]} the measured q agrees with q* within {q_err:.1%} and the "
        f"measured gradient factor with chi_1 within {chi_err:.1%}; chi_1 is below 1 exactly below the critical "
        f"sigma_w^2 = {critical:.2f}" + ("" if phases_agree else " (not at every point)") + ". "
        f"At sigma_w^2 = {lo['sigma_w2']} each layer multiplies the gradient's squared norm by "
        f"{lo['chi1_measured']:.3f} (theory {lo['chi1']:.3f}), so the {chain_len} square layers shrink it by "
        f"{lo['chi1_measured'] ** chain_len:.1e}; at {hi['sigma_w2']} by {hi['chi1_measured']:.3f} per layer, a growth "
        f"of {hi['chi1_measured'] ** chain_len:.1e}. "
        f"With {width} units a layer's pre-activations are sums of many independent terms, which is what the "
        "mean-field (Gaussian) description assumes."
    )
    table = (
        ["sigma_w^2", "q* theory", "q measured", "chi_1 theory", "chi_1 measured", "phase"],
        [[r["sigma_w2"], round(r["q_star"], 4), round(r["q_measured"], 4), round(r["chi1"], 4),
          round(r["chi1_measured"], 4), r["phase"]] for r in rows],
    )
    return Outcome(measured, expected, bool(passed), fig, interpretation, table)


# -- Schoenholz et al. 2017: trainability at depth 60 only near criticality ------------------------------------------
@case(
    "schoenholz2017-trainability",
    title="Trainability at depth 60: ordered, critical and chaotic initialisation",
    question="At depth 60, does a tanh network train only near the order-to-chaos transition, as the depth scale "
    "xi_c predicts (trainable when L < 6 xi_c)?",
    setup="Digits (standardised), tanh MLPs with 60 weight layers of 64 units, biases N(0, 0.05), weights "
    "N(0, sigma_w^2 / n) with sigma_w^2 = 1.0 (ordered), the critical 1.76 and 4.0 (chaotic) (a sweep of 7 values "
    "with --full), plain SGD (learning rate 0.01, mini-batches of 64) for 500 steps; xi_c from "
    "gradguard.theory.mean_field, gradient norms through gradguard.watch.",
    source=Source(
        citation="Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, Deep information propagation, ICLR, Sec. 5 and "
        "Figs. 5-6",
        claim='"Random networks may be trained precisely when information can travel through them. [...] Arbitrarily '
        'deep networks may be trained only sufficiently close to criticality." (abstract); the maximum trainable '
        "depth is about 6 xi_c (Sec. 5, paraphrase).",
        qualitative=True,
    ),
    group=GROUP,
)
def schoenholz2017_trainability(ctx: Context) -> Outcome:
    """Train depth-60 tanh networks at ordered, critical and chaotic sigma_w^2 and compare with 6 xi_c."""
    sigma_b2, depth, width = 0.05, 60, 64
    steps = ctx.pick(500, 1000)
    critical = critical_sigma_w2("tanh", sigma_b2)
    anchors = {"ordered": 1.0, "critical": critical, "chaotic": 4.0}
    sweep = sorted(set(anchors.values()) | set(ctx.pick([], [1.3, 1.5, 2.2, 3.0])))
    results: dict[float, dict[str, list[float]]] = {s: {"train": [], "test": [], "grad": []} for s in sweep}
    curves: dict[float, np.ndarray] = {}
    for seed in ctx.seeds(1, 3):
        x, y, x_test, y_test = digits(seed)
        for sw2 in sweep:
            model = mlp([64] + [width] * (depth - 1) + [10], "tanh", sigma_w2=sw2, sigma_b2=sigma_b2, seed=seed)
            g = _weight_grad_norms(model, x, y)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            losses, _ = _train(model, x, y, opt, steps=steps, batch=64, seed=seed, every=10)
            results[sw2]["train"].append(_accuracy(model, x, y))
            results[sw2]["test"].append(_accuracy(model, x_test, y_test))
            results[sw2]["grad"].append(float(g[0] / g[-2]))  # first over last hidden layer, at initialisation
            curves.setdefault(sw2, _smooth(losses, 25))

    rows = []
    for sw2 in sweep:
        mf = mean_field("tanh", sw2, sigma_b2)
        train = _mean(results[sw2]["train"])
        rows.append({
            "sigma_w2": sw2, "xi_c": mf.xi_c, "six_xi_c": 6 * mf.xi_c, "chi1": mf.chi1, "train_accuracy": train,
            "test_accuracy": _mean(results[sw2]["test"]),
            "grad_first_over_last": float(np.exp(np.mean(np.log(results[sw2]["grad"])))),
            "predicted_trainable": depth < 6 * mf.xi_c, "trained": train >= 0.5,
        })
    by = {r["sigma_w2"]: r for r in rows}
    ordered, crit, chaotic = (by[anchors[k]] for k in ("ordered", "critical", "chaotic"))
    agree = [r["predicted_trainable"] == r["trained"] for r in rows]
    expected = {
        "critical_train_accuracy_at_least": 0.5,  # trains: 5x chance
        "ordered_and_chaotic_train_accuracy_below": 0.25,  # fail: near chance (10%)
        "anchors_agree_with_L_below_6_xi_c": True,
    }
    passed = (
        crit["train_accuracy"] >= 0.5 and ordered["train_accuracy"] < 0.25 and chaotic["train_accuracy"] < 0.25
        and all(r["predicted_trainable"] == r["trained"] for r in (ordered, crit, chaotic))
    )
    measured: dict[str, Any] = {"depth": depth, "sigma_b2": sigma_b2, "critical_sigma_w2": critical}
    for name, r in (("ordered", ordered), ("critical", crit), ("chaotic", chaotic)):
        measured.update({
            f"{name}_sigma_w2": r["sigma_w2"], f"{name}_xi_c": finite(r["xi_c"]),
            f"{name}_train_accuracy": r["train_accuracy"], f"{name}_test_accuracy": r["test_accuracy"],
            f"{name}_weight_grad_norm_first_over_last_hidden_at_init": r["grad_first_over_last"],
        })
    if len(rows) > 3:
        measured["sweep_sigma_w2"] = [r["sigma_w2"] for r in rows]
        measured["sweep_train_accuracy"] = [r["train_accuracy"] for r in rows]
        measured["sweep_six_xi_c"] = [finite(r["six_xi_c"]) for r in rows]
        measured["sweep_prediction_agreement"] = float(np.mean(agree))
    measured["seeds"] = len(ctx.seeds(1, 3))

    fig = _figure(10, 3.6)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, color in (("ordered", "C0"), ("critical", "C2"), ("chaotic", "C3")):
        sw2 = anchors[name]
        ax.plot(np.arange(len(curves[sw2])), curves[sw2], color=color, label=f"{name} (sigma_w^2 = {sw2:.2f})")
    ax.axhline(LN10, color="0.5", ls=":", lw=1, label="ln 10 (chance)")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (25-step mean)")
    ax.set_title(f"depth {depth}, sigma_b^2 = {sigma_b2}")
    ax.legend(fontsize=8)
    grid = np.sort(np.append(np.linspace(0.6, 4.5, 120), critical))  # xi_c diverges at the critical point
    six_xi = np.array([6 * mean_field("tanh", float(s), sigma_b2).xi_c for s in grid])
    ax2.plot(grid, np.minimum(six_xi, 1e4), color="C0", label="6 xi_c (mean-field, cut at 1e4)")
    ax2.axhline(depth, color="0.3", ls="--", lw=1, label=f"depth {depth}")
    for r in rows:
        ax2.plot(r["sigma_w2"], min(r["six_xi_c"], 1e4), "o" if r["trained"] else "x", color="C2" if r["trained"]
                 else "C3", ms=8)
    ax2.plot([], [], "o", color="C2", label="trained (train accuracy >= 50%)")
    ax2.plot([], [], "x", color="C3", label="did not train")
    ax2.set_yscale("log")
    ax2.set_xlabel("sigma_w^2")
    ax2.set_ylabel("trainable depth 6 xi_c (layers)")
    ax2.set_title("prediction: trainable where 6 xi_c > depth")
    ax2.legend(fontsize=8)

    interpretation = (
        f"After {steps} steps the critical network (sigma_w^2 = {critical:.2f}, xi_c = {crit['xi_c']:.3g}) reached "
        f"{_pct(crit['train_accuracy'])} training accuracy ({_pct(crit['test_accuracy'])} test), while the ordered "
        f"(sigma_w^2 = 1.0, 6 xi_c = {ordered['six_xi_c']:.0f}) and chaotic (sigma_w^2 = 4.0, 6 xi_c = "
        f"{chaotic['six_xi_c']:.0f}) ones stayed at {_pct(ordered['train_accuracy'])} and "
        f"{_pct(chaotic['train_accuracy'])} (chance: 10%), as 6 xi_c < {depth} predicts. "
        f"At initialisation the first hidden layer's weight gradient was {ordered['grad_first_over_last']:.1e}, "
        f"{crit['grad_first_over_last']:.2f} and {chaotic['grad_first_over_last']:.1e} times the "
        "last one's: in the ordered phase all inputs converge to the same output and gradients vanish, in the chaotic "
        "phase nearby inputs decorrelate and gradients explode; only near criticality does information cross 60 layers "
        "both ways."
        + (f" Over the --full sweep the prediction L < 6 xi_c matched the outcome at {sum(agree)} of {len(agree)} "
           "values of sigma_w^2." if len(rows) > 3 else "")
    )
    table = (
        ["sigma_w^2", "phase", "xi_c", "6 xi_c", "train accuracy", "test accuracy", "grad first/last at init"],
        [[round(r["sigma_w2"], 3), mean_field("tanh", r["sigma_w2"], sigma_b2).phase, f"{r['xi_c']:.3g}",
          f"{r['six_xi_c']:.3g}", round(r["train_accuracy"], 3), round(r["test_accuracy"], 3),
          f"{r['grad_first_over_last']:.2e}"] for r in rows],
    )
    return Outcome(measured, expected, bool(passed), fig, interpretation, table)
