"""How long `gradguard diagnose` takes on a deep MLP, against the bare training loop measured in the same run.

The model is the issue's yardstick: a 100-layer, width-256 ReLU MLP with PyTorch's default
init (6.6M parameters) on a digits batch of 128. Timed, in rounds that alternate:

- ``bare``: the short run alone, ``--steps`` SGD steps (forward, backward, step) on a copy;
- ``diagnose``: ``gradguard.diagnose`` in-process (profile, audit, Hessian, short run, findings);
- ``cli``: the ``gradguard diagnose FILE:callable`` command end to end in a fresh process
  (interpreter and imports included), which is what a user waits for.

The ratio is diagnose (or cli) over bare, median over rounds.

    python benchmarks/diagnose.py [--depth 100] [--width 256] [--steps 50] [--rounds 3]
        [--threads N] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
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

from gradguard.demo import load_digits_tensors  # noqa: E402
from gradguard.numerics import flush_denormals  # noqa: E402

TARGET = textwrap.dedent(
    """
    import torch
    from torch import nn


    def deep():
        torch.manual_seed(0)
        layers = [nn.Linear(64, {width}), nn.ReLU()]
        for _ in range({depth} - 2):
            layers += [nn.Linear({width}, {width}), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear({width}, 10))
    """
)


def build(depth: int, width: int) -> nn.Sequential:
    """The same model the CLI target builds."""
    namespace: dict[str, Any] = {}
    exec(TARGET.format(depth=depth, width=width), namespace)  # noqa: S102  (our own text)
    return namespace["deep"]()


def bare(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """The short run without gradguard: SGD, momentum 0.9, lr 0.01, on a copy."""
    work = copy.deepcopy(model)
    opt = torch.optim.SGD(work.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(work(batch[0]), batch[1]).backward()
        opt.step()
    return time.perf_counter() - start


def in_process(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> tuple[float, Any]:
    start = time.perf_counter()
    d = gradguard.diagnose(model, batch, F.cross_entropy, steps=steps)
    return time.perf_counter() - start, d


def cli(target: str, steps: int, threads: int | None) -> float:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "gradguard.cli", "diagnose", target, "--steps", str(steps), "--json"],
                         capture_output=True, text=True, env=env)
    took = time.perf_counter() - start
    if out.returncode not in (0, 1):
        raise RuntimeError(f"gradguard diagnose failed ({out.returncode}): {out.stderr.strip()}")
    return took


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--quick", action="store_true", help="a small model, one round: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.steps, args.rounds = 10, 32, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, _, _ = load_digits_tensors(seed=0)
    batch = (x[:128], y[:128])
    model = build(args.depth, args.width)
    times: dict[str, list[float]] = {"bare": [], "diagnose": [], "cli": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deep_model.py")
        with open(path, "w") as f:
            f.write(TARGET.format(depth=args.depth, width=args.width))
        with flush_denormals():  # as the command does
            in_process(model, batch, args.steps)  # warm-up: first-call costs (lazy imports) are the cli's to show
            for _ in range(args.rounds):
                times["bare"].append(bare(model, batch, args.steps))
                took, d = in_process(model, batch, args.steps)
                times["diagnose"].append(took)
                times["cli"].append(cli(f"{path}:deep", args.steps, args.threads))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [{"variant": k, "seconds": med[k], "ratio_to_bare": med[k] / med["bare"], "runs": times[k]}
              for k in times]
    result = {
        "benchmark": "diagnose",
        "model": f"MLP {args.depth}x{args.width} ReLU, default init, {sum(p.numel() for p in model.parameters()):,}"
                 " parameters",
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "findings": [f"{f.severity} {f.kind} {f.layer}" for f in d.findings],
        "results": ratios,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}; {args.steps} steps; {result['threads']} threads; median of {args.rounds} rounds")
    for r in ratios:
        print(f"  {r['variant']:<9} {r['seconds']:7.2f} s   x{r['ratio_to_bare']:.2f} of the bare loop")
    print("findings: " + "; ".join(result["findings"]))


if __name__ == "__main__":
    main()
