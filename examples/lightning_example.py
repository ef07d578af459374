"""PyTorch Lightning with gradguard: one callback watches, clips, guards and records.

    python examples/lightning_example.py [--store runs/lightning.db] [--max-steps 200]

Trains a deep sigmoid MLP (where the gradient vanishes) on scikit-learn's digits (bundled,
no download) with ``GradguardCallback``: per-layer statistics of every optimizer step go to
a crash-safe SQLite store, ``clip=1.0`` clips as ``torch.nn.utils.clip_grad_norm_`` would and
logs the pre-clip norm, and ``guard=True`` skips the step whose batch holds a NaN (one is
injected). Prints where the store is, the guard's events and the findings.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard.integrations.lightning import GradguardCallback


def data() -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return TensorDataset((x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y))


class DeepSigmoid(L.LightningModule):
    """Eight sigmoid layers: the textbook vanishing gradient. ``nan_step`` poisons one batch."""

    def __init__(self, nan_step: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(8):
            layers += [nn.Linear(64, 64), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(64, 10))
        self.nan_step = nan_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.nan_step:
            x = x.clone()
            x[0, 0] = math.nan  # one corrupt sample: the guard skips this step
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/lightning.db", help="SQLite store to record to (replaced if it exists)")
    ap.add_argument("--max-steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    cb = GradguardCallback(store=store, overwrite=True, clip=1.0, guard=True, flush_every=25)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
    )
    module = DeepSigmoid(nan_step=args.max_steps // 2)
    loader = DataLoader(data(), batch_size=128, shuffle=True)
    with warnings.catch_warnings():
        # The findings arrive as warnings too; here they are printed below instead.
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)

    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    print(f"recorded {len(cb.trace)} optimizer steps to {store} (gradguard report {store} makes a page of it)")
    print(f"guard skipped {cb.guard.skipped if cb.guard else 0} step(s); parameters finite: {finite}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gradguard/")}
    print(f"callback metrics: {metrics}")
    for f in cb.findings:
        print(f"  {f}")
    return 0 if finite and len(cb.trace) == trainer.global_step else 1


if __name__ == "__main__":
    raise SystemExit(main())
