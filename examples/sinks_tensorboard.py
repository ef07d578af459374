"""Send gradguard's per-layer statistics and findings to TensorBoard.

    python examples/sinks_tensorboard.py [--logdir runs/tb] [--steps 200]
    tensorboard --logdir runs/tb

Trains a 12-layer sigmoid MLP on a synthetic regression task, the setting where the
gradient vanishes towards the input, with a ``TensorBoard`` sink on ``watch``: per-layer
scalars (``gradguard/grad_norm/<layer>``...), the loss, the total gradient norm, the
findings as text, and on every 10th step a histogram across layers of log10 of each
layer's gradient norm. Without ``--logdir`` it writes to a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

import gradguard
from gradguard.sinks import TensorBoard


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logdir", default=None, help="TensorBoard log directory (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be positive")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logdir = args.logdir or tempfile.mkdtemp(prefix="gradguard-tb-")
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(512, 32)
    y = x[:, :4].sum(1, keepdim=True)
    with gradguard.watch(model, optimizer=opt, sinks=[TensorBoard(logdir)]) as w:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            w.log_loss(loss)
            opt.step()  # recorded here, through the optimizer's step hooks
    for f in w.findings:
        print(f)
    print(f"wrote {len(w.trace)} steps x {len(w.layers)} layers; view them with: tensorboard --logdir {logdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
