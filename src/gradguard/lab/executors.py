"""Where lab cases run: local worker processes, or tasks on a Ray cluster. Both run ``runner.run_case``.

A task is one case under one seed. Both executors give each task the same worker setup:
the environment of ``WORKER_ENV`` set before the worker process starts (``MKL_CBWR`` is read
only when MKL loads), and inside ``run_case`` one-thread pools, flushed denormals and seeds.
So one seed gives the same results.json whichever executor ran it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .runner import WORKER_ENV, CaseResult, LabError, failed_result, run_case

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'gradguard[ray]'"
RAY_CLIENT_PORT = 10001  # Ray's default for ray://HOST
CONNECT_TIMEOUT_S = 5.0  # Ray's own connect retries run for minutes when nothing listens

Task = tuple[str, int]  # (case name, seed)
OnDone = Callable[[CaseResult], None] | None


def require_ray() -> ModuleType:
    """The ``ray`` module, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"--executor ray needs Ray, which could not be imported ({err}): {RAY_INSTALL}") from None
    return ray


def check_address(address: str | None) -> None:
    """A LabError, at once, when ``address`` is malformed or nothing listens there (``auto``: Ray looks it up)."""
    if address is None or address == "auto":
        return
    rest = address.removeprefix("ray://")
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host, port_text = rest, str(RAY_CLIENT_PORT) if address.startswith("ray://") else ""
    if not host or not port_text.isdigit():
        raise LabError(f"--address {address!r} is not a Ray address: give HOST:PORT (the head node's GCS port, "
                       f"often 6379), ray://HOST[:PORT] (Ray Client) or auto")
    try:
        with socket.create_connection((host, int(port_text)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise LabError(f"no Ray cluster answers at {address} ({err}); start one with `ray start --head` "
                       f"or leave out --address to run on a local Ray") from None


def _absolute(user: Sequence[str]) -> tuple[str, ...]:
    """Case files as absolute paths, so a worker with another working directory finds them (modules stay names)."""
    return tuple(str(Path(s).resolve()) if s.endswith(".py") or os.sep in s or "/" in s else s for s in user)


def run_local(tasks: Sequence[Task], *, full: bool, jobs: int, user: Sequence[str],
              on_done: OnDone) -> list[CaseResult]:
    """Run tasks, ``jobs`` at a time, in spawned worker processes; results in the order of ``tasks``.

    Spawned, not forked: torch's thread pools do not survive a fork.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: dict[Task, CaseResult] = {}
    saved = {var: os.environ.get(var) for var in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # the spawned workers inherit it when they start
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(tasks))), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_case, name, seed, full, _absolute(user)): (name, seed) for name, seed in tasks}
            for future in as_completed(futures):
                name, seed = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # the worker itself died; the case's own errors come back as results
                    result = failed_result(name, seed, f"the worker process running it failed: {err!r}")
                done[name, seed] = result
                if on_done is not None:
                    on_done(result)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return [done[t] for t in tasks]


def _connect(ray: Any, address: str | None, jobs: int) -> None:
    """Start a local Ray of ``jobs`` CPUs, or join the cluster at ``address``; a LabError when that fails."""
    check_address(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls home
    try:
        if address is None:
            ray.init(num_cpus=jobs, include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        # Ray's ConnectionError says only that it failed; the innermost cause (often a whole traceback, whose last
        # line counts) says why, e.g. that the cluster wants an authentication token.
        cause: BaseException = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        why = str(err) if cause is err else f"{err}: {str(cause).strip().splitlines()[-1]}"
        raise LabError(f"could not {'join Ray at ' + address if address else 'start a local Ray'}: {why}") from None


def run_ray(tasks: Sequence[Task], *, full: bool, jobs: int, user: Sequence[str], address: str | None,
            on_done: OnDone) -> list[CaseResult]:
    """Run each task as a Ray task of one CPU; results in the order of ``tasks``.

    Joins the Ray this process is already connected to, else the cluster at ``address``,
    else starts a local Ray of ``jobs`` CPUs, which it shuts down at the end. Case files
    must exist at the same path on every node.
    """
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        _connect(ray, address, jobs)
    try:
        # env_vars are set when Ray starts the worker process, before torch (and MKL) load in it.
        remote = ray.remote(num_cpus=1, max_retries=0)(run_case).options(runtime_env={"env_vars": dict(WORKER_ENV)})
        refs = {remote.remote(name, seed, full, _absolute(user)): (name, seed) for name, seed in tasks}
        done: dict[Task, CaseResult] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name, seed = refs[ready[0]]
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # the worker died or could not start; not the case's own error
                result = failed_result(name, seed, f"the Ray task running it failed: {err}")
            done[name, seed] = result
            if on_done is not None:
                on_done(result)
    finally:
        if started:
            ray.shutdown()
    return [done[t] for t in tasks]


def execute(tasks: Sequence[Task], *, executor: str = "local", full: bool = False, jobs: int = 1,
            user: Sequence[str] = (), address: str | None = None, on_done: OnDone = None) -> list[CaseResult]:
    """Run tasks on ``executor`` (``local`` or ``ray``); results in the order of ``tasks``."""
    if executor == "local":
        if address is not None:
            raise LabError("--address is the Ray cluster's address: use it with --executor ray")
        return run_local(tasks, full=full, jobs=jobs, user=user, on_done=on_done)
    if executor == "ray":
        return run_ray(tasks, full=full, jobs=jobs, user=user, address=address, on_done=on_done)
    raise LabError(f"no executor called {executor!r}; the executors are: {', '.join(EXECUTORS)}")
