"""Runs a test's worker on real gloo processes (spawned), and ends them without tripping a PyTorch teardown abort."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on localhost now (for the rendezvous store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Runs ``worker(rank, *args)`` in ``world`` spawned processes joined in one gloo group; re-raises a failure."""
    mp.start_processes(_main, args=(worker, free_port(), world, args), nprocs=world, join=True, start_method="spawn")


def _main(rank: int, worker: Callable[..., None], port: int, world: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two shared cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, *args)
        dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves before everyone is done with it
    finally:
        dist.destroy_process_group()
    leave()


def leave() -> None:
    """Ends a rank that finished: flushes its output and exits 0 without interpreter shutdown.

    With torch 2.13 a process that ran DDP on gloo aborts at exit in 10-30% of runs ("terminate called
    without an active exception", SIGABRT; 2 ranks, 80 runs each, no gradguard code involved). DDP keeps
    the process group alive past destroy_process_group() (its gloo threads are still running then, and
    after gc.collect()), so the group dies during interpreter shutdown: its worker threads release their
    last collective, whose saved thread-local state holds a Python object; asking for the GIL while the
    interpreter finalises ends such a thread inside a C++ destructor. ``os._exit`` skips the shutdown
    (0 aborts in 80 runs); every result is written and closed before this is called.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
