"""Step-time overhead of ``GradguardCallback`` in a Lightning ``Trainer.fit``, as a ratio to the bare fit.

Two workloads (``--model``), ReLU MLP classifiers trained with SGD on generated data:

- ``mlp20x512`` (the default): the plain-loop benchmark's main model (``overhead.py``),
  20 x (Linear(512, 512) + ReLU) and a 10-class head, 5.3M parameters, batch 256;
- ``mlp4x1024``: the stress case, 4 x (Linear(1024, 1024) + ReLU) and the head, 4.2M
  parameters, batch 64: little compute per parameter, so gradguard's per-parameter
  passes weigh most.

Every fit of a run trains the same module, its weights restored to the same initial
values first, on the same data: one module for every variant, so all of them run on the
same memory (separate copies of the module, placed differently in memory, made two
identical bare fits differ by up to 1.5%, steadily). In every round each variant runs one
fit of ``--steps`` optimizer steps, in a seeded shuffled order; a timing callback measures
every step from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, the
hooks, the optimizer step) after ``WARMUP`` steps. A round's ratio is the median step time
of the variant over the bare one's, and the ratio of their mean step times, which counts
the periodic full steps and flushes the median leaves out; the median of each over rounds
is reported, the first with its interquartile range.

Variants: ``bare`` (no callback), ``bare_again`` (the same, a second time: its ratio to
``bare`` is the noise floor of the comparison), ``gradguard`` (the callback with its
defaults: every step recorded, weights every 10, activations every 50, a flush every 50),
``lightning_clip`` (no callback, ``gradient_clip_val=1.0``) and ``guarded`` (the callback
with ``clip=1.0, guard=True``, logging the clip norm on the Trainer's logging steps), compared
with both.
glibc's malloc thresholds are fixed first (see ``steady_malloc.py``; ``--default-malloc``
keeps them adaptive).

    python benchmarks/overhead_lightning.py [--model mlp20x512|mlp4x1024] [--rounds 15] [--batch N]
        [--json] [--quick] [--default-malloc]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import gradguard  # noqa: F401
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import lightning.pytorch as L
import steady_malloc

from gradguard.integrations.lightning import GradguardCallback

WARMUP = 3
SEED = 0
# name -> (width, depth, batch)
MODELS = {"mlp20x512": (512, 20, 256), "mlp4x1024": (1024, 4, 64)}
DEFAULT_MODEL = "mlp20x512"
CLASSES = 10
VARIANTS = ("bare", "bare_again", "gradguard", "lightning_clip", "guarded")
# (variant, reference, result key): the ratio of each round's step times to the reference's in that round.
COMPARISONS = (
    ("bare_again", "bare", "noise_ratio"),
    ("gradguard", "bare", "ratio"),
    ("lightning_clip", "bare", "lightning_clip_ratio"),
    ("guarded", "bare", "guarded_ratio"),
    ("guarded", "lightning_clip", "guarded_vs_lightning_clip"),
)


class MLP(L.LightningModule):
    """A plain ReLU MLP classifier trained with SGD: depth x (Linear(width, width) + ReLU), then a head."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, CLASSES))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class StepTimer(L.Callback):
    """Times every training step after the warm-up ones."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._t0
        self._seen += 1
        if self._seen > WARMUP:
            self.times.append(elapsed)


def _callbacks(variant: str) -> list[Any]:
    if variant in ("bare", "bare_again", "lightning_clip"):
        return []
    if variant == "gradguard":
        return [GradguardCallback()]
    return [GradguardCallback(clip=1.0, guard=True)]


def trainer_for(variant: str, steps: int, timer: StepTimer) -> L.Trainer:
    """The Trainer a variant fits with: only its callbacks and clipping differ."""
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + WARMUP, callbacks=[timer, *_callbacks(variant)],
        gradient_clip_val=1.0 if variant == "lightning_clip" else None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _fit(module: MLP, loader: DataLoader, variant: str, steps: int) -> list[float]:
    timer = StepTimer()
    trainer_for(variant, steps, timer).fit(module, loader)
    return timer.times


def measure(rounds: int, quick: bool, batch: int | None = None, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """Interleaved rounds of the variants; returns step times (s), ratios and their spread."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    width, depth, default_batch = MODELS[model]
    batch = batch or default_batch
    steps = 5 if quick else 60
    rounds = min(rounds, 2) if quick else rounds
    torch.set_num_threads(1)  # two shared cores: one thread is faster and steadier
    torch.manual_seed(SEED)
    module = MLP(width, depth)
    initial = copy.deepcopy(module.state_dict())
    g = torch.Generator().manual_seed(SEED)
    n = batch * (steps + WARMUP)
    data = TensorDataset(torch.randn(n, width, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    order = random.Random(SEED)
    medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    means: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        for _ in range(rounds):
            variants = list(VARIANTS)
            order.shuffle(variants)
            for v in variants:
                module.load_state_dict(initial)  # copies into the same tensors: same memory, same start
                times = _fit(module, loader, v, steps)
                medians[v].append(float(np.median(times)))
                means[v].append(float(np.mean(times)))
    out: dict[str, Any] = {
        "model": model,
        "parameters": sum(p.numel() for p in module.parameters()),
        "batch": batch,
        "rounds": rounds,
        "steps_per_round": steps,
        "threads": torch.get_num_threads(),
        "bare_step_s": float(np.median(medians["bare"])),
    }
    for v, ref, key in COMPARISONS:
        ratios = np.array(medians[v]) / np.array(medians[ref])
        out[f"{v}_step_s"] = float(np.median(medians[v]))
        out[key] = float(np.median(ratios))
        out[f"{key}_iqr"] = [float(q) for q in np.percentile(ratios, [25, 75])]
        out[f"{key}_of_means"] = float(np.median(np.array(means[v]) / np.array(means[ref])))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a summary")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds of 5 steps")
    ap.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                    help=f"the workload (default {DEFAULT_MODEL}; mlp4x1024 is the stress case)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default: " + ", ".join(f"{m} {b}" for m, (_, _, b) in MODELS.items()) + ")")
    steady_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be positive")
    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be positive")
    malloc = steady_malloc.apply(args)
    result = measure(args.rounds, args.quick, args.batch, args.model)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
                         "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "malloc": malloc}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    print(f"{result['model']} ({result['parameters']:,} parameters), batch {result['batch']}, "
          f"{result['rounds']} rounds x {result['steps_per_round']} steps, {result['threads']} thread(s), "
          f"{malloc} malloc")
    print(f"  bare            {result['bare_step_s'] * 1e3:8.2f} ms/step")
    for v, ref, key in COMPARISONS:
        lo, hi = result[f"{key}_iqr"]
        print(f"  {v:15s} {result[f'{v}_step_s'] * 1e3:8.2f} ms/step  vs {ref:14s} {result[key]:.3f} "
              f"(IQR {lo:.3f}-{hi:.3f}; of mean step times {result[f'{key}_of_means']:.3f})")


if __name__ == "__main__":
    main()
