"""A long run under watch (recording to a store) and the non-finite guard, with faults injected on a schedule.

Every ``--fault-every`` steps one fault, in rotation: a NaN in the inputs (forward), an
inf in one gradient element (backward), a NaN loss. Printed: steps, faults injected,
faults caught (steps the guard skipped), parameters that became non-finite (must be 0),
store rows lost (steps the retention policy promises to keep that are missing; must be
0), the store's size against its documented bound, resident memory at the start, the warm
point, the middle, 75% and the end and its peak, the "memory flat" verdict, and the step
time against the bare loop (same model, no gradguard, no faults) measured in the same run.
Exits 1 on any failed check.

Memory, and what the verdict measures. The warm point is the 25% point, or later if the
in-memory history (``--history`` rows) and the store (``--store-keep`` rows) are not both
full and thinning by then: from there on every bounded structure is at its bound, so any
further growth of live memory is a leak. At each point two figures are read: the raw RSS,
and the live RSS, the RSS once glibc's ``malloc_trim(0)`` has handed the heap's free pages
back to the system (the raw figure less what the allocator holds free for reuse). The
verdict is the live RSS growth from the warm point to the end, under 5 MiB. Why not the raw
figure: measured on a 100,000-step run, the bytes in use in the heap (``mallinfo2``) stay at
114 +- 1 MiB and the memory outside it (Python's object arenas, mapped files) within 0.3 MiB
from 25% to the end, while the heap's free bytes wander between 4 and 13 MiB as the
history's and the store's thinnings free and reallocate arrays of a few MiB (glibc then
keeps up to twice the largest freed block before it gives memory back). So the raw RSS
moves by +-5 MiB from one point to the next without any live byte more; the live RSS moves
by under 1 MiB. The warm-up, start to warm point, and the raw figures are printed too.
Without glibc (no ``malloc_trim``) the live figure is the raw one.

    python benchmarks/soak.py [--steps 20000] [--fault-every 97] [--history 10000]
                              [--store-keep 20000] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sqlite3
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

try:
    import gradguard
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import gradguard
from gradguard.trace_history import CONTEXT

FAULTS = ("nan_input", "inf_grad", "nan_loss")
TOLERANCE_MIB = 5.0  # "memory flat": live RSS growth from the warm point to the end under this
FLUSH_EVERY = 100


def rss_mib() -> float:
    """Current resident set size, MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> Any:
    """glibc, when it has malloc_trim and mallinfo2 (2.33+); else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def memory() -> dict[str, float]:
    """RSS (MiB) as it is, the heap's free bytes (MiB), and RSS once those free pages are handed back."""
    raw = rss_mib()
    if _LIBC is None:
        return {"raw": raw, "heap_free": 0.0, "live": raw}
    heap_free = _LIBC.mallinfo2().fordblks / 2**20
    _LIBC.malloc_trim(0)
    return {"raw": raw, "heap_free": heap_free, "live": rss_mib()}


def warm_step(steps: int, history: int, store_keep: int) -> tuple[int, bool]:
    """The step from which the memory verdict counts, and whether both histories are thinning by then.

    The 25% point, or the first flush after both the in-memory history and the store have
    thinned once (each thins when it passes its limit); if that is past the 75% point, the
    run is too short for a warm point and the verdict counts from 25% with the warm-up in.
    """
    thinned = (max(history, store_keep) // FLUSH_EVERY + 2) * FLUSH_EVERY
    warm = max(steps // 4, thinned)
    if warm > (3 * steps) // 4:
        return steps // 4, False
    return warm, True


WIDTH, DEPTH, BATCH, POOL = 32, 6, 32, 256  # small: a step well under a millisecond, so 100k steps take minutes


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 1))


_g = torch.Generator().manual_seed(0)
_X = torch.randn(POOL, BATCH, 16, generator=_g)
_Y = _X[:, :, :4].sum(2, keepdim=True)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from a fixed pool made once (making one per step would cost more than the step)."""
    return _X[step % POOL].clone(), _Y[step % POOL]


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


def soak(steps: int, fault_every: int, store: str, history: int, store_keep: int) -> dict[str, Any]:
    """The guarded, recorded run with faults; returns the figures."""
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gradguard.NonFiniteGuard(opt, model=model, policy="skip")
    injected = {k: 0 for k in FAULTS}
    fault_steps: list[int] = []
    warm, warmed = warm_step(steps, history, store_keep)
    mem = {"start": memory()}
    marks: dict[int, list[str]] = {}
    for at, name in ((warm, "warm"), (steps // 2, "middle"), ((3 * steps) // 4, "three_quarters")):
        marks.setdefault(at, []).append(name)
    start = time.perf_counter()
    with gradguard.watch(
        model, store=store, overwrite=True, flush_every=FLUSH_EVERY, history=history, store_keep=store_keep
    ) as w:
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
            if step in marks:
                reading = memory()
                mem.update({name: reading for name in marks[step]})
    seconds = (time.perf_counter() - start) / steps
    mem["end"] = memory()
    nonfinite = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    with sqlite3.connect(store) as db:
        stored = np.array([r[0] for r in db.execute("SELECT step FROM steps ORDER BY step")], dtype=np.int64)
    skipped_steps = sorted({e.step for e in guard.events if e.kind == "step_skipped"})
    layers = len(w.layers)
    return {
        "steps": steps,
        "layers": layers,
        "faults_injected": sum(injected.values()),
        "faults_by_kind": injected,
        "faults_caught": len(set(fault_steps) & set(skipped_steps)),
        "steps_skipped": guard.skipped,
        "parameters_nonfinite": nonfinite,
        "history": history,
        "trace_rows": len(w.trace),
        "store_keep": store_keep,
        "store_rows": len(stored),
        "store_rows_lost": rows_lost(stored, steps, fault_steps, store_keep),
        "store_bytes": os.path.getsize(store),
        # The bound documented in gradguard.record.store.
        "store_bound_bytes": int(store_keep * (80 * layers + 40) * 1.5 + 2**20),
        "warm_step": warm,
        "warm_after_thinning": warmed,
        "rss_mib": {k: v["raw"] for k, v in mem.items()},
        "live_rss_mib": {k: v["live"] for k, v in mem.items()},
        "heap_free_mib": {k: v["heap_free"] for k, v in mem.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "warmup_mib": mem["warm"]["live"] - mem["start"]["live"],
        "memory_growth_mib": mem["end"]["live"] - mem["warm"]["live"],
        "raw_growth_mib": mem["end"]["raw"] - mem["warm"]["raw"],
        "memory_tolerance_mib": TOLERANCE_MIB,
        "seconds_per_step": seconds,
    }


def rows_lost(stored: np.ndarray, steps: int, fault_steps: list[int], keep: int) -> int:
    """Steps the retention policy promises to keep that are missing from the store.

    The promises (gradguard.trace_history): every step while the run fits in ``keep`` rows;
    else the last ``keep // 4`` steps, and the earliest anomalies (here: the injected faults,
    97 steps apart) with CONTEXT steps either side, as many as fit in ``keep // 4`` rows.
    """
    if steps <= keep:
        return steps - len(stored)
    promised = set(range(steps - keep // 4, steps))
    width = 2 * CONTEXT + 1
    for s in fault_steps[: (keep // 4) // width]:
        promised.update(range(max(0, s - CONTEXT), min(steps, s + CONTEXT + 1)))
    return len(promised - set(stored.tolist()))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--fault-every", type=int, default=97)
    ap.add_argument("--history", type=int, default=10_000, help="watch(history=...): rows kept in memory")
    ap.add_argument("--store-keep", type=int, default=20_000, help="watch(store_keep=...): rows kept in the store")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--quick", action="store_true", help="1,000 steps: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 1000
    torch.set_num_threads(args.threads)
    base = bare(min(args.steps, 2000))
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.steps, args.fault_every, os.path.join(tmp, "soak.db"), args.history, args.store_keep)
    result["bare_seconds_per_step"] = base
    result["ratio_to_bare"] = result["seconds_per_step"] / base
    result["torch"] = torch.__version__
    result["memory_flat"] = result["memory_growth_mib"] < TOLERANCE_MIB
    result["store_within_bound"] = result["store_bytes"] <= result["store_bound_bytes"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"{r['steps']} steps, a fault every {args.fault_every}: {r['faults_injected']} injected "
              f"({', '.join(f'{k} {v}' for k, v in r['faults_by_kind'].items())}), {r['faults_caught']} caught, "
              f"{r['steps_skipped']} steps skipped")
        print(f"parameters non-finite: {r['parameters_nonfinite']}; store rows lost: {r['store_rows_lost']} "
              f"({r['store_rows']} rows kept of at most {r['store_keep']}; trace {r['trace_rows']} rows of at most "
              f"{r['history']})")
        print(f"store {r['store_bytes'] / 2**20:.1f} MiB, bound {r['store_bound_bytes'] / 2**20:.1f} MiB: "
              f"{'within' if r['store_within_bound'] else 'OVER'}")
        points = ("start", "warm", "middle", "three_quarters", "end")
        names = {"start": "start", "warm": f"warm (step {r['warm_step']})", "middle": "middle",
                 "three_quarters": "75%", "end": "end"}
        for label, key in (("RSS MiB, raw ", "rss_mib"), ("heap free MiB", "heap_free_mib"),
                           ("RSS MiB, live", "live_rss_mib")):
            print(f"{label}: " + ", ".join(f"{names[p]} {r[key][p]:.1f}" for p in points))
        print(f"peak RSS {r['peak_rss_mib']:.1f} MiB; warm-up (start to warm point, live) {r['warmup_mib']:+.2f} MiB; "
              f"raw RSS warm point to end {r['raw_growth_mib']:+.2f} MiB (heap free bytes included; see the docstring)")
        if not r["warm_after_thinning"]:
            print("(a run this short does not fill --history and --store-keep before 75%: the verdict counts from 25%)")
        print(f"memory {'flat' if r['memory_flat'] else 'NOT FLAT'}: live RSS {r['memory_growth_mib']:+.2f} MiB "
              f"from the warm point to the end (tolerance {TOLERANCE_MIB:.0f} MiB)")
        print(f"step time x{r['ratio_to_bare']:.2f} of the bare loop ({r['seconds_per_step'] * 1e3:.2f} ms vs "
              f"{base * 1e3:.2f} ms)")
    ok = result["parameters_nonfinite"] == 0 and result["store_rows_lost"] == 0
    ok = ok and result["faults_caught"] == result["faults_injected"]
    ok = ok and result["memory_flat"] and result["store_within_bound"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
