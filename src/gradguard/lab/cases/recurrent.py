"""Lab cases on recurrences, gradient clipping and step-size stability.

Gradients through time (Bengio et al. 1994; Pascanu et al. 2013), the adding problem (Hochreiter &
Schmidhuber 1997; Le et al. 2015), norm clipping (Pascanu et al. 2013), adaptive clipping (Brock et
al. 2021), the 2/lambda_max step-size limit (LeCun et al. 1998) and the edge of stability (Cohen et
al. 2021). Gradient statistics come from :func:`gradguard.watch`, gradients through time from
:func:`gradguard.diagnosis.recurrent.through_time` and sharpness from
:func:`gradguard.diagnosis.curvature.hessian_top_eigenvalue`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard.diagnosis.curvature import hessian_top_eigenvalue
from gradguard.diagnosis.recurrent import TimeProfile, through_time
from gradguard.lab.case import Context, Outcome, Source, case, finite
from gradguard.lab.data import adding_problem, diabetes, digits
from gradguard.lab.models import mlp
from gradguard.report.html import new_figure
from gradguard.theory import derivative_bound, product_bound

GROUP = "recurrent"
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- shared helpers --------------------------------------------------------------------------------


class LastState(nn.Module):
    """A recurrent module read out by a linear head at the last time step."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def recurrent_net(
    kind: str, hidden: int, seed: int, *, inputs: int = 2, gain: float | None = None, input_std: float | None = None
) -> LastState:
    """A seeded ``LastState`` net; ``kind`` is "tanh", "lstm", "gru" or "irnn".

    ``gain``: the recurrent matrix becomes ``gain`` times a random orthogonal matrix (all its singular
    values and eigenvalue moduli equal ``gain``). ``input_std``: input weights drawn from ``N(0, input_std^2)``.
    "irnn" is a ReLU RNN with identity recurrent weights and zero biases (Le et al. 2015).
    """
    torch.manual_seed(seed)
    rnn: nn.RNNBase
    if kind == "lstm":
        rnn = nn.LSTM(inputs, hidden, batch_first=True)
    elif kind == "gru":
        rnn = nn.GRU(inputs, hidden, batch_first=True)
    elif kind in ("tanh", "irnn"):
        rnn = nn.RNN(inputs, hidden, batch_first=True, nonlinearity="tanh" if kind == "tanh" else "relu")
    else:
        raise ValueError(f"unknown recurrent kind {kind!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "irnn":
            rnn.get_parameter("weight_hh_l0").copy_(torch.eye(hidden))
            rnn.get_parameter("bias_hh_l0").zero_()
            rnn.get_parameter("bias_ih_l0").zero_()
        if gain is not None:
            nn.init.orthogonal_(rnn.get_parameter("weight_hh_l0"), gain=gain, generator=g)
        if input_std is not None:
            rnn.get_parameter("weight_ih_l0").normal_(0.0, input_std, generator=g)
    return LastState(rnn)


@dataclass
class Run:
    """One training run: per-step loss and total gradient norm (recorded by watch), and periodic evaluations."""

    loss: np.ndarray
    grad_norm: np.ndarray
    eval_steps: list[int] = field(default_factory=list)
    evals: list[float] = field(default_factory=list)
    diverged_at: int | None = None  # the first step whose loss was not finite

    @property
    def final(self) -> float:
        """The last evaluation (NaN when the run diverged)."""
        return self.evals[-1] if self.evals and self.diverged_at is None else math.nan


def total_grad_norm(trace: gradguard.Trace) -> np.ndarray:
    """The norm of all gradients per recorded step, from watch's per-layer norms (inf where any was not finite)."""
    per_layer = trace.metric("grad_norm")
    total = np.sqrt(np.sum(per_layer**2, axis=1))
    return np.where(np.nansum(trace.metric("grad_nonfinite"), axis=1) > 0, np.inf, total)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Callable[[int], Batch],
    loss_fn: LossFn,
    steps: int,
    *,
    clip: Callable[[], Any] | None = None,
    evaluate: Callable[[], float] | None = None,
    eval_every: int = 0,
) -> Run:
    """Train for ``steps`` steps under :func:`gradguard.watch`, stopping at the first non-finite loss.

    ``clip`` runs after watch has recorded the step's gradients (so they are the unclipped ones)
    and before the optimizer's step; ``evaluate`` runs every ``eval_every`` steps and at the end.
    """
    eval_steps: list[int] = []
    evals: list[float] = []
    diverged: int | None = None
    w = gradguard.watch(model, weights_every=0, activations_every=0, flush_every=100)
    try:
        for step in range(steps):
            if evaluate is not None and eval_every and step % eval_every == 0:
                eval_steps.append(step)
                evals.append(evaluate())
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            w.step(loss=loss)
            if not math.isfinite(loss.item()):
                diverged = step
                break
            if clip is not None:
                clip()
            optimizer.step()
    finally:
        w.close()
    if evaluate is not None and diverged is None:
        eval_steps.append(steps)
        evals.append(evaluate())
    return Run(w.trace.loss, total_grad_norm(w.trace), eval_steps, evals, diverged)


def mse_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """An evaluator: the model's mean squared error on (x, y)."""

    def evaluate() -> float:
        with torch.no_grad():
            return float(F.mse_loss(model(x), y))

    return evaluate


def accuracy_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """An evaluator: the model's classification accuracy on (x, y)."""

    def evaluate() -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return evaluate


def adding_batches(steps: int, batch: int, length: int, seed: int) -> Callable[[int], Batch]:
    """Fresh adding-problem sequences for every step, drawn once from ``seed``."""
    x, y = adding_problem(steps * batch, length, seed=seed)
    return lambda step: (x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch])


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running mean over ``window`` points (for plotting noisy per-step curves); as is when shorter."""
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def per_step_factor(ratio: float, steps: int) -> float:
    """The geometric mean change per step of a quantity that changed by ``ratio`` over ``steps`` steps."""
    return float(ratio ** (1.0 / steps)) if ratio > 0 and math.isfinite(ratio) else math.nan


def palette(n: int) -> list[Any]:
    """``n`` colours from blue (small values: contracting, stable) to red (large: expanding, unstable)."""
    from matplotlib import colormaps

    cmap = colormaps["coolwarm"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def first_below(steps: list[int], values: list[float] | np.ndarray, level: float) -> int | None:
    """The first step whose value is below ``level`` (None if none is)."""
    for s, v in zip(steps, values):
        if v < level:
            return int(s)
    return None


# -- hochreiter1997-adding -------------------------------------------------------------------------

ADDING_KINDS = {"tanh": "tanh RNN", "irnn": "IRNN", "lstm": "LSTM", "gru": "GRU"}
ADDING_COLORS = {"tanh": "tab:red", "irnn": "tab:orange", "lstm": "tab:blue", "gru": "tab:green"}
# Adam's step size per model: 1e-2 for all but the IRNN, whose unbounded ReLU state is unstable at 1e-2
# (Le et al. tuned the learning rate of each model separately).
ADDING_LR = {"tanh": 1e-2, "irnn": 1e-3, "lstm": 1e-2, "gru": 1e-2}
ADDING_SOLVED = 0.01  # Hochreiter & Schmidhuber's stopping criterion: average error below 0.01
ADDING_LAST = 5  # the final MSE is the mean of the last evaluations, so one noisy batch step does not decide it


@case(
    "hochreiter1997-adding",
    title="The adding problem: tanh RNN vs LSTM, GRU and IRNN",
    question="Over 50 time steps, which recurrent networks learn to add the two marked numbers, "
    "and which stay at the baseline of predicting the mean?",
    setup="Adding problem with T = 50 (inputs: a value in [0, 1] and a marker; target: the sum of the two "
    "marked values); tanh RNN, LSTM, GRU and IRNN (ReLU, identity recurrent weights, input weights "
    "N(0, 0.03^2)) with 32 units read out at the last step; Adam (lr 1e-2, 1e-3 for the IRNN), batches of "
    "64 fresh sequences, gradient norm clipped at 1, MSE loss; test MSE on 500 held-out sequences.",
    source=Source(
        citation="Hochreiter & Schmidhuber 1997, Long Short-Term Memory, Neural Computation, Sec. 5.4 "
        "(Experiment 4, the adding problem); Le, Jaitly & Hinton 2015, A Simple Way to Initialize Recurrent "
        "Networks of Rectified Linear Units, Sec. 4.1 and Fig. 2",
        claim="(paraphrase) LSTM solves the adding problem, bringing the average squared error below 0.01, "
        "where conventional recurrent nets trained by gradient descent fail: a plain tanh RNN stays at the "
        "baseline error of predicting the mean, while an IRNN learns the task but does not do better than "
        "the LSTM.",
        qualitative=True,
    ),
    group=GROUP,
)
def hochreiter1997_adding(ctx: Context) -> Outcome:
    """Train the four recurrent nets on the adding problem and compare their test MSE with the baseline."""
    length, hidden, batch, eval_every = 50, 32, 64, 50
    steps = ctx.pick(1500, 2000)
    seeds = ctx.seeds(1, 3)
    curves: dict[str, list[list[float]]] = {k: [] for k in ADDING_KINDS}
    grad_norms: dict[str, np.ndarray] = {}
    at_init: dict[str, TimeProfile] = {}
    trained: dict[str, TimeProfile] = {}
    eval_steps: list[int] = []
    baselines: list[float] = []
    for seed in seeds:
        x_test, y_test = adding_problem(500, length, seed=seed + 10_000)
        baselines.append(float(F.mse_loss(torch.ones_like(y_test), y_test)))  # predict the mean, 1
        batches = adding_batches(steps, batch, length, seed)
        for kind in ADDING_KINDS:
            model = recurrent_net(kind, hidden, seed, input_std=0.03 if kind == "irnn" else None)
            if seed == seeds[0]:
                at_init[kind] = through_time(model, x_test[:256], y_test[:256], F.mse_loss)[0]
            params = list(model.parameters())
            run = train(model, torch.optim.Adam(params, lr=ADDING_LR[kind]), batches, F.mse_loss, steps,
                        clip=partial(gradguard.clip_grad_norm_, params, 1.0),
                        evaluate=mse_on(model, x_test, y_test), eval_every=eval_every)
            # A diverged run (none is expected) counts as never leaving the baseline.
            curves[kind].append(run.evals if run.diverged_at is None else [baselines[-1]] * (steps // eval_every + 1))
            if seed == seeds[0]:
                eval_steps = list(range(0, steps + 1, eval_every))
                grad_norms[kind] = run.grad_norm
                trained[kind] = through_time(model, x_test[:256], y_test[:256], F.mse_loss)[0]

    baseline = float(np.mean(baselines))
    mean_curve = {k: np.mean(np.array(v), axis=0) for k, v in curves.items()}
    final = {k: float(np.mean(c[-ADDING_LAST:])) for k, c in mean_curve.items()}
    ratio_init = {k: float(p.ratio) for k, p in at_init.items()}
    ratio_trained = {k: float(p.ratio) for k, p in trained.items()}

    tanh_near_baseline = abs(final["tanh"] / baseline - 1.0) <= 0.2
    lstm_solved, gru_solved = final["lstm"] < ADDING_SOLVED, final["gru"] < ADDING_SOLVED
    irnn_between = final["lstm"] < final["irnn"] < 0.5 * baseline
    passed = bool(tanh_near_baseline and lstm_solved and gru_solved and irnn_between)

    names = ADDING_KINDS
    measured: dict[str, Any] = {
        "baseline_mse": baseline,
        "test_mse": {names[k]: finite(v) for k, v in final.items()},
        "tanh_rnn_mse_over_baseline": final["tanh"] / baseline,
        "through_time_ratio_at_init": {names[k]: finite(v) for k, v in ratio_init.items()},
        "through_time_ratio_trained": {names[k]: finite(v) for k, v in ratio_trained.items()},
        "median_grad_norm": {names[k]: finite(float(np.median(v))) for k, v in grad_norms.items()},
        "steps": steps,
        "seeds": len(seeds),
    }
    expected = {
        "tanh_rnn_mse_near_baseline": "within 20% of the baseline (predicting the mean, ~1/6)",
        "lstm_mse_below": ADDING_SOLVED,
        "gru_mse_below": ADDING_SOLVED,
        "irnn_mse_between": "above the LSTM's and below half the baseline (learns, but not as far as the LSTM)",
        "test_mse_is": f"the mean over the last {ADDING_LAST} evaluations (every {eval_every} steps)",
    }

    fig = new_figure(13.0, 3.8)
    ax1, ax2, ax3 = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
    for kind, label in names.items():
        color = ADDING_COLORS[kind]
        ax1.plot(eval_steps, mean_curve[kind], color=color, label=label)
        for profile, style, when in ((at_init[kind], "-", "init"), (trained[kind], "--", "trained")):
            ax2.plot(np.arange(profile.steps + 1), profile.norms, color=color, ls=style, label=f"{label}, {when}")
        ax3.plot(smooth(grad_norms[kind], 25), color=color, label=label)
    ax1.axhline(baseline, color="grey", ls="--", label="baseline (predict 1)")
    ax1.axhline(ADDING_SOLVED, color="black", ls=":", label="solved (0.01)")
    ax1.set(yscale="log", xlabel="training step", ylabel="test MSE", title="Adding problem, T = 50")
    ax2.set(yscale="log", xlabel="time step t", ylabel="||dL/dh_t||", title="Gradient through time")
    ax3.set(yscale="log", xlabel="training step", ylabel="total gradient norm (25-step mean)",
            title="Gradient norm before clipping (watch)")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=7)

    order = sorted(names, key=lambda k: final[k])
    radius_words = ("which only drives its states into saturation (tanh' ~ 0)" if trained["tanh"].spectral_radius > 1
                    else "still below 1")
    tanh_fate = ("it never gets the signal it needs and stays at the mean" if tanh_near_baseline
                 else f"its error still ends at {final['tanh'] / baseline:.2f} times the baseline")
    interpretation = (
        f"After {steps} steps the test MSE is {', '.join(f'{names[k]} {final[k]:.2g}' for k in order)}, against "
        f"{baseline:.3f} for always predicting the mean. At initialisation the gradient that reaches h_0 from the "
        f"last state is {ratio_init['tanh']:.1g} times the one at h_50 in the tanh RNN, "
        f"{ratio_init['lstm']:.1g} in the LSTM, {ratio_init['gru']:.1g} in the GRU and {ratio_init['irnn']:.2g} in "
        f"the IRNN, whose identity recurrence keeps it of order one. After training the ratio is "
        f"{ratio_trained['lstm']:.2g} (LSTM), {ratio_trained['gru']:.2g} (GRU) and {ratio_trained['irnn']:.2g} "
        f"(IRNN), against {ratio_trained['tanh']:.1g} in the tanh RNN: the gated nets learned to keep their forget "
        f"or update gates open and so carry the first marked number to the end. The tanh RNN starts by multiplying "
        f"the gradient at every step by tanh' <= 1 and a recurrent matrix of spectral radius "
        f"{at_init['tanh'].spectral_radius:.2f}; training takes the radius to {trained['tanh'].spectral_radius:.2f}, "
        f"{radius_words}, so {tanh_fate}."
    )
    table = (
        ["model", "lr", "test MSE", "||dL/dh_0|| / ||dL/dh_50||, init", "same, trained", "median grad norm"],
        [[names[k], ADDING_LR[k], final[k], ratio_init[k], ratio_trained[k], float(np.median(grad_norms[k]))]
         for k in names],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- rnn-gradient-through-time ---------------------------------------------------------------------

THROUGH_TIME_STEPS = 100
# The input scale of each regime: tiny inputs keep every state far below tanh's knee (tanh' ~ 1, a linear
# recurrence); unit inputs through PyTorch's default input weights drive the states into saturation.
REGIMES = {"linear": 1e-12, "saturating": 1.0}


@case(
    "rnn-gradient-through-time",
    title="Gradients through 100 time steps: contracting, orthogonal and expanding recurrences",
    question="Does the gradient through T steps of a recurrence shrink or grow geometrically at the rate set by "
    "the recurrent matrix's largest singular value and spectral radius?",
    setup="tanh RNNs (64 units, 4 Gaussian inputs, 100 steps, loss on the last state only) whose recurrent "
    "matrix is g times a random orthogonal matrix (every singular value and eigenvalue modulus = g), for "
    "g below, at and above 1; inputs either tiny (input weights scaled by 1e-12, so even 1.2^100 growth leaves "
    "the states far below 1: a linear recurrence) or of unit size (saturating states); ||dL/dh_t|| for every t "
    "from gradguard's through_time, at initialisation.",
    source=Source(
        citation="Bengio, Simard & Frasconi 1994, Learning long-term dependencies with gradient descent is "
        "difficult, IEEE TNN; Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural "
        "networks, ICML, Sec. 2.1",
        claim="(paraphrase of Pascanu et al. Sec. 2.1) It is sufficient for the largest singular value of the "
        "recurrent weight matrix to be smaller than 1/gamma (gamma bounding the activation's derivative, 1 for "
        "tanh) for long-term components to vanish exponentially fast, and necessary for it to be larger than "
        "1/gamma for gradients to explode; in the linear case the gradient scales as the powers of the recurrent "
        "matrix, so it grows when the spectral radius exceeds 1.",
    ),
    group=GROUP,
)
def rnn_gradient_through_time(ctx: Context) -> Outcome:
    """Measure the per-step factor of ||dL/dh_t|| and compare it with the recurrent matrix's spectrum."""
    steps, hidden, batch, inputs = THROUGH_TIME_STEPS, 64, 32, 4
    gains = ctx.pick([0.9, 1.0, 1.1], [0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2])
    gamma = derivative_bound("tanh")
    g = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(batch, steps, inputs, generator=g)
    y = torch.randn(batch, 1, generator=g)
    rows: list[dict[str, Any]] = []
    profiles: dict[tuple[str, float], TimeProfile] = {}
    for regime, scale in REGIMES.items():
        for gain in gains:
            model = recurrent_net("tanh", hidden, ctx.seed, inputs=inputs, gain=gain)
            with torch.no_grad():
                model.rnn.get_parameter("weight_ih_l0").mul_(scale)
                # Biases would set the states' scale whatever the inputs.
                model.rnn.get_parameter("bias_ih_l0").zero_()
                model.rnn.get_parameter("bias_hh_l0").zero_()
            p = through_time(model, x, y, F.mse_loss)[0]
            profiles[(regime, gain)] = p
            factor = per_step_factor(p.ratio, p.steps)
            rows.append({
                "regime": regime, "gain": gain, "spectral_radius": p.spectral_radius,
                "max_singular_value": p.max_singular_value, "per_step_factor": factor, "ratio": p.ratio,
                "bound": product_bound(None, p.steps, factor=p.max_singular_value * gamma),
            })

    def row(regime: str, gain: float) -> dict[str, Any]:
        return next(r for r in rows if r["regime"] == regime and r["gain"] == gain)

    linear = [r for r in rows if r["regime"] == "linear"]
    # Linear regime: the factor is the spectral radius (= the singular values here), within 2%.
    tracks_radius = all(abs(r["per_step_factor"] / r["spectral_radius"] - 1) <= 0.02 for r in linear)
    # Every regime: sigma_max * gamma < 1 bounds the gradient's decay (Pascanu's sufficient condition).
    within_bound = all(r["ratio"] <= r["bound"] * (1 + 1e-3) for r in rows if r["max_singular_value"] * gamma < 1)
    contracting_vanishes = all(r["ratio"] < 1e-2 for r in linear if r["spectral_radius"] < 0.95)
    expanding_explodes = all(r["ratio"] > 1e2 for r in linear if r["spectral_radius"] > 1.05)
    passed = bool(tracks_radius and within_bound and contracting_vanishes and expanding_explodes)

    measured: dict[str, Any] = {
        "gamma_tanh": gamma,
        "runs": [{k: (finite(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "largest_error_factor_vs_radius_linear": finite(
            max(abs(r["per_step_factor"] / r["spectral_radius"] - 1) for r in linear)),
    }
    expected = {
        "linear_per_step_factor": "equals the spectral radius within 2%",
        "contracting_bound": "||dL/dh_0|| / ||dL/dh_T|| <= (sigma_max * gamma)^T whenever sigma_max * gamma < 1",
        "contracting_vanishes": "ratio < 1e-2 over 100 steps when the spectral radius is below 0.95 (linear)",
        "expanding_explodes": "ratio > 1e2 over 100 steps when the spectral radius is above 1.05 (linear)",
    }

    fig = new_figure(11.0, 4.0)
    axes = {"linear": fig.add_subplot(1, 2, 1), "saturating": fig.add_subplot(1, 2, 2)}
    colors = dict(zip(gains, palette(len(gains))))
    back = np.arange(steps + 1)
    for regime, ax in axes.items():
        for gain in gains:
            p = profiles[(regime, gain)]
            rel = p.norms[::-1] / p.norms[-1]  # ||dL/dh_{T-k}|| / ||dL/dh_T|| against k steps back
            factor = row(regime, gain)["per_step_factor"]
            ax.plot(back, rel, color=colors[gain], label=f"g = {gain:g} (factor {factor:.3f})")
            ax.plot(back, gain**back, color=colors[gain], ls=":", lw=1)
        ax.set(yscale="log", xlabel="steps back from the last state, k", ylabel="||dL/dh_(T-k)|| / ||dL/dh_T||",
               title=f"{regime} regime (dotted: g^k)")
        ax.legend(fontsize=7)

    sat = {r["gain"]: r["per_step_factor"] for r in rows if r["regime"] == "saturating"}
    lin = {r["gain"]: r["per_step_factor"] for r in linear}
    lo, hi = min(gains), max(gains)
    explode_words = (f"with g = {hi:g} the saturated run's gradient still vanishes: a spectral radius above 1 is "
                     f"necessary, not sufficient, for it to explode" if sat[hi] < 1
                     else f"with g = {hi:g} the gradient grows even with saturating states")
    interpretation = (
        f"With tiny inputs the recurrence is linear and the gradient changes by the recurrent matrix at every step: "
        f"the measured factor per step is {lin[lo]:.4f} for g = {lo:g}, {lin[1.0]:.4f} for g = 1 and {lin[hi]:.4f} "
        f"for g = {hi:g}, so over {steps} steps the gradient at h_0 is {row('linear', lo)['ratio']:.2g}, "
        f"{row('linear', 1.0)['ratio']:.3g} and {row('linear', hi)['ratio']:.3g} times the one at h_T. "
        f"With saturating states each step also multiplies by tanh' < 1, so the factors drop to {sat[lo]:.3f}, "
        f"{sat[1.0]:.3f} and {sat[hi]:.3f}: the contracting bound (sigma_max * gamma)^T "
        f"{'still holds' if within_bound else 'is violated'}, and {explode_words}."
    )
    table = (
        ["regime", "g", "spectral radius", "sigma_max", "per-step factor", "||dL/dh_0|| / ||dL/dh_T||",
         "bound (sigma_max gamma)^T"],
        [[r["regime"], r["gain"], r["spectral_radius"], r["max_singular_value"], r["per_step_factor"], r["ratio"],
          r["bound"]] for r in rows],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- pascanu2013-clipping --------------------------------------------------------------------------

CLIP_THRESHOLD = 1.0
CLIP_GAIN = 1.2  # the recurrent matrix is CLIP_GAIN x orthogonal: spectral radius above 1
SPIKE = 1e3  # "diverged": the loss went non-finite or above this many times its initial value


def diverged(run: Run) -> bool:
    """Whether a run's loss went non-finite or rose above ``SPIKE`` times its first value."""
    loss = run.loss
    return run.diverged_at is not None or not np.all(np.isfinite(loss)) or bool(np.max(loss) > SPIKE * loss[0])


@case(
    "pascanu2013-clipping",
    title="Norm clipping tames exploding gradients in a tanh RNN",
    question="When the gradients of a recurrent net explode, does rescaling the gradient to norm 1 keep SGD "
    "finite and learning where the unclipped run diverges?",
    setup="tanh RNN with 32 units and recurrent weights 1.2 x orthogonal (spectral radius 1.2, the regime where "
    "gradients can explode), adding problem with T = 20, plain SGD lr 0.1 on batches of 64 fresh sequences, "
    "MSE; once without clipping and once with gradguard.clip_grad_norm_(params, 1.0); gradient norms from watch.",
    source=Source(
        citation="Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks, ICML, "
        "Sec. 3.2 (Algorithm 1, gradient norm clipping) and Sec. 3.1 (Fig. 6)",
        claim="(paraphrase) When the gradient explodes, a plain gradient step can throw the parameters far away "
        "and undo the learning; rescaling the gradient whenever its norm exceeds a threshold keeps the step "
        "bounded, so training stays stable and still learns.",
    ),
    group=GROUP,
)
def pascanu2013_clipping(ctx: Context) -> Outcome:
    """Train the same exploding tanh RNN with and without norm clipping at 1."""
    length, hidden, batch, lr, eval_every = 20, 32, 64, 0.1, 50
    steps = ctx.pick(2500, 4000)
    seeds = ctx.seeds(1, 3)
    runs: dict[str, list[Run]] = {"unclipped": [], "clipped": []}
    baselines: list[float] = []
    for seed in seeds:
        x_test, y_test = adding_problem(1000, length, seed=seed + 10_000)
        baselines.append(float(F.mse_loss(torch.ones_like(y_test), y_test)))
        batches = adding_batches(steps, batch, length, seed)
        for name in runs:
            model = recurrent_net("tanh", hidden, seed, gain=CLIP_GAIN)
            params = list(model.parameters())
            clip = partial(gradguard.clip_grad_norm_, params, CLIP_THRESHOLD) if name == "clipped" else None
            runs[name].append(train(model, torch.optim.SGD(params, lr=lr), batches, F.mse_loss, steps, clip=clip,
                                    evaluate=mse_on(model, x_test, y_test), eval_every=eval_every))

    baseline = float(np.mean(baselines))
    unclipped_diverged = [diverged(r) for r in runs["unclipped"]]
    clipped_finite = [not diverged(r) for r in runs["clipped"]]
    clipped_mse = [r.final for r in runs["clipped"]]
    learns = [m < 0.5 * baseline for m in clipped_mse]
    passed = bool(all(unclipped_diverged) and all(clipped_finite) and all(learns))

    first, clipped = runs["unclipped"][0], runs["clipped"][0]
    growth = float(np.max(first.grad_norm[np.isfinite(first.grad_norm)]) / first.grad_norm[0])
    measured: dict[str, Any] = {
        "baseline_mse": baseline,
        "unclipped_diverged": unclipped_diverged,
        "unclipped_first_nonfinite_step": [r.diverged_at for r in runs["unclipped"]],
        "unclipped_max_loss_over_initial": [finite(float(np.nanmax(np.where(np.isinf(r.loss), np.nan, r.loss))
                                                         / r.loss[0])) for r in runs["unclipped"]],
        "unclipped_max_finite_grad_norm_over_initial": finite(growth),
        "clipped_all_finite": clipped_finite,
        "clipped_test_mse": [finite(m) for m in clipped_mse],
        "clipped_fraction_of_steps_clipped": float(np.mean(clipped.grad_norm > CLIP_THRESHOLD)),
        "clipped_max_grad_norm": finite(float(np.max(clipped.grad_norm))),
        "steps": steps,
        "seeds": len(seeds),
    }
    expected = {
        "unclipped": f"diverges: the loss goes non-finite or above {SPIKE:g} x its initial value",
        "clipped": "every loss finite, and test MSE below half the baseline (predicting the mean, ~1/6)",
    }

    fig = new_figure(11.0, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    # Log step axes (step + 1): the unclipped run lasts a few dozen steps, the clipped one thousands.
    for run, name, color in ((first, "no clipping", "tab:red"), (clipped, "clip norm at 1", "tab:blue")):
        ax1.plot(np.arange(1, len(run.grad_norm) + 1), run.grad_norm, color=color, lw=0.8, label=name)
        ax2.plot(np.arange(1, len(run.loss) + 1), run.loss, color=color, lw=0.8, label=f"{name} (train)")
        if run.diverged_at is not None:
            for ax in (ax1, ax2):
                ax.axvline(run.diverged_at + 1, color=color, ls=":", label=f"non-finite at step {run.diverged_at}")
    ax1.axhline(CLIP_THRESHOLD, color="black", ls="--", lw=1, label="clipping threshold")
    ax2.plot(np.array(clipped.eval_steps) + 1, clipped.evals, color="tab:blue", marker="o", ms=3, ls="none",
             label="clipped (test)")
    ax2.axhline(baseline, color="grey", ls="--", label="baseline (predict 1)")
    ax1.set(xscale="log", yscale="log", xlabel="training step + 1", ylabel="total gradient norm (before clipping)",
            title="Gradient norm (watch)")
    ax2.set(xscale="log", yscale="log", xlabel="training step + 1", ylabel="MSE", title="Loss (cut at 1e4)",
            ylim=(1e-3, 1e4))
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)

    where = (f"went non-finite at step {first.diverged_at}" if first.diverged_at is not None
             else f"rose to {float(np.max(first.loss)):.3g}")
    interpretation = (
        f"Without clipping the gradient norm grew to {growth:.3g} times its initial value within "
        f"{int(np.argmax(np.where(np.isfinite(first.grad_norm), first.grad_norm, 0)))} steps and the loss {where}: "
        f"with a recurrent matrix of spectral radius {CLIP_GAIN:g} a step on an exploding gradient moves the "
        f"weights far, and the larger weights make the next gradient larger still. With the norm clipped at 1 "
        f"({100 * measured['clipped_fraction_of_steps_clipped']:.0f}% of the steps were clipped, the largest raw norm "
        f"{measured['clipped_max_grad_norm']:.3g}) every step is bounded by lr x 1, the run stays finite and reaches a "
        f"test MSE of {clipped_mse[0]:.3g} against {baseline:.3f} for predicting the mean."
    )
    table = (
        ["seed", "unclipped: first non-finite step", "unclipped diverged", "clipped test MSE", "clipped finite"],
        [[s, r.diverged_at, d, m, f] for s, r, d, m, f in
         zip(seeds, runs["unclipped"], unclipped_diverged, clipped_mse, clipped_finite)],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- brock2021-agc ---------------------------------------------------------------------------------

AGC_CLIPPING = 0.01  # a small lambda, as the paper finds best for large batches (Fig. 2)
TRAINS = 0.8  # "trains": test accuracy of at least 80% (chance is 10%)


def minibatches(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, seed: int) -> Callable[[int], Batch]:
    """Random minibatches (with replacement across steps), the same for every run with this seed."""
    g = torch.Generator().manual_seed(seed)
    order = [torch.randint(0, len(x), (batch,), generator=g) for _ in range(steps)]
    return lambda step: (x[order[step]], y[order[step]])


def agc(model: nn.Sequential, fractions: list[float]) -> Callable[[], None]:
    """AGC on every layer but the last (as the paper does), appending the fraction of units clipped to ``fractions``."""
    last = list(model[-1].parameters())

    def clip() -> None:
        fractions.append(float(gradguard.adaptive_clip_grad_(model.parameters(), AGC_CLIPPING, exclude=last)))

    return clip


@case(
    "brock2021-agc",
    title="Adaptive gradient clipping keeps a normaliser-free net training at high learning rates",
    question="Does unit-wise adaptive gradient clipping let a deep network without normalisation train at "
    "learning rates where the unclipped one diverges?",
    setup="Digits, a 9-layer ReLU MLP (8 hidden layers of 128, He init, no normalisation), SGD with momentum 0.9 "
    "and batches of 512 (a third of the training set) for 200 steps, over a sweep of learning rates; once "
    "unclipped and once with gradguard.adaptive_clip_grad_(clipping=0.01), the last layer excluded as in the "
    "paper.",
    source=Source(
        citation="Brock, De, Smith & Simonyan 2021, High-Performance Large-Scale Image Recognition Without "
        "Normalization (NFNets), ICML, Sec. 4 and Fig. 2",
        claim="(paraphrase) Adaptive gradient clipping, which clips each unit's gradient when its norm exceeds "
        "a fraction lambda of the unit's weight norm, lets normaliser-free networks train stably at larger "
        "batch sizes and learning rates, where unclipped ones become unstable.",
        qualitative=True,
    ),
    group=GROUP,
)
def brock2021_agc(ctx: Context) -> Outcome:
    """Sweep the learning rate with and without AGC and compare the largest one that still trains."""
    depth, width, batch = 8, 128, 512
    steps = ctx.pick(200, 400)
    lrs = ctx.pick([0.05, 0.1, 0.2, 0.4], [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6])
    seeds = ctx.seeds(1, 3)
    variants = ("unclipped", "AGC")
    accuracy: dict[str, list[float]] = {v: [] for v in variants}  # per lr: the worst seed's accuracy
    blew_up: dict[str, list[bool]] = {v: [] for v in variants}  # per lr: any seed diverged
    shown: dict[str, Run] = {}
    clipped_fraction: list[float] = []
    for lr in lrs:
        acc: dict[str, list[float]] = {v: [] for v in variants}
        div: dict[str, list[bool]] = {v: [] for v in variants}
        for seed in seeds:
            x, y, x_test, y_test = digits(seed)
            batches = minibatches(x, y, batch, steps, seed)
            for variant in variants:
                model = mlp([64] + [width] * depth + [10], "relu", init="kaiming", seed=seed)
                clip = agc(model, clipped_fraction) if variant == "AGC" else None
                opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
                run = train(model, opt, batches, F.cross_entropy, steps, clip=clip,
                            evaluate=accuracy_on(model, x_test, y_test))
                acc[variant].append(run.final if not diverged(run) else math.nan)
                div[variant].append(diverged(run))
                if seed == seeds[0]:
                    shown[f"{variant} {lr:g}"] = run
        for v in variants:
            accuracy[v].append(min(acc[v]) if not any(div[v]) else math.nan)
            blew_up[v].append(any(div[v]))

    def largest_training_lr(variant: str) -> float | None:
        ok = [lr for lr, a in zip(lrs, accuracy[variant]) if math.isfinite(a) and a >= TRAINS]
        return max(ok) if ok else None

    best = {v: largest_training_lr(v) for v in variants}
    agc_lr, plain_lr = best["AGC"], best["unclipped"]
    wider = agc_lr is not None and (plain_lr is None or agc_lr > plain_lr)
    # At the largest rate AGC trains at, the unclipped run must have diverged (not merely trained worse).
    passed = bool(wider and agc_lr is not None and blew_up["unclipped"][lrs.index(agc_lr)])

    measured: dict[str, Any] = {
        "learning_rates": lrs,
        "test_accuracy": {v: [finite(a) for a in accuracy[v]] for v in variants},
        "diverged": blew_up,
        "largest_lr_that_trains": best,
        "agc_fraction_of_units_clipped": float(np.mean(clipped_fraction)) if clipped_fraction else 0.0,
        "steps": steps,
        "seeds": len(seeds),
    }
    expected = {
        "largest_lr_that_trains": f"larger with AGC than without (trains = test accuracy >= {TRAINS:.0%} for "
        f"every seed, chance 10%)",
        "unclipped_at_that_lr": f"diverges (loss non-finite or above {SPIKE:g} x its initial value)",
    }

    fig = new_figure(11.0, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = {"unclipped": "tab:red", "AGC": "tab:blue"}
    for v in variants:
        shown_acc = [a if math.isfinite(a) else 0.0 for a in accuracy[v]]
        ax1.plot(lrs, shown_acc, color=colors[v], marker="o", label=v)
    ax1.axhline(0.1, color="grey", ls="--", label="chance")
    ax1.set(xscale="log", xlabel="learning rate", ylabel="test accuracy (0 = diverged)", title="Learning-rate sweep")
    ax1.legend(fontsize=7)
    focus = agc_lr if agc_lr is not None else lrs[-1]
    plain_diverges_there = blew_up["unclipped"][lrs.index(focus)]
    for v in variants:
        run = shown[f"{v} {focus:g}"]
        ax2.plot(np.arange(1, len(run.loss) + 1), run.loss, color=colors[v], lw=0.8, label=f"{v}, lr {focus:g}")
    ax2.set(xscale="log", yscale="log", xlabel="training step + 1", ylabel="training loss (cross-entropy)",
            title=f"Training loss at lr = {focus:g}")
    ax2.legend(fontsize=7)

    focus_plain = shown[f"unclipped {focus:g}"]
    fate = (f"its loss went non-finite at step {focus_plain.diverged_at}" if focus_plain.diverged_at is not None
            else f"its loss peaked at {float(np.max(focus_plain.loss) / focus_plain.loss[0]):.3g} x its initial value")
    agc_focus = accuracy["AGC"][lrs.index(focus)]
    agc_words = (f"the clipped one reaches {agc_focus:.1%} test accuracy" if math.isfinite(agc_focus)
                 else "the clipped one diverges too")
    interpretation = (
        f"Without clipping the largest learning rate that still trains is {plain_lr}; with AGC it is {agc_lr}. "
        f"At lr = {focus:g} the unclipped network {'diverges' if plain_diverges_there else 'does not diverge'} "
        f"({fate}) while {agc_words}. AGC caps each unit's gradient at {AGC_CLIPPING:g} x the norm of its weights "
        f"({measured['agc_fraction_of_units_clipped']:.0%} of the units were clipped per step, averaged over all AGC "
        f"runs), so however large the raw gradient, one step moves a unit's weights by at most lr x {AGC_CLIPPING:g} "
        f"of their norm: the relative step size that normalisation layers otherwise keep in check."
    )
    table = (
        ["learning rate", "unclipped accuracy", "unclipped diverged", "AGC accuracy", "AGC diverged"],
        [[lr, accuracy["unclipped"][i], blew_up["unclipped"][i], accuracy["AGC"][i], blew_up["AGC"][i]]
         for i, lr in enumerate(lrs)],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- lecun1998-stability ---------------------------------------------------------------------------

FACTOR_STEPS = 10  # the per-step factor is read over the first steps, before roundoff can dominate


@case(
    "lecun1998-stability",
    title="Gradient descent on a quadratic: stable below 2 / lambda_max, divergent above",
    question="Does full-batch gradient descent on a quadratic loss converge for every learning rate below "
    "2/lambda_max and diverge above it, with lambda_max the Hessian's largest eigenvalue?",
    setup="Linear regression on the standardised diabetes data (353 training points, 10 features and a bias, "
    "float64), MSE loss, full-batch gradient descent from a random start at learning rates that are multiples "
    "of 1/lambda_max; lambda_max from gradguard's hessian_top_eigenvalue, checked against the closed form "
    "2/N X^T X.",
    source=Source(
        citation="LeCun, Bottou, Orr & Mueller 1998, Efficient BackProp, in Neural Networks: Tricks of the "
        "Trade, Sec. 5.1 (the figure of gradient descent on a quadratic for different learning rates)",
        claim="(paraphrase) On a quadratic cost, gradient descent with learning rate eta converges along an "
        "eigendirection of the Hessian with eigenvalue lambda when eta < 2/lambda (monotonically below 1/lambda, "
        "oscillating between 1/lambda and 2/lambda) and diverges when eta > 2/lambda; the largest stable "
        "learning rate is 2/lambda_max.",
    ),
    group=GROUP,
)
def lecun1998_stability(ctx: Context) -> Outcome:
    """Run gradient descent at multiples of 1/lambda_max and read the error's factor along the top eigenvector."""
    steps = ctx.pick(200, 1000)
    multiples = ctx.pick([0.5, 1.5, 1.9, 2.1, 2.3], [0.25, 0.5, 0.75, 1.25, 1.5, 1.75, 1.9, 1.99, 2.01, 2.1, 2.3, 2.5])
    x, y, _, _ = diabetes(ctx.seed)
    x, y = x.double(), y.double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [w..., b]
    hessian = 2.0 / len(x) * design.T @ design
    eigvals, eigvecs = torch.linalg.eigh(hessian)
    lam_closed, top = float(eigvals[-1]), eigvecs[:, -1]
    optimum = torch.linalg.lstsq(design, y).solution.reshape(-1)
    best_loss = float(F.mse_loss(design @ optimum, y.reshape(-1)))

    def model_at_start() -> nn.Linear:
        torch.manual_seed(ctx.seed)
        return nn.Linear(x.shape[1], 1).double()

    lam = hessian_top_eigenvalue(model_at_start(), x, y, F.mse_loss, iters=100, tol=1e-10, seed=ctx.seed)

    runs: dict[float, Run] = {}
    factors: dict[float, float] = {}
    for m in multiples:
        model = model_at_start()

        def top_error(model: nn.Linear = model) -> float:
            theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
            return float(top @ (theta - optimum))

        run = train(model, torch.optim.SGD(model.parameters(), lr=m / lam.value), lambda s: (x, y), F.mse_loss,
                    steps, evaluate=top_error, eval_every=1)
        runs[m] = run
        e = np.abs(np.array(run.evals))
        factors[m] = float((e[FACTOR_STEPS] / e[0]) ** (1.0 / FACTOR_STEPS))

    def converges(m: float) -> bool:
        return bool(np.all(np.isfinite(runs[m].loss)) and runs[m].loss[-1] < runs[m].loss[0])

    def explodes(m: float) -> bool:
        loss = runs[m].loss
        return bool(not np.all(np.isfinite(loss)) or loss[-1] > SPIKE * loss[0])

    def factor_ok(m: float) -> bool:
        return abs(factors[m] - abs(1 - m)) <= 0.01 * abs(1 - m)

    lam_ok = abs(lam.value / lam_closed - 1) <= 0.01
    below = [m for m in multiples if m < 2]
    above = [m for m in multiples if m > 2]
    passed = bool(lam_ok and all(converges(m) and factor_ok(m) for m in below)
                  and all(explodes(m) and factor_ok(m) for m in above))

    measured: dict[str, Any] = {
        "lambda_max_power_iteration": lam.value,
        "lambda_max_closed_form": lam_closed,
        "power_iterations": lam.iterations,
        "max_stable_lr": 2.0 / lam.value,
        "least_squares_loss": best_loss,
        "runs": [{"lr_times_lambda_max": m, "initial_loss": finite(float(runs[m].loss[0])),
                  "final_loss": finite(float(runs[m].loss[-1])), "top_direction_factor": finite(factors[m]),
                  "predicted_factor": abs(1 - m)} for m in multiples],
        "steps": steps,
    }
    expected = {
        "lambda_max": "power iteration within 1% of the closed form 2/N X^T X",
        "below_2_over_lambda_max": "converges: final loss below the initial one",
        "above_2_over_lambda_max": f"diverges: final loss above {SPIKE:g} x the initial one",
        "top_direction_factor": "|1 - lr lambda_max| per step, within 1%",
    }

    fig = new_figure(11.0, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = dict(zip(multiples, palette(len(multiples))))
    for m in multiples:
        # Excess over the optimum, floored at 1e-16 (roundoff) and not drawn above 1e20 (where float64 overflows).
        excess = np.maximum(runs[m].loss - best_loss, 1e-16)
        excess[~(excess <= 1e20)] = np.nan
        ax1.plot(np.arange(len(excess)), excess, color=colors[m], label=f"lr = {m:g} / lambda_max")
    ax1.set(yscale="log", xlabel="step", ylabel="loss - least-squares loss", title="Gradient descent on the MSE")
    ax1.legend(fontsize=7)
    grid = np.linspace(0.0, max(multiples) + 0.2, 200)
    ax2.plot(grid, np.abs(1 - grid), color="black", lw=1, label="|1 - lr lambda_max| (theory)")
    ax2.plot(multiples, [factors[m] for m in multiples], "o", color="tab:red", label="measured (top eigenvector)")
    ax2.axhline(1.0, color="grey", ls="--", lw=1)
    ax2.axvline(2.0, color="grey", ls=":", lw=1, label="lr = 2 / lambda_max")
    ax2.set(xlabel="lr x lambda_max", ylabel="error factor per step", title="Along the sharpest direction")
    ax2.legend(fontsize=7)

    m_lo, m_hi = max(below), min(above)
    interpretation = (
        f"Power iteration gives lambda_max = {lam.value:.4f} against {lam_closed:.4f} from 2/N X^T X, so the "
        f"largest stable learning rate is {2 / lam.value:.4f}. At {m_lo:g}/lambda_max the error along the top "
        f"eigenvector is multiplied by {factors[m_lo]:.4f} per step (theory {abs(1 - m_lo):.2f}) and the loss falls "
        f"from {runs[m_lo].loss[0]:.3g} to {runs[m_lo].loss[-1]:.3g}; at {m_hi:g}/lambda_max it is multiplied by "
        f"{factors[m_hi]:.4f} (theory {abs(1 - m_hi):.2f}) and the loss grows to {runs[m_hi].loss[-1]:.3g} after "
        f"{steps} steps. Each eigendirection evolves on its own by 1 - lr lambda, so the sharpest one alone decides "
        f"whether the whole run converges."
    )
    table = (
        ["lr x lambda_max", "initial loss", "final loss", "measured factor", "|1 - lr lambda_max|"],
        [[m, float(runs[m].loss[0]), float(runs[m].loss[-1]), factors[m], abs(1 - m)] for m in multiples],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)


# -- cohen2021-edge-of-stability -------------------------------------------------------------------

EDGE_BAND = 0.2  # "hovers at 2/lr": within 20% of it


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 ||f(x) - y||^2 averaged over the examples: the square loss of Cohen et al. on one-hot targets."""
    return 0.5 * ((out - target) ** 2).sum(dim=1).mean()


@case(
    "cohen2021-edge-of-stability",
    title="Full-batch gradient descent climbs to the edge of stability, sharpness ~ 2/lr",
    question="Under full-batch gradient descent, does the sharpness (the loss Hessian's largest eigenvalue) rise "
    "during training until it reaches 2/lr, and then hover there instead of exceeding it?",
    setup="Digits (the first 500 training points, one-hot targets), a tanh MLP 64-100-100-10 with PyTorch's "
    "default init, square loss, full-batch gradient descent at two learning rates; the sharpness measured "
    "every 25 steps with gradguard's hessian_top_eigenvalue (power iteration, 20 Hessian-vector products).",
    source=Source(
        citation="Cohen, Kaur, Li, Kolter & Talwalkar 2021, Gradient Descent on Neural Networks Typically Occurs "
        "at the Edge of Stability, ICLR, Fig. 1 and Sec. 3",
        claim="(paraphrase) During full-batch gradient descent the sharpness rises (progressive sharpening) "
        "until it reaches 2/eta, then hovers right at, or just above, 2/eta, while the training loss keeps "
        "decreasing over long timescales, though not monotonically.",
        qualitative=True,
    ),
    group=GROUP,
)
def cohen2021_edge_of_stability(ctx: Context) -> Outcome:
    """Train with full-batch GD at two learning rates and follow the sharpness against 2/lr."""
    n, every = 500, 25
    steps = ctx.pick(1500, 3000)
    lrs = ctx.pick([0.25, 0.4], [0.15, 0.25, 0.4])
    x_all, y_all, _, _ = digits(ctx.seed)
    x, y = x_all[:n], F.one_hot(y_all[:n], 10).float()
    runs: dict[float, Run] = {}
    for lr in lrs:
        model = mlp([64, 100, 100, 10], "tanh", seed=ctx.seed)

        def sharpness(model: nn.Module = model) -> float:
            return hessian_top_eigenvalue(model, x, y, half_squared_error, iters=20, seed=ctx.seed).value

        runs[lr] = train(model, torch.optim.SGD(model.parameters(), lr=lr), lambda s: (x, y), half_squared_error,
                         steps, evaluate=sharpness, eval_every=every)

    results: dict[float, dict[str, Any]] = {}
    for lr, run in runs.items():
        edge = 2.0 / lr
        sharp = np.array(run.evals)
        at = np.array(run.eval_steps)
        late = sharp[at >= steps // 2]
        reached = first_below(run.eval_steps, -sharp, -0.9 * edge)  # first step with sharpness >= 0.9 * 2/lr
        loss = run.loss
        results[lr] = {
            "two_over_lr": edge,
            "initial_sharpness": float(sharp[0]),
            "step_reaching_0.9_edge": reached,
            "late_sharpness_min_over_edge": float(late.min() / edge),
            "late_sharpness_max_over_edge": float(late.max() / edge),
            "late_sharpness_mean_over_edge": float(late.mean() / edge),
            "initial_loss": float(loss[0]),
            "final_loss": finite(float(loss[-1])),
            "fraction_of_steps_loss_rose_after_edge": (float(np.mean(np.diff(loss[reached:]) > 0))
                                                       if reached is not None and reached < len(loss) - 1 else None),
        }
    sharpening = all(r["initial_sharpness"] < 0.9 * r["two_over_lr"] and r["step_reaching_0.9_edge"] is not None
                     for r in results.values())
    hovering = all(r["late_sharpness_min_over_edge"] >= 1 - EDGE_BAND and r["late_sharpness_max_over_edge"] <= 1
                   + EDGE_BAND for r in results.values())
    passed = bool(sharpening and hovering and all(r["final_loss"] is not None for r in results.values()))

    measured = {"runs": [{"lr": lr, **r} for lr, r in results.items()], "steps": steps, "sharpness_every": every}
    expected = {
        "progressive_sharpening": "the sharpness starts below 0.9 x 2/lr and rises to at least 0.9 x 2/lr",
        "edge_of_stability": f"every sharpness measured in the second half of training within {EDGE_BAND:.0%} of "
        f"2/lr",
    }

    fig = new_figure(11.0, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = dict(zip(lrs, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for lr, run in runs.items():
        ax1.plot(np.arange(len(run.loss)), run.loss, color=colors[lr], lw=0.8, label=f"lr = {lr:g}")
        ax2.plot(run.eval_steps, run.evals, color=colors[lr], marker=".", label=f"sharpness, lr = {lr:g}")
        ax2.axhline(2.0 / lr, color=colors[lr], ls="--", lw=1, label=f"2/lr = {2 / lr:.3g}")
    ax1.set(yscale="log", xlabel="step", ylabel="training loss (square)", title="Training loss")
    ax2.set(xlabel="step", ylabel="sharpness (top Hessian eigenvalue)", title="Sharpness against 2/lr")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)

    parts = [
        f"at lr = {lr:g} it rose from {r['initial_sharpness']:.2f} to 90% of 2/lr = {r['two_over_lr']:.2f} by step "
        f"{r['step_reaching_0.9_edge']}, and over the second half of training stayed between "
        f"{r['late_sharpness_min_over_edge']:.2f} and {r['late_sharpness_max_over_edge']:.2f} times 2/lr"
        for lr, r in results.items()
    ]
    first = results[lrs[0]]
    interpretation = (
        f"The sharpness grew as training went on ({'; '.join(parts)}). Above 2/lr gradient descent would be unstable "
        f"along the sharpest direction (lecun1998-stability), so once there the iterates oscillate along it and "
        f"that oscillation pushes the sharpness back down: the network self-stabilises at the edge, and the loss "
        f"still falls, from {first['initial_loss']:.3g} to {first['final_loss']:.3g} at lr = {lrs[0]:g}, though it "
        f"rises on {100 * (first['fraction_of_steps_loss_rose_after_edge'] or 0):.0f}% of the steps after reaching "
        f"the edge."
    )
    table = (
        ["lr", "2/lr", "initial sharpness", "step reaching 0.9 x 2/lr", "late min / (2/lr)", "late max / (2/lr)",
         "final loss"],
        [[lr, r["two_over_lr"], r["initial_sharpness"], r["step_reaching_0.9_edge"], r["late_sharpness_min_over_edge"],
          r["late_sharpness_max_over_edge"], r["final_loss"]] for lr, r in results.items()],
    )
    return Outcome(measured, expected, passed, fig, interpretation, table)
