"""A plain PyTorch training loop with gradguard: watch, clip, guard, record, report.

    python examples/plain_loop.py [--store runs/plain.db] [--steps 300]

Trains a deep sigmoid MLP on scikit-learn's digits (bundled, no download), the setting
where the gradient vanishes, with the three pieces most loops want: ``watch`` records
per-layer statistics to a crash-safe store, ``clip_grad_norm_`` bounds the step, and
``NonFiniteGuard`` skips a step whose loss or gradients are not finite (one NaN batch is
injected to show it). Prints the findings and writes an HTML report beside the store.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import gradguard
from gradguard.report.run import write_run_report


def data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/plain.db", help="SQLite store to record to (replaced if it exists)")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x, y = data()
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = gradguard.NonFiniteGuard(opt, model=model)
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    with gradguard.watch(model, optimizer=opt, store=store, overwrite=True, flush_every=25) as w:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (128,))
            xb = x[idx].clone()
            if step == args.steps // 2:
                xb[0, 0] = math.nan  # one corrupt sample: the guard skips this step
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            w.step(loss=loss)  # before clipping: the statistics are of the raw gradient
            gradguard.clip_grad_norm_(model.parameters(), max_norm=1.0)
            guard.step(loss)
    report = write_run_report(store, store.with_suffix(".html"))
    params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"recorded {len(w.trace)} steps to {store}; report: {report}")
    print(f"guard skipped {guard.skipped} step(s); parameters finite: {params_finite}")
    for f in w.findings:
        print(f"  [{f.severity}] {f.kind} at {f.layer}: {f.message}")
    return 0 if params_finite and len(w.trace) == args.steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
