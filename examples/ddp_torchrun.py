"""DDP training watched by gradguard, launched by torchrun (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --store run.db
    gradguard report run.db                      # afterwards: the post-mortem page

Every rank builds the watch; each holds the same Trace (gradients are averaged by DDP,
activation statistics are pooled over the ranks' batches), and only rank 0 writes the
store and prints. The model is a deep sigmoid network, so there is something to find.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import gradguard


def make_model(depth: int = 8, width: int = 64) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(32 if i == 0 else width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="SQLite file to record to (written by rank 0)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)  # the same data stream on every rank; each takes its slice
    teacher = torch.randn(32, 4, generator=gen)
    local = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    try:
        with gradguard.watch(model, optimizer=opt, store=args.store, overwrite=True, flush_every=50) as w:
            for _ in range(args.steps):
                x = torch.randn(args.batch, 32, generator=gen)
                y = (x @ teacher).argmax(dim=1)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[local]), y[local])
                loss.backward()
                w.log_loss(loss)
                opt.step()  # the watch records here, through the optimizer's hooks
        if rank == 0:
            print(f"{world} ranks, {len(w.trace)} steps recorded to {args.store}")
            for finding in w.findings:
                print(finding)
            if not w.findings:
                print("no findings")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
