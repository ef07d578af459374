"""Run lab cases, in worker processes when asked, and write results.json, the plots and the HTML report.

Each case runs single-threaded with denormals flushed to zero (vanishing signals are
subnormal numbers, many times slower on a CPU) and every random generator seeded, so the
same seed gives the same numbers. ``results.json`` holds no timings: two runs with one
seed give identical files, whether the cases ran in local processes or on Ray (``executors``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .case import REGISTRY, Case, Context, Outcome

BUILTIN = "gradguard.lab.cases"


class LabError(Exception):
    """A user mistake (unknown case, case file that does not load): the message says what and how to fix it."""


@dataclass
class CaseResult:
    """One case's outcome, as the report and results.json need it (picklable: the figure is kept as PNG bytes)."""

    name: str
    title: str
    group: str
    question: str
    setup: str
    citation: str
    claim: str
    qualitative: bool
    measured: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    interpretation: str = ""
    table: tuple[list[str], list[list[Any]]] | None = None
    png: bytes | None = field(default=None, repr=False)
    error: str | None = None
    seed: int = 0
    seconds: float = 0.0  # shown in the terminal, never written to results.json

    def to_json(self) -> dict[str, Any]:
        """The results.json entry."""
        d = {
            "name": self.name, "title": self.title, "group": self.group,
            "source": self.citation, "claim": self.claim, "qualitative": self.qualitative,
            "measured": self.measured, "expected": self.expected, "passed": self.passed,
        }
        if self.error is not None:
            d["error"] = self.error.strip().splitlines()[-1]
        return d


# -- loading cases ----------------------------------------------------------------------------------------------------
def load_builtin() -> None:
    """Import every built-in case module (registers them)."""
    import pkgutil

    package = importlib.import_module(BUILTIN)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{BUILTIN}.{info.name}")


def load_user(spec: str) -> list[str]:
    """Import a user's case file (``path/to/cases.py``) or module (``package.cases``); returns the cases it added."""
    before = set(REGISTRY)
    try:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise LabError(f"case file {path} does not exist")
            # A private namespace (a bare stem could shadow a real module); the stem becomes the cases' group.
            name = f"gradguard_lab_user.{path.stem}"
            if name not in sys.modules:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise LabError(f"{path} is not a Python file")
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            importlib.import_module(spec)
    except LabError:
        raise
    except Exception as err:  # the user's code: report it in one line
        raise LabError(f"loading cases from {spec} raised {type(err).__name__}: {err}") from err
    added = sorted(set(REGISTRY) - before)
    return added


def select(names: Sequence[str] | None) -> list[Case]:
    """The cases to run: the named ones (in the order given), or the default suite in registry order."""
    if not names:
        return [c for c in REGISTRY.values() if c.default]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        listing = ", ".join(REGISTRY)
        raise LabError(f"no lab case called {', '.join(map(repr, unknown))}; the cases are: {listing}")
    return [REGISTRY[n] for n in dict.fromkeys(names)]


# -- running one case -------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    # No metadata: the bytes depend on the figure only.
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


SIGNIFICANT = 10  # digits kept of every float in results.json


def _jsonable(x: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, tuples to lists, floats to 10 significant digits (non-finite: None).

    The rounding is what makes one seed give one file: BLAS/LAPACK kernels (MKL picks them
    by memory alignment) change the last bits of float64 results from process to process,
    around the 14th digit, far below any digit a case's check or reader uses.
    """
    import numpy as np

    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return float(f"{x:.{SIGNIFICANT}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


WORKER_ENV = {"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _blas_single_thread() -> Any:
    """One thread in every BLAS/OpenMP pool for the block (threadpoolctl, which scikit-learn brings).

    torch.set_num_threads does not reach the BLAS/LAPACK pools (OpenBLAS, MKL) behind
    torch.linalg and numpy, whose threaded reductions change the last bits from run to run.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn (the lab's data) depends on it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def run_outcome(name: str, seed: int = 0, full: bool = False) -> Outcome:
    """Run a registered case here as the workers do: one thread (BLAS pools too), denormals flushed, seeded."""
    import torch

    from ..numerics import flush_denormals

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_single_thread(), flush_denormals():
            _seed_everything(seed)
            return REGISTRY[name].run(Context(seed=seed, full=full))
    finally:
        torch.set_num_threads(threads)


def run_case(name: str, seed: int, full: bool, user: Sequence[str] = ()) -> CaseResult:
    """Run one case here: single-threaded, denormals flushed, seeded. Never raises for the case's own errors."""
    if name not in REGISTRY:  # a fresh worker process: load the cases again
        load_builtin()
        for spec in user:
            load_user(spec)
    c = REGISTRY[name]
    result = CaseResult(c.name, c.title, c.group, c.question, c.setup, c.source.citation, c.source.claim,
                        c.source.qualitative)
    result.seed = seed
    start = time.perf_counter()
    try:
        outcome = run_outcome(name, seed, full)
        if not isinstance(outcome, Outcome):
            raise TypeError(f"case {name!r} returned {type(outcome).__name__}, not a gradguard.lab.Outcome")
        result.measured = _jsonable(outcome.measured)
        result.expected = _jsonable(outcome.expected)
        json.dumps([result.measured, result.expected], allow_nan=False)  # fail here, not when writing the report
        result.passed = bool(outcome.passed)
        result.interpretation = outcome.interpretation
        result.table = _jsonable(outcome.table) if outcome.table is not None else None
        if outcome.figure is not None:
            result.png = _png(outcome.figure)
    except Exception:
        result.passed = False
        result.error = traceback.format_exc()
    finally:
        result.seconds = time.perf_counter() - start
    return result


def failed_result(name: str, seed: int, error: str) -> CaseResult:
    """The result of a case whose worker failed before it could report (a crashed process, a lost Ray task)."""
    c = REGISTRY[name]
    return CaseResult(c.name, c.title, c.group, c.question, c.setup, c.source.citation, c.source.claim,
                      c.source.qualitative, error=error, seed=seed)


# -- running many -----------------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: a comma-separated list of seeds and inclusive ranges, ``0,1,2``, ``0-3``, ``0-2,7``."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise LabError(f"--seeds {text!r}: {part.strip()!r} is neither a seed (7) nor a range (0-3); "
                           f"write e.g. --seeds 0,1,2 or --seeds 0-3")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise LabError(f"--seeds {text!r}: the range {first}-{last} is empty; write it low-high, {last}-{first}")
        for s in range(first, last + 1):
            if s in seeds:
                raise LabError(f"--seeds {text!r}: seed {s} is listed twice")
            seeds.append(s)
    return seeds


def run_seeds(
    cases: Iterable[Case],
    seeds: Sequence[int],
    *,
    full: bool = False,
    jobs: int = 1,
    user: Sequence[str] = (),
    on_done: Callable[[CaseResult], None] | None = None,
    executor: str = "local",
    address: str | None = None,
) -> dict[int, list[CaseResult]]:
    """Run every case once per seed, each run a separate task on ``executor``; per seed, results in case order.

    ``executor``: ``local`` (fresh spawned processes, ``jobs`` at a time) or ``ray`` (Ray
    tasks on the cluster at ``address``, or on a local Ray of ``jobs`` CPUs). Either way a
    worker starts with one-thread BLAS/OpenMP pools and MKL's reproducible code path
    (``MKL_CBWR``, which MKL reads only when it loads: without it MKL picks kernels by
    memory alignment, and the last bits of a result change from one process to the next).
    """
    from .executors import execute  # executors builds on this module

    names = [c.name for c in cases]
    tasks = [(n, s) for s in seeds for n in names]
    results = execute(tasks, executor=executor, full=full, jobs=jobs, user=user, address=address, on_done=on_done)
    return {s: results[i * len(names):(i + 1) * len(names)] for i, s in enumerate(seeds)}


def run_cases(
    cases: Iterable[Case],
    *,
    seed: int = 0,
    full: bool = False,
    jobs: int = 1,
    user: Sequence[str] = (),
    on_done: Callable[[CaseResult], None] | None = None,
    executor: str = "local",
    address: str | None = None,
) -> list[CaseResult]:
    """Run cases under one seed in fresh worker processes (see :func:`run_seeds`); results in the order given."""
    return run_seeds(cases, [seed], full=full, jobs=jobs, user=user, on_done=on_done, executor=executor,
                     address=address)[seed]


def results_document(results: Sequence[CaseResult], *, seed: int, full: bool) -> dict[str, Any]:
    """The content of results.json."""
    return {
        "seed": seed,
        "full": full,
        "passed": sum(r.passed for r in results),
        "failed": sum(not r.passed for r in results),
        "cases": [r.to_json() for r in results],
    }


def write_outputs(results: Sequence[CaseResult], out: Path, *, seed: int, full: bool) -> Path:
    """Write ``out/results.json``, ``out/<case>.png`` and ``out/index.html``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    doc = results_document(results, seed=seed, full=full)
    (out / "results.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    for r in results:
        if r.png is not None:
            (out / f"{r.name}.png").write_bytes(r.png)
    from .report import write_report

    return write_report(results, out / "index.html", seed=seed, full=full)


def sweep_document(runs: Mapping[int, Sequence[CaseResult]], *, full: bool) -> dict[str, Any]:
    """The content of results.json for more than one seed: per case the seeds that reproduce, and every run.

    ``passed``/``failed`` count cases that reproduce under every seed / under not every
    seed; ``reproduced`` maps each case to its number of reproducing seeds; ``runs`` holds,
    per seed, what a single-seed results.json holds.
    """
    first = next(iter(runs.values()))
    counts = {r.name: sum(rs[i].passed for rs in runs.values()) for i, r in enumerate(first)}
    return {
        "seeds": list(runs),
        "full": full,
        "passed": sum(n == len(runs) for n in counts.values()),
        "failed": sum(n < len(runs) for n in counts.values()),
        "reproduced": counts,
        "runs": [results_document(rs, seed=s, full=full) for s, rs in runs.items()],
    }


def write_sweep_outputs(runs: Mapping[int, Sequence[CaseResult]], out: Path, *, full: bool) -> Path:
    """Write ``out/results.json`` (:func:`sweep_document`), ``out/<case>-seed<S>.png`` and ``out/index.html``."""
    out.mkdir(parents=True, exist_ok=True)
    doc = sweep_document(runs, full=full)
    (out / "results.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    for s, rs in runs.items():
        for r in rs:
            if r.png is not None:
                (out / f"{r.name}-seed{s}.png").write_bytes(r.png)
    from .report import write_report

    first_seed, first = next(iter(runs.items()))
    return write_report(first, out / "index.html", seed=first_seed, full=full, runs=runs)

