"""Step-time overhead of ``GradguardCallback`` in a Hugging Face ``Trainer``, against the bare Trainer.

Each block is one ``trainer.train()`` of ``--steps`` optimizer steps on a fresh copy of the
same model (a GPT-2 built from a config, about 3.5M parameters) with the same generated
data; variants take turns in a seeded, shuffled order over ``--rounds`` rounds. A step's
time is the interval between two ``on_step_begin`` calls, so it covers forward, backward,
clipping, the optimizer, the Trainer's logging (every ``LOGGING_STEPS`` steps, where the
callback also flushes) and everything gradguard does; the first ``WARMUP_STEPS`` steps of a
block are left out. A block's mean step time is divided by the bare block of the same
round; the median ratio over rounds is reported with its interquartile range.

Variants: ``bare`` (the Trainer alone), ``gradguard`` (``GradguardCallback(store=...)`` with
its defaults: every step recorded, weights every 10, activations every 50) and
``guarded`` (the same with ``guard=True`` and gradguard's clipping in place of the Trainer's).

    python benchmarks/overhead_transformers.py [--rounds 5] [--steps 30] [--json] [--quick]

``measure(rounds, quick)`` returns the figures as a dict (used by ``benchmarks/overhead.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

try:
    import gradguard
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import gradguard

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from gradguard.integrations.transformers import GradguardCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules
import steady_malloc  # noqa: E402

WARMUP_STEPS = 3
LOGGING_STEPS = 10
SEED = 0
VARIANTS = ("bare", "gradguard", "guarded")


class StepTimer(TrainerCallback):
    """Wall-clock and CPU time at the start of every optimizer step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []  # (wall clock, this process's CPU time)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


def config(quick: bool) -> GPT2Config:
    """The model: 4 layers of width 256 over a 1,000-token vocabulary (quick: 2 layers of 64)."""
    if quick:
        return GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=200, n_positions=32, bos_token_id=0,
                          eos_token_id=0)
    return GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0,
                      eos_token_id=0)


def data(cfg: GPT2Config, n: int, length: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, cfg.vocab_size, (n, length), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def run_block(variant: str, cfg: GPT2Config, state: dict[str, torch.Tensor], rows: list[dict[str, torch.Tensor]],
              steps: int, batch: int, tmpdir: str, block: int) -> tuple[float, float]:
    """Train ``steps`` optimizer steps with one variant -> mean (wall, CPU) step time after warm-up, in s."""
    model = GPT2LMHeadModel(cfg)
    model.load_state_dict(state)
    args = TrainingArguments(
        output_dir=os.path.join(tmpdir, f"out{block}"), report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=LOGGING_STEPS, per_device_train_batch_size=batch, max_steps=steps,
        max_grad_norm=0.0 if variant == "guarded" else 1.0, seed=SEED, log_level="error",
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout (--json prints there)
    if variant != "bare":
        store = os.path.join(tmpdir, f"run{block}.db")
        options: dict[str, Any] = {"guard": True, "clip": 1.0} if variant == "guarded" else {}
        GradguardCallback(store=store, **options).attach(trainer)
    gc.collect()
    trainer.train()
    wall, cpu = np.diff(np.array(timer.marks), axis=0)[WARMUP_STEPS:].mean(axis=0)
    return float(wall), float(cpu)


def measure(rounds: int, quick: bool, steps: int | None = None, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Interleaved step times of the Trainer with and without gradguard -> figures (seconds, ratios)."""
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    steps = steps or (8 if quick else 30)
    if steps <= WARMUP_STEPS:
        raise ValueError(f"steps must be more than the {WARMUP_STEPS} warm-up steps, got {steps}")
    cfg = config(quick)
    length, batch = (16, 4) if quick else (64, 8)
    torch.manual_seed(SEED)
    state = GPT2LMHeadModel(cfg).state_dict()
    params = sum(t.numel() for k, t in state.items() if k != "lm_head.weight")  # lm_head is tied to wte
    rows = data(cfg, steps * batch, length)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    order = list(variants)
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory() as tmpdir:
        block = 0
        for _ in range(rounds):
            rng.shuffle(order)
            for v in order:
                times[v].append(run_block(v, cfg, state, rows, steps, batch, tmpdir, block))
                block += 1
    out: dict[str, Any] = {
        "model": f"GPT-2 {cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}",
        "parameters": int(params), "batch": batch, "sequence": length, "rounds": rounds,
        "steps_per_block": steps, "warmup_steps": WARMUP_STEPS, "logging_steps": LOGGING_STEPS,
        "threads": torch.get_num_threads(),
    }
    bare = np.array(times["bare"])  # [rounds, (wall, cpu)]
    for v in variants:
        t = np.array(times[v])
        out[f"{v}_step_s"] = float(np.median(t[:, 0]))
        out[f"{v}_cpu_step_s"] = float(np.median(t[:, 1]))
        if v == "bare":
            continue
        # Per round, against the bare block of the same round. CPU time (this process's) is
        # steadier than wall time on a shared machine: other processes do not add to it.
        key = "" if v == "gradguard" else f"{v}_"
        for clock, col in (("", 0), ("cpu_", 1)):
            q25, q50, q75 = np.percentile(t[:, col] / bare[:, col], [25, 50, 75])
            out[f"{key}{clock}ratio"] = float(q50)
            out[f"{key}{clock}ratio_iqr"] = float(q75 - q25)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per block (default 30; quick: 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a summary")
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny model, 2 rounds of 8 steps")
    steady_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    malloc = steady_malloc.apply(args)
    torch.set_num_threads(args.threads)
    result = measure(args.rounds, args.quick, args.steps)
    result.update(torch=torch.__version__, gradguard=gradguard.__version__, python=platform.python_version(),
                  platform=platform.platform(), malloc=malloc)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    print(f"{result['model']} ({result['parameters'] / 1e6:.2f}M parameters), batch {result['batch']} x "
          f"{result['sequence']} tokens, {result['threads']} thread(s); {result['rounds']} rounds x "
          f"{result['steps_per_block']} steps")
    print(f"{'':20} {'ms/step':>8} {'ratio':>7} {'IQR':>6}   {'CPU ms/step':>11} {'ratio':>7} {'IQR':>6}")
    for name, v, key in (("bare Trainer", "bare", None), ("+ GradguardCallback", "gradguard", ""),
                         ("  + guard and clip", "guarded", "guarded_")):
        if f"{v}_step_s" not in result:
            continue
        wall, cpu = result[f"{v}_step_s"] * 1e3, result[f"{v}_cpu_step_s"] * 1e3
        if key is None:
            print(f"{name:20} {wall:8.2f} {'1':>7} {'':>6}   {cpu:11.2f} {'1':>7}")
            continue
        print(f"{name:20} {wall:8.2f} {result[key + 'ratio']:7.3f} {result[key + 'ratio_iqr']:6.3f}   "
              f"{cpu:11.2f} {result[key + 'cpu_ratio']:7.3f} {result[key + 'cpu_ratio_iqr']:6.3f}")


if __name__ == "__main__":
    main()
