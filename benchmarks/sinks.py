"""Cost of sending watch's statistics to TensorBoard (and W&B / MLflow), as ratios to the bare loop.

Variants, each on its own identical copy of the model: the bare loop, ``watch`` alone, and
``watch`` with a sink. A timed block is ``--steps`` steps and the Watch flushes every
``--steps`` steps, so every block pays exactly one flush, the only time a sink works
(and the closing flush is not timed).
Blocks are interleaved over ``--rounds`` rounds in a seeded shuffled order; each block's
time is divided by the bare block of the same round, and the median ratio is reported with
its interquartile range. ``sink_ms_per_flush`` is the extra time per flush against ``watch``
alone (median of per-round differences).

    python benchmarks/sinks.py [--models mlp20x512,mlp1000x64] [--sinks tensorboard,wandb,mlflow]
        [--rounds 7] [--steps 50] [--json] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import steady_malloc  # noqa: E402
from overhead import Runner, Task, interleave, machine, make_task, prepare  # noqa: E402

import gradguard  # noqa: E402

SINKS = ("tensorboard", "wandb", "mlflow")


def _sink(kind: str, tmpdir: str, stack: ExitStack) -> Any:
    """A sink of the given kind writing under tmpdir (W&B offline, MLflow into SQLite)."""
    from gradguard.sinks import MLflow, TensorBoard, WandB

    if kind == "tensorboard":
        return TensorBoard(os.path.join(tmpdir, "tb"))
    if kind == "wandb":
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(mode="offline", dir=tmpdir, project="gradguard-sinks")
        stack.callback(run.finish)
        return WandB(run)
    if kind == "mlflow":
        import mlflow

        mlflow.set_tracking_uri("sqlite:///" + os.path.join(tmpdir, "mlflow.db"))
        experiment = mlflow.create_experiment("gradguard-sinks", artifact_location=os.path.join(tmpdir, "artifacts"))
        run = mlflow.start_run(experiment_id=experiment)
        stack.callback(mlflow.end_run)
        return MLflow(run.info.run_id)
    raise SystemExit(f"unknown sink {kind!r}; choose from {', '.join(SINKS)}")


def make_runners(task: Task, sinks: list[str], flush_every: int, tmpdir: str, stack: ExitStack) -> list[Runner]:
    """bare, watch, and watch + each sink, on deep copies of the model."""

    def runner(name: str, sink: Any = None) -> Runner:
        model = copy.deepcopy(task.model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        if name == "bare":
            return Runner(name, model, opt, None)
        w = gradguard.watch(model, flush_every=flush_every, sinks=[sink] if sink is not None else [])
        stack.callback(w.close)
        monitor: Callable[[torch.Tensor], object] = lambda loss: w.step(loss=loss)  # noqa: E731
        return Runner(name, model, opt, monitor, w.close)

    return [runner("bare"), runner("watch")] + [runner(f"watch+{s}", _sink(s, tmpdir, stack)) for s in sinks]


def bench(name: str, sinks: list[str], rounds: int, steps: int) -> list[dict[str, Any]]:
    """Interleaved timing of the variants on one model -> result rows."""
    task = make_task(name)
    with tempfile.TemporaryDirectory() as tmpdir, ExitStack() as stack:
        runners = make_runners(task, sinks, steps, tmpdir, stack)
        interleave(runners, task, rounds, steps)
    bare, alone = np.array(runners[0].times), np.array(runners[1].times)
    rows = []
    for r in runners:
        t = np.array(r.times)
        q25, q50, q75 = np.percentile(t / bare, [25, 50, 75])
        extra = float(np.median(t - alone) * 1e3) if r.name.startswith("watch+") else None
        rows.append({
            "model": name, "variant": r.name, "ms_per_step": float(np.median(t) / steps * 1e3),
            "ratio": float(q50), "ratio_iqr": float(q75 - q25), "sink_ms_per_flush": extra,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp20x512,mlp1000x64", help="comma-separated models (see overhead.py)")
    ap.add_argument("--sinks", default="tensorboard", help=f"comma-separated, from {', '.join(SINKS)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed block = flush_every (default 50)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    ap.add_argument("--quick", action="store_true", help="smoke test: mlp20x512, 2 rounds of 5 steps")
    steady_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.steps = "mlp20x512", 2, 5
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be positive")
    malloc = prepare(args)
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    rows: list[dict[str, Any]] = []
    for name in (m.strip() for m in args.models.split(",") if m.strip()):
        rows += bench(name, sinks, args.rounds, args.steps)
    info = {**machine(args.rounds, args.steps), "malloc": malloc}
    if args.json:
        json.dump({"machine": info, "results": rows}, sys.stdout, indent=2)
        print()
        return
    print(f"torch {info['torch']}, {info['threads']} threads; {args.rounds} rounds x {args.steps} steps (one flush)")
    print(f"{'model':<12} {'variant':<20} {'ms/step':>9} {'ratio':>7} {'IQR':>7} {'sink ms/flush':>14}")
    for row in rows:
        extra = "" if row["sink_ms_per_flush"] is None else f"{row['sink_ms_per_flush']:.1f}"
        print(
            f"{row['model']:<12} {row['variant']:<20} {row['ms_per_step']:>9.2f} "
            f"{row['ratio']:>7.3f} {row['ratio_iqr']:>7.3f} {extra:>14}"
        )


if __name__ == "__main__":
    main()
