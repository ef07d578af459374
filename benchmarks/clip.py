"""Clipper and guard cost, as ratios against PyTorch's clip and the bare step, in one run.

Clippers are timed on the same gradients (kept finite and unclipped in effect: every
clipper is given thresholds it will not reach, so each call does its full work and the
gradients stay the same). Calls are interleaved over rounds; each ratio is the median
over rounds of (variant time / torch.nn.utils.clip_grad_norm_ time in that round). The
guard is timed as a whole training step against the bare step (``optimizer.step()``).

    python benchmarks/clip.py [--models mlp20x512,transformer] [--rounds 15] [--calls 20]
        [--threads N] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import make_task  # noqa: E402  (the models of the overhead benchmark)

try:
    import gradguard  # noqa: F401
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from gradguard.remedy.clip import AutoClip, ZScoreClip, adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_  # noqa: E402
from gradguard.remedy.guard import NonFiniteGuard  # noqa: E402


def agc_loop(parameters: list[nn.Parameter], clipping: float = 0.01, eps: float = 1e-3) -> None:
    """AGC as a per-tensor loop (as timm implements it): the reference the fused version must beat."""
    for p in parameters:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
        p_norm = p.detach().norm(dim=dims, keepdim=True).clamp_(min=eps)
        g_norm = p.grad.detach().norm(dim=dims, keepdim=True)
        max_norm = p_norm * clipping
        clipped = p.grad * (max_norm / g_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(g_norm < max_norm, p.grad, clipped))


def _median_ratio(times: dict[str, list[float]], base: str) -> dict[str, tuple[float, float]]:
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        out[name] = (statistics.median(ratios), statistics.median(ts))
    return out


def bench_clippers(model_name: str, rounds: int, calls: int) -> list[dict[str, Any]]:
    """Time every clipper on the same gradients, interleaved, as ratios to PyTorch's norm clip."""
    task = make_task(model_name)
    model = task.model
    task.loss_fn(model(task.inputs), task.target).backward()
    params = list(model.parameters())
    huge = 1e30  # never reached: the grads stay the same, every call does its full work
    auto, zscore = AutoClip(percentile=100), ZScoreClip(z_threshold=1e6, warmup=1)
    variants: dict[str, Callable[[], object]] = {
        "torch.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, huge),
        "clip_grad_norm_": lambda: clip_grad_norm_(params, huge),
        "torch.clip_grad_value_": lambda: torch.nn.utils.clip_grad_value_(params, huge),
        "clip_grad_value_": lambda: clip_grad_value_(params, huge),
        "agc_loop": lambda: agc_loop(params, clipping=huge),
        "adaptive_clip_grad_": lambda: adaptive_clip_grad_(params, clipping=huge),
        "AutoClip": lambda: auto(params),
        "ZScoreClip": lambda: zscore(params),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()
    for _ in range(rounds):
        for name, f in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                f()
            times[name].append((time.perf_counter() - start) / calls)
    ratios = _median_ratio(times, "torch.clip_grad_norm_")
    return [
        {"model": model_name, "variant": k, "us_per_call": v[1] * 1e6, "ratio_to_torch_clip": v[0]}
        for k, v in ratios.items()
    ]


def bench_guard(model_name: str, rounds: int, steps: int) -> list[dict[str, Any]]:
    """A whole training step with guard.step(loss) against the same step with optimizer.step()."""
    rows = []
    for opt_name, make_opt in (
        ("SGD", lambda ps: torch.optim.SGD(ps, lr=1e-4)),
        ("Adam(fused)", lambda ps: torch.optim.Adam(ps, lr=1e-5, fused=True)),
    ):
        task = make_task(model_name)
        bare_model, guarded_model = task.model, copy.deepcopy(task.model)
        bare_opt, guarded_opt = make_opt(bare_model.parameters()), make_opt(guarded_model.parameters())
        guard = NonFiniteGuard(guarded_opt, model=guarded_model)

        def step(model: nn.Module, opt: torch.optim.Optimizer, guarded: bool, task=task, guard=guard) -> None:
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(task.inputs), task.target)
            loss.backward()
            if guarded:
                guard.step(loss)
            else:
                opt.step()

        times: dict[str, list[float]] = {"bare": [], "guard": []}
        for _ in range(2):
            step(bare_model, bare_opt, False)
            step(guarded_model, guarded_opt, True)
        for r in range(rounds):
            order = [("bare", bare_model, bare_opt, False), ("guard", guarded_model, guarded_opt, True)]
            for name, model, opt, guarded in order if r % 2 else order[::-1]:
                start = time.perf_counter()
                for _ in range(steps):
                    step(model, opt, guarded)
                times[name].append((time.perf_counter() - start) / steps)
        ratios = _median_ratio(times, "bare")
        rows.append({"model": model_name, "variant": f"guard[{opt_name}]", "ms_per_step": ratios["guard"][1] * 1e3,
                     "ratio_to_bare": ratios["guard"][0], "skipped": guard.skipped})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp20x512,transformer")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20, help="clipper calls per timed block")
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed block (guard)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.steps = 2, 2, 2
    if min(args.rounds, args.calls, args.steps) < 1:
        ap.error("--rounds, --calls and --steps must be positive")
    torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clip_rows: list[dict[str, Any]] = []
    guard_rows: list[dict[str, Any]] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        clip_rows += bench_clippers(name, args.rounds, args.calls)
        guard_rows += bench_guard(name, args.rounds, args.steps)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "rounds": args.rounds}
    if args.json:
        json.dump({"machine": info, "clippers": clip_rows, "guard": guard_rows}, sys.stdout, indent=2)
        print()
        return
    print(f"torch {info['torch']}, {info['threads']} threads; {args.rounds} rounds")
    print(f"{'model':12s} {'variant':24s} {'us/call':>10s} {'x torch clip':>13s}")
    for r in clip_rows:
        print(f"{r['model']:12s} {r['variant']:24s} {r['us_per_call']:10.1f} {r['ratio_to_torch_clip']:13.3f}")
    print(f"\n{'model':12s} {'variant':24s} {'ms/step':>10s} {'x bare step':>13s}")
    for r in guard_rows:
        print(f"{r['model']:12s} {r['variant']:24s} {r['ms_per_step']:10.2f} {r['ratio_to_bare']:13.3f}")


if __name__ == "__main__":
    main()
