"""A long run under watch (recording to a store) and the non-finite guard, with faults injected on a schedule.

Every ``--fault-every`` steps one fault, in rotation: a NaN in the inputs (forward), an
inf in one gradient element (backward), a NaN loss. Printed: steps, faults injected,
faults caught (steps the guard skipped), parameters that became non-finite (must be 0),
store rows lost (steps recorded minus rows in the store; must be 0), resident memory at
the start, middle and end and its peak, the store's size, and the step time against the
bare loop (same model, no gradguard, no faults) measured in the same run.

    python benchmarks/soak.py [--steps 20000] [--fault-every 97] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

try:
    import gradguard
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import gradguard

FAULTS = ("nan_input", "inf_grad", "nan_loss")


def rss_mib() -> float:
    """Current resident set size, MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(32, 128), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=g)
    return x, x[:, :4].sum(1, keepdim=True)


def bare(steps: int) -> float:
    """Seconds per step of the same loop without gradguard and without faults."""
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def soak(steps: int, fault_every: int, store: str) -> dict[str, Any]:
    """The guarded, recorded run with faults; returns the figures."""
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.NonFiniteGuard(opt, model=model, policy="skip")
    injected = {k: 0 for k in FAULTS}
    fault_steps: list[int] = []
    rss = {"start": rss_mib()}
    start = time.perf_counter()
    with gradguard.watch(model, store=store, overwrite=True, flush_every=100) as w:
        for step in range(steps):
            fault = FAULTS[(step // fault_every) % len(FAULTS)] if step % fault_every == fault_every - 1 else None
            x, y = batch(step)
            if fault == "nan_input":
                x[0, 0] = float("nan")
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            if fault == "nan_loss":
                loss = loss * float("nan")
            loss.backward()
            if fault == "inf_grad":
                model[2].weight.grad[0, 0] = float("inf")
            if fault is not None:
                injected[fault] += 1
                fault_steps.append(step)
            w.step(loss=loss)
            guard.step(loss)
            if step == steps // 2:
                rss["middle"] = rss_mib()
    seconds = (time.perf_counter() - start) / steps
    rss["end"] = rss_mib()
    nonfinite = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    skipped_steps = sorted({e.step for e in guard.events if e.kind == "step_skipped"})
    return {
        "steps": steps,
        "faults_injected": sum(injected.values()),
        "faults_by_kind": injected,
        "faults_caught": len(set(fault_steps) & set(skipped_steps)),
        "steps_skipped": guard.skipped,
        "parameters_nonfinite": nonfinite,
        "store_rows": rows,
        "store_rows_lost": len(w.trace) - rows,
        "store_bytes": os.path.getsize(store),
        "rss_mib": rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--fault-every", type=int, default=97)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--quick", action="store_true", help="1,000 steps: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 1000
    torch.set_num_threads(args.threads)
    base = bare(min(args.steps, 2000))
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.steps, args.fault_every, os.path.join(tmp, "soak.db"))
    result["bare_seconds_per_step"] = base
    result["ratio_to_bare"] = result["seconds_per_step"] / base
    result["torch"] = torch.__version__
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"{r['steps']} steps, a fault every {args.fault_every}: {r['faults_injected']} injected "
              f"({', '.join(f'{k} {v}' for k, v in r['faults_by_kind'].items())}), {r['faults_caught']} caught, "
              f"{r['steps_skipped']} steps skipped")
        print(f"parameters non-finite: {r['parameters_nonfinite']}; store rows lost: {r['store_rows_lost']} "
              f"({r['store_rows']} rows, {r['store_bytes'] / 2**20:.1f} MiB)")
        m = r["rss_mib"]
        print(f"RSS MiB: start {m['start']:.0f}, middle {m.get('middle', 0):.0f}, end {m['end']:.0f}; "
              f"peak {r['peak_rss_mib']:.0f}")
        print(f"step time x{r['ratio_to_bare']:.2f} of the bare loop ({r['seconds_per_step'] * 1e3:.2f} ms vs "
              f"{base * 1e3:.2f} ms)")
    ok = result["parameters_nonfinite"] == 0 and result["store_rows_lost"] == 0
    ok = ok and result["faults_caught"] == result["faults_injected"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
