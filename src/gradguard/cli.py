"""The ``gradguard`` command line."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="gradguard")
def main() -> None:
    """Detect, explain and fix vanishing and exploding gradients in PyTorch training."""


@main.command()
@click.argument("store", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--last", default=20, show_default=True, help="Summarise the last N recorded steps.")
def summary(store: Path, last: int) -> None:
    """Per-layer statistics and findings of a recorded run (STORE: a .db store or .npz trace)."""
    from .record import StoreError, load, load_findings
    from .report.terminal import print_summary

    if last < 1:
        raise click.BadParameter("must be at least 1", param_hint="--last")
    try:
        trace = load(store)
        findings = load_findings(store) if not str(store).endswith(".npz") else None
    except (FileNotFoundError, StoreError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print_summary(trace, findings, last=last)


@main.command()
@click.option("--depth", default=20, show_default=True, help="Hidden layers of the MLP.")
@click.option(
    "--activation", type=click.Choice(["sigmoid", "tanh", "relu"]), default="sigmoid", show_default=True
)
@click.option("--steps", default=150, show_default=True, help="Training steps.")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Record to this file.")
@click.option("--seed", default=0, show_default=True)
def demo(depth: int, activation: str, steps: int, store: Path | None, seed: int) -> None:
    """Watch a deep MLP learn scikit-learn's digits and say what went wrong."""
    from .demo import run_demo

    if depth < 1 or steps < 1:
        raise click.BadParameter("--depth and --steps must be at least 1")
    run_demo(depth=depth, activation=activation, steps=steps, store=store, seed=seed)


if __name__ == "__main__":  # pragma: no cover
    main()
