"""Step-time overhead of ``gradguard.watch`` against the bare training loop, as ratios.

Every variant trains its own identical copy of the model (same initial weights, same
data, SGD with a tiny learning rate), so one variant's hooks never fire in another's
steps. Blocks of ``--steps`` steps are interleaved over ``--rounds`` rounds in a seeded,
shuffled order; each block's time is divided by the bare block of the same round, and
the median ratio over rounds is reported with its interquartile range. A gradguard
variant keeps one Watch open across all its blocks, so flushes and activation sampling
happen at their real rate; creating and closing it are not timed.

    python benchmarks/overhead.py [--models mlp20x512,transformer,mlp1000x64]
        [--rounds 15] [--steps 10] [--json] [--threads N] [--quick] [--integrations lightning,transformers]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules
import steady_malloc  # noqa: E402

try:
    import gradguard
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import gradguard

WARMUP_STEPS = 3
SEED = 0

# A monitor: called after backward and before optimizer.step(), with the loss tensor.
Monitor = Callable[[torch.Tensor], object]


@dataclass
class Task:
    """A model with its fixed batch and loss function."""

    model: nn.Module
    inputs: torch.Tensor
    target: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Runner:
    """One variant: its own model copy, optimizer and monitor, plus its block times."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    monitor: Monitor | None
    close: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)


# -- models ------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding -> TransformerEncoder -> vocabulary logits."""

    def __init__(self, vocab: int = 1000, d_model: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab]."""
        return self.head(self.encoder(self.embed(tokens)))


def _mlp(depth: int, width: int) -> nn.Sequential:
    """depth x (Linear(width, width) + ReLU)."""
    mods: list[nn.Module] = []
    for _ in range(depth):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [B, S, V] logits against [B, S] tokens."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def make_task(name: str) -> Task:
    """Build a model (seeded) and its fixed random batch."""
    torch.manual_seed(SEED)
    if name == "mlp20x512":
        return Task(_mlp(20, 512), torch.randn(256, 512), torch.randn(256, 512), nn.functional.mse_loss)
    if name == "mlp1000x64":
        return Task(_mlp(1000, 64), torch.randn(256, 64), torch.randn(256, 64), nn.functional.mse_loss)
    if name == "transformer":
        return Task(TinyLM(), torch.randint(0, 1000, (16, 64)), torch.randint(0, 1000, (16, 64)), _lm_loss)
    raise SystemExit(f"unknown model {name!r}; choose from mlp20x512, transformer, mlp1000x64")


# -- variants ----------------------------------------------------------------------------


def _grads(model: nn.Module) -> list[torch.Tensor]:
    """The model's current gradients (parameters without one are skipped)."""
    return [p.grad for p in model.parameters() if p.grad is not None]


def _runner(name: str, model: nn.Module, monitor: Monitor | None, close: Callable[[], None] | None = None) -> Runner:
    """A Runner with its own SGD optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return Runner(name, model, opt, monitor, close or (lambda: None))


def _gradguard(name: str, model: nn.Module, **kwargs: Any) -> Runner:
    """A variant recording through one Watch that stays open across all its blocks."""
    w = gradguard.watch(model, **kwargs)
    return _runner(name, model, lambda loss: w.step(loss=loss), w.close)


def _wandb(model: nn.Module, tmpdir: str) -> Runner:
    """wandb.watch(log="gradients", log_freq=1), logging the loss every step (offline)."""
    import wandb

    run = wandb.init(mode="offline", dir=tmpdir, project="gradguard-overhead", reinit=True)
    wandb.watch(model, log="gradients", log_freq=1)

    def monitor(loss: torch.Tensor) -> None:
        wandb.log({"loss": loss.item()})

    def close() -> None:
        wandb.unwatch(model)
        run.finish()

    return _runner("wandb_watch", model, monitor, close)


def _foreach_norm(model: nn.Module) -> Runner:
    """The floor: one fused read of every gradient."""
    return _runner("foreach_norm", model, lambda loss: torch._foreach_norm(_grads(model)))


def _clip(model: nn.Module) -> Runner:
    """clip_grad_norm_ with a threshold that never clips."""
    return _runner("clip_grad_norm_", model, lambda loss: torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))


def _item_norms(model: nn.Module) -> Runner:
    """The classic slow monitor: one .item() per parameter."""
    return _runner("item_norms", model, lambda loss: [g.norm().item() for g in _grads(model)])


def make_runners(
    task: Task, tmpdir: str, skipped: list[dict[str, str]], only: set[str] | None = None
) -> list[Runner]:
    """Every variant (or those in ``only``), each on its own deep copy of the model (bare first)."""

    def fresh() -> nn.Module:
        return copy.deepcopy(task.model)

    runners = [
        _runner("bare", fresh(), None),
        _foreach_norm(fresh()),
        _clip(fresh()),
        _item_norms(fresh()),
        _gradguard("gradguard", fresh(), every=1, weights_every=10, activations_every=0),
        _gradguard("gradguard_hooks", fresh(), activations_every=0, strategy="hooks"),
        _gradguard("gradguard_fused", fresh(), activations_every=0, strategy="fused"),
        _gradguard("gradguard_weights1", fresh(), weights_every=1, activations_every=0),
        _gradguard("gradguard_every10", fresh(), every=10, activations_every=0),
        _gradguard("gradguard_acts50", fresh(), activations_every=50),
    ]
    if only is not None:
        runners = [r for r in runners if r.name == "bare" or r.name in only]
        if "wandb_watch" not in only:
            return runners
    try:
        import wandb  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        if not any(s["variant"] == "wandb_watch" for s in skipped):
            skipped.append({"variant": "wandb_watch", "reason": f"import wandb failed: {type(e).__name__}: {e}"})
    else:
        runners.append(_wandb(fresh(), tmpdir))
    return runners


# -- timing ------------------------------------------------------------------------------


def run_steps(r: Runner, task: Task, steps: int) -> None:
    """Train ``steps`` steps: forward, backward, monitor, optimizer step, zero_grad."""
    for _ in range(steps):
        loss = task.loss_fn(r.model(task.inputs), task.target)
        loss.backward()
        if r.monitor is not None:
            r.monitor(loss)
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)


def interleave(runners: list[Runner], task: Task, rounds: int, steps: int) -> None:
    """Warm each runner up, then time blocks of ``steps`` steps in a seeded, shuffled order per round."""
    for r in runners:
        run_steps(r, task, WARMUP_STEPS)
    order = list(range(len(runners)))
    rng = random.Random(SEED)
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            r = runners[i]
            gc.collect()
            t0 = time.perf_counter()
            run_steps(r, task, steps)
            r.times.append(time.perf_counter() - t0)


def bench_model(
    name: str, rounds: int, steps: int, skipped: list[dict[str, str]], only: set[str] | None = None
) -> list[dict[str, Any]]:
    """Interleaved timing of every variant on one model -> result rows."""
    task = make_task(name)
    with tempfile.TemporaryDirectory() as tmpdir:
        runners = make_runners(task, tmpdir, skipped, only)
        try:
            interleave(runners, task, rounds, steps)
        finally:
            for r in runners:
                r.close()
    bare = np.array(runners[0].times)
    rows = []
    for r in runners:
        t = np.array(r.times)
        ratio = t / bare  # per round: against the bare block of the same round
        q25, q50, q75 = np.percentile(ratio, [25, 50, 75])
        rows.append(
            {
                "model": name,
                "variant": r.name,
                "ms_per_step": float(np.median(t) / steps * 1e3),
                "ratio": float(q50),
                "ratio_iqr": float(q75 - q25),
            }
        )
    return rows


def machine(rounds: int, steps: int) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "torch": torch.__version__,
        "gradguard": gradguard.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_block": steps,
        "warmup_steps": WARMUP_STEPS,
    }


def print_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """A readable table of the results."""
    print(
        f"torch {info['torch']}, {info['threads']} threads, {info['platform']}; "
        f"{info['rounds']} rounds x {info['steps_per_block']} steps per block"
    )
    header = f"{'model':<12} {'variant':<20} {'ms/step':>9} {'ratio':>7} {'IQR':>7}"
    print(header)
    print("-" * len(header))
    last = None
    for row in rows:
        if last is not None and row["model"] != last:
            print()
        last = row["model"]
        print(
            f"{row['model']:<12} {row['variant']:<20} {row['ms_per_step']:>9.2f} "
            f"{row['ratio']:>7.3f} {row['ratio_iqr']:>7.3f}"
        )


INTEGRATIONS = ("lightning", "transformers")


def integration_rows(names: str, rounds: int, quick: bool, skipped: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Each trainer path (benchmarks/overhead_<name>.py) timed with and without gradguard's callback."""
    import importlib

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in INTEGRATIONS:
            raise SystemExit(f"unknown integration {name!r}; choose from {', '.join(INTEGRATIONS)}")
        try:
            module = importlib.import_module(f"overhead_{name}")
        except ImportError as err:  # the trainer library is an optional extra
            skipped.append({"variant": name, "reason": str(err)})
            continue
        out.append({"integration": name, **module.measure(rounds, quick)})
    return out


def print_integrations(rows: list[dict[str, Any]]) -> None:
    """Trainer paths: step time with and without the callback."""
    if not rows:
        return
    print()
    header = f"{'trainer':<14} {'model':<14} {'bare ms/step':>13} {'gradguard ms/step':>18} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['integration']:<14} {r['model']:<14} {1e3 * r['bare_step_s']:>13.2f} "
              f"{1e3 * r['gradguard_step_s']:>18.2f} {r['ratio']:>7.3f}")


def prepare(args: Any) -> str:
    """The process set-up every plain-loop timing shares: denormals flushed, malloc (returns which), threads."""
    torch.set_flush_denormal(True)
    malloc = steady_malloc.apply(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return malloc


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp20x512,transformer,mlp1000x64", help="comma-separated model names")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 rounds of 3 steps")
    ap.add_argument("--variants", default=None, help="comma-separated variants to run (bare always runs)")
    ap.add_argument(
        "--integrations", default="lightning,transformers",
        help="trainer paths to time with and without gradguard's callback (comma-separated; '' for none)",
    )
    steady_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 3
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be positive")
    malloc = prepare(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    only = {v.strip() for v in args.variants.split(",") if v.strip()} if args.variants else None
    skipped: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    for name in models:
        rows += bench_model(name, args.rounds, args.steps, skipped, only)
    integrations = integration_rows(args.integrations, args.rounds, args.quick, skipped)
    info = {**machine(args.rounds, args.steps), "malloc": malloc}
    for s in skipped:
        print(f"skipped {s['variant']}: {s['reason']}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        json.dump({"machine": info, "results": rows, "integrations": integrations, "skipped": skipped},
                  sys.stdout, indent=2)
        print()
    else:
        print_table(rows, info)
        print_integrations(integrations)


if __name__ == "__main__":
    main()
