"""A Hugging Face Trainer with gradguard: every optimizer step recorded before clipping, guarded.

    python examples/transformers_example.py [--store runs/transformers.db] [--max-steps 40]

Trains a small GPT-2 built from a config (no download) on generated token sequences
(arithmetic progressions modulo the vocabulary, which it can learn) with gradient
accumulation and the Trainer's own clipping. ``GradguardCallback`` records per-layer
gradients of each optimizer step before that clipping, with the step's real loss, to a
crash-safe store; its guard skips the step whose loss is made NaN on purpose, which the
Trainer's own log would have hidden. Prints the findings and writes an HTML report beside
the store.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradguard.integrations.transformers import GradguardCallback
from gradguard.report.run import write_run_report

VOCAB, LENGTH = 128, 32


def sequences(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token sequences start, start + stride, ... (mod VOCAB): the next token follows from the last two."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        ids = (start + stride * torch.arange(LENGTH)) % VOCAB
        rows.append({"input_ids": ids, "labels": ids})
    return rows


class OneBadStep(Trainer):
    """Makes the loss NaN at one optimizer step, as a corrupt batch or an overflow would."""

    bad_step = -1

    def compute_loss(self, model, inputs, **kwargs):  # type: ignore[no-untyped-def]
        loss = super().compute_loss(model, inputs, **kwargs)
        return loss * math.nan if self.state.global_step == self.bad_step else loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/transformers.db", help="SQLite store to record to (replaced if it exists)")
    ap.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=LENGTH,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=args.max_steps,
            learning_rate=3e-3, max_grad_norm=1.0, logging_steps=max(1, args.max_steps // 6), seed=0,
        )
        trainer = OneBadStep(model=model, args=training, train_dataset=sequences(16 * args.max_steps))
        trainer.bad_step = args.max_steps // 2
        cb = GradguardCallback(store=store, overwrite=True, flush_every=20, guard=True).attach(trainer)
        trainer.train()
    report = write_run_report(store, store.with_suffix(".html"))
    trace = cb.trace
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"recorded {len(trace)} optimizer steps ({trainer.state.global_step} taken) to {store}; report: {report}")
    bad = trace.steps[~np.isfinite(trace.loss)].tolist()
    print(f"loss {trace.loss[0]:.3f} -> {trace.loss[-1]:.3f}; non-finite loss at step(s) {bad}")
    print(f"guard skipped {cb.guard.skipped if cb.guard else 0} step(s); parameters finite: {finite}")
    for f in cb.findings:
        print(f"  [{f.severity}] {f.kind} at {f.layer}: {f.message}")
    return 0 if finite and len(trace) == trainer.state.global_step else 1


if __name__ == "__main__":
    raise SystemExit(main())
