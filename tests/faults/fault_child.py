"""A training loop recorded with gradguard.watch(store=...), run as a child process by the fault tests.

    python fault_child.py STORE [--flush-every N] [--steps N (0: until killed)] [--fsize BYTES]
        [--own-sigterm] [--threads N]

stdout, one JSON line per event, flushed at once:
  {"step": s}                           after w.step() recorded step s (it is in the Watch now)
  {"flushed": n, "recording": bool}     after each flush: n rows flushed so far, and whether the
                                        store took them (so it holds n rows if "recording")
  {"done": steps, "params_finite": bool, "store_error": str | null}   at a normal end
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys

import torch
from torch import nn


def say(**kw: object) -> None:
    # One write per line: print() writes the text and the newline separately, and a SIGTERM
    # (SystemExit) between them would glue this line to the next one said on the way out.
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--flush-every", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--fsize", type=int, default=0)
    ap.add_argument("--own-sigterm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.fsize:
        # A full disk: writes past the limit fail with EFBIG (SIGXFSZ ignored, else it kills us).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))
    if args.own_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: (say(own_handler=True), sys.exit(7)))

    import gradguard
    from gradguard.record.on_exit import holds_sigterm

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.Tanh())], nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 32), torch.randn(16, 4)
    w = gradguard.watch(model, optimizer=opt, store=args.store, flush_every=args.flush_every,
                        activations_every=4, weights_every=2)
    # Report each flush right after its commit, inside the same SIGTERM hold as the commit (sinks
    # would report later, from their own thread).
    flushed, commit = [0], w.flush

    @holds_sigterm
    def flush_and_report() -> None:
        pending = len(w._ring_steps)
        commit()
        if pending:
            flushed[0] += pending
            say(flushed=flushed[0], recording=w.store_error is None)

    w.flush = flush_and_report  # type: ignore[method-assign]
    step = 0
    while args.steps == 0 or step < args.steps:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        w.step(loss=loss)
        opt.step()
        say(step=step)
        step += 1
    w.close()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    say(done=step, params_finite=finite, store_error=None if w.store_error is None else str(w.store_error))


if __name__ == "__main__":
    main()
