"""The demo: watch a deep MLP learn scikit-learn's digits, then try the proposed fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from .report.terminal import print_summary
from .watch import watch

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised digits (8x8 images, 10 classes), split 80/20: x_train, y_train, x_test, y_test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the demo uses scikit-learn's bundled digits data set: pip install 'gradguard[demo]'"
        ) from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


def mlp(depth: int, activation: str, width: int = 64, he_init: bool = False) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with the given activation, 64 inputs, 10 outputs."""
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        if he_init:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, _ACTIVATIONS[activation]()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def train(
    model: nn.Module, data: tuple[torch.Tensor, ...], steps: int, seed: int, store: Path | None = None
) -> tuple[float, object]:
    """Train with SGD (lr 0.01, momentum 0.9, batch 128) under watch; returns (test accuracy, watch)."""
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    with watch(model, optimizer=opt, store=store, overwrite=True, activations_every=10, seed=seed) as w:
        for _ in range(steps):
            idx = torch.randint(0, len(x_train), (128,), generator=gen)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            w.step(loss=loss)
            opt.step()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    return acc, w


def run_demo(depth: int = 20, activation: str = "sigmoid", steps: int = 150, store: Path | None = None,
             seed: int = 0) -> None:
    """Train, print the summary and findings, and measure the first proposed fix.

    Run it inside :func:`gradguard.numerics.flush_denormals` (the command does): vanished
    signals are subnormal numbers, slow on a CPU.
    """
    console = Console()
    torch.manual_seed(seed)
    data = load_digits_tensors(seed)
    console.rule(f"[bold]{depth}-layer {activation} MLP on digits, default init, {steps} SGD steps")
    acc, w = train(mlp(depth, activation), data, steps, seed, store)
    print_summary(w.trace, w.findings, last=20, console=console)  # type: ignore[attr-defined]
    console.print(f"test accuracy: [bold]{acc:.1%}[/] (chance is 10%)")
    if store is not None:
        console.print(f"recorded to {store}: `gradguard summary {store}`")
    kinds = {f.kind for f in w.findings}  # type: ignore[attr-defined]
    if activation != "relu" and kinds & {"vanishing_gradient", "saturated_activation"}:
        console.rule("[bold]the first proposed fix: ReLU with He initialisation")
        torch.manual_seed(seed)
        fixed_acc, fixed = train(mlp(depth, "relu", he_init=True), data, steps, seed)
        norms = fixed.trace.metric("grad_norm")[-20:]  # type: ignore[attr-defined]
        before = w.trace.metric("grad_norm")[-20:]  # type: ignore[attr-defined]
        ratio = lambda g: float(np.nanmedian(g[:, 0]) / np.nanmedian(g[:, -1]))  # noqa: E731
        console.print(
            f"first/last layer gradient norm: {ratio(before):.1e} -> {ratio(norms):.1e}; "
            f"test accuracy: {acc:.1%} -> [bold]{fixed_acc:.1%}[/]"
        )
        left = [str(f) for f in fixed.findings]  # type: ignore[attr-defined]
        console.print("findings after the fix: " + ("\n".join(left) if left else "[green]none[/]"), highlight=False)
