"""The ``gradguard`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

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
    """Per-layer statistics and findings of a recorded run (STORE: a .db store or .npz trace).

    Exit status 2 when STORE is missing or not a readable store or trace.
    """
    import sys

    from .record import StoreError, load, load_findings
    from .report.terminal import print_summary

    if last < 1:
        raise click.BadParameter("must be at least 1", param_hint="--last")
    try:
        trace = load(store)
        findings = load_findings(store) if not str(store).endswith(".npz") else None
    except (FileNotFoundError, StoreError, ValueError) as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    print_summary(trace, findings, last=last)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write. [default: STORE's name with .report.html, next to it]")
def report(store: Path, output: Path | None) -> None:
    """Write a self-contained HTML post-mortem of a recorded run (STORE: a .db store or .npz trace).

    Exit status 2 when STORE is missing or not a readable store or trace.
    """
    import sys

    from .record import StoreError
    from .report.run import write_run_report

    out = output if output is not None else store.with_suffix(".report.html")
    try:
        written = write_run_report(store, out)
    except (OSError, StoreError, ValueError) as err:  # OSError: a missing STORE or an unwritable output
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    click.echo(f"report written to {written}")


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
    import sys

    from .demo import run_demo
    from .numerics import flush_denormals
    from .record import StoreError

    if depth < 1 or steps < 1:
        raise click.BadParameter("--depth and --steps must be at least 1")
    with flush_denormals():
        try:
            run_demo(depth=depth, activation=activation, steps=steps, store=store, seed=seed)
        except StoreError as err:  # --store in a missing folder, or a file that is not a store
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)


@main.command()
@click.argument("target")
@click.option("--data", default=None, metavar="NAME|FILE.npz",
              help="digits, diabetes, breast_cancer, random, or an .npz with x/y (when TARGET returns a model). "
                   "[default: digits]")
@click.option("--loss", type=click.Choice(["ce", "mse", "bce"]), default=None,
              help="Loss when TARGET returns a model. [default: by data set]")
@click.option("--batch", "batch_size", default=128, show_default=True, help="Batch size.")
@click.option("--steps", default=30, show_default=True,
              help="Steps of the short training run (0: initialisation only).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None,
              help="Optimizer of the short run when TARGET gives none. [default: sgd, momentum 0.9]")
@click.option("--lr", type=float, default=None, help="Learning rate. [default: 0.01 for sgd, 0.001 for adam]")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-hessian", is_flag=True, help="Skip the largest Hessian eigenvalue (saves ~40 backward passes).")
@click.option("--try-fixes", is_flag=True, help="Apply each proposed fix to a copy of the model and measure it.")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON on stdout, and nothing else.")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write an HTML report.")
def diagnose(target: str, data: str | None, loss: str | None, batch_size: int, steps: int, optimizer: str | None,
             lr: float | None, seed: int, no_hessian: bool, try_fixes: bool, as_json: bool, html: Path | None) -> None:
    """Diagnose gradient flow in the model TARGET returns, and say what to change.

    TARGET is path/to/file.py:callable or package.module:callable. The callable takes no
    arguments and returns an nn.Module (data and loss then come from --data and --loss) or
    a tuple (model, (inputs, targets), loss_fn[, optimizer]). TARGET files are executed as
    Python code: only diagnose files you trust.

    Exit status: 0 when no finding is an error, 1 when one is, 2 for usage errors.
    """
    import sys

    from .diagnosis.target import TargetError, resolve

    if steps < 0:
        raise click.BadParameter("must be at least 0", param_hint="--steps")
    try:
        setup = resolve(target, data=data, loss=loss, batch_size=batch_size, optimizer=optimizer, lr=lr, seed=seed)
    except TargetError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    from .diagnosis import diagnose as run
    from .numerics import flush_denormals

    chosen = setup.optimizer if setup.optimizer is not None else setup.optimizer_name
    with flush_denormals():  # vanished gradients are subnormal numbers: keep the CPU fast
        try:
            result = run(setup.model, setup.batch, setup.loss_fn, steps=steps, optimizer=chosen, lr=setup.lr,
                         hessian=not no_hessian, seed=seed, progress=not as_json)
        except (TypeError, ValueError) as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        if try_fixes:
            result.try_fixes(progress=not as_json)
    if html is not None:
        result.to_html(html)
    if as_json:
        click.echo(result.to_json())
    else:
        click.echo(f"{setup.description}\n")
        click.echo(str(result))
        if html is not None:
            click.echo(f"\nreport written to {html}")
    sys.exit(1 if result.errors else 0)


def _lab_options(f):  # noqa: ANN001, ANN202  (click decorators)
    """The options `gradguard lab` and `gradguard lab run` share."""
    f = click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout, and nothing else.")(f)
    f = click.option("--cases", "user", multiple=True, metavar="FILE.py|MODULE",
                     help="Also load the cases a Python file or module registers (repeatable). FILE is executed as "
                          "Python code: load only files you trust.")(f)
    f = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("lab-report"),
                     show_default=True, help="Folder for index.html, results.json and the plots.")(f)
    f = click.option("--address", default=None, metavar="ADDR",
                     help="With --executor ray: the cluster to join (HOST:PORT, ray://HOST[:PORT] or auto). "
                          "[default: start a local Ray of --jobs CPUs]")(f)
    f = click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where cases run: local worker processes, or Ray tasks.")(f)
    f = click.option("--seeds", default=None, metavar="LIST",
                     help="Run every case once per seed: 0,1,2 or 0-3 (inclusive) or 0-2,7. "
                          "results.json then holds a run per seed.")(f)
    f = click.option("--seed", default=0, show_default=True, help="Seed of every case: same seed, same numbers.")(f)
    f = click.option("--jobs", default=None, type=click.IntRange(min=1),
                     help="Cases run in parallel (processes, or a local Ray's CPUs). "
                          "[default: the CPU count, at most 4]")(f)
    return click.option("--full", is_flag=True, help="Larger versions with more seeds (slower).")(f)


@main.group(invoke_without_command=True)
@_lab_options
@click.pass_context
def lab(ctx: click.Context, full: bool, jobs: int | None, seed: int, seeds: str | None, executor: str,
        address: str | None, out: Path, user: tuple[str, ...], as_json: bool) -> None:
    """Reproduce the case studies of vanishing and exploding gradients, checked against their sources.

    Without a subcommand, runs the default suite and writes OUT/index.html, OUT/results.json
    and the plots. Exit status 1 when a case does not reproduce its source's claim.
    """
    if ctx.invoked_subcommand is None:
        _run_lab([], full=full, jobs=jobs, seed=seed, seeds=seeds, executor=executor, address=address, out=out,
                 user=user, as_json=as_json)


@lab.command("list")
@click.option("--cases", "user", multiple=True, metavar="FILE.py|MODULE",
              help="Also list the cases these register. FILE is executed as Python code: load only files you trust.")
def lab_list(user: tuple[str, ...]) -> None:
    """List the cases, their sources, and which are in the default suite."""
    from .lab.runner import REGISTRY, LabError, load_builtin, load_user

    load_builtin()
    try:
        for spec in user:
            load_user(spec)
    except LabError as err:
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(2) from None
    width = max(len(n) for n in REGISTRY)
    for c in REGISTRY.values():
        flag = " " if c.default else "+"
        click.echo(f"{flag} {c.name.ljust(width)}  {c.title}  [{c.source.citation}]")
    click.echo("\n+ : only with `gradguard lab run NAME` (not in the default suite)")


@lab.command("run")
@click.argument("names", nargs=-1, required=True, metavar="CASE...")
@_lab_options
def lab_run(names: tuple[str, ...], full: bool, jobs: int | None, seed: int, seeds: str | None, executor: str,
            address: str | None, out: Path, user: tuple[str, ...], as_json: bool) -> None:
    """Run the named cases (see `gradguard lab list`)."""
    _run_lab(list(names), full=full, jobs=jobs, seed=seed, seeds=seeds, executor=executor, address=address, out=out,
             user=user, as_json=as_json)


def _run_lab(names: list[str], *, full: bool, jobs: int | None, seed: int, seeds: str | None, executor: str,
             address: str | None, out: Path, user: tuple[str, ...], as_json: bool) -> None:
    import json
    import os
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .lab.executors import check_address, require_ray
    from .lab.runner import (
        LabError,
        load_builtin,
        load_user,
        parse_seeds,
        results_document,
        run_seeds,
        select,
        sweep_document,
        write_outputs,
        write_sweep_outputs,
    )

    def fail(message: str) -> NoReturn:
        click.echo(f"Error: {message}", err=True)
        sys.exit(2)

    ctx = click.get_current_context()
    if seeds is not None and ctx.get_parameter_source("seed") is not click.core.ParameterSource.DEFAULT:
        fail("give --seed or --seeds, not both")
    if address is not None and executor != "ray":
        fail("--address is the Ray cluster's address: use it with --executor ray")
    load_builtin()
    try:
        for spec in user:
            load_user(spec)
        cases = select(names)
        chosen = parse_seeds(seeds) if seeds is not None else [seed]
        if executor == "ray":
            require_ray()
            check_address(address)
    except (LabError, ImportError) as err:
        fail(str(err))
    workers = jobs or min(os.cpu_count() or 1, 4)
    sweep = len(chosen) > 1
    total = len(cases) * len(chosen)
    where = f"on Ray at {address}" if address else ("on a local Ray" if executor == "ray" else "")
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=as_json) as bar:
        parts = [f"{total} runs" if sweep else f"{total} cases", "" if address else f"{workers} at a time", where]
        task = bar.add_task(", ".join(filter(None, parts)), total=total)

        def done(r):  # noqa: ANN001, ANN202
            verdict = "[green]reproduced[/]" if r.passed else ("[red]error[/]" if r.error else "[red]not reproduced[/]")
            label = f"{r.name} (seed {r.seed})" if sweep else r.name
            if not as_json:
                bar.console.print(f"{label:<34} {verdict}  {r.seconds:5.1f} s")
            bar.advance(task)

        try:
            runs = run_seeds(cases, chosen, full=full, jobs=workers, user=user, on_done=done, executor=executor,
                             address=address)
        except LabError as err:  # Ray could not start or be joined
            bar.stop()
            fail(str(err))
    if sweep:
        report = write_sweep_outputs(runs, out, full=full)
        doc = sweep_document(runs, full=full)
    else:
        report = write_outputs(runs[chosen[0]], out, seed=chosen[0], full=full)
        doc = results_document(runs[chosen[0]], seed=chosen[0], full=full)
    failed = [r for rs in runs.values() for r in rs if not r.passed]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif sweep:
        click.echo(f"{doc['passed']} of {len(cases)} cases reproduce their source's claim under all {len(chosen)} "
                   f"seeds; report: {report}")
        for r in failed:
            click.echo(f"  {r.name} (seed {r.seed}): "
                       + (r.error.strip().splitlines()[-1] if r.error else "not reproduced"))
    else:
        click.echo(f"{len(cases) - len(failed)} of {len(cases)} cases reproduce their source's claim; "
                   f"report: {report}")
        for r in failed:
            click.echo(f"  {r.name}: " + (r.error.strip().splitlines()[-1] if r.error else "not reproduced"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
