"""The recorder: a Trace and its findings in SQLite (WAL mode), readable while the run goes on.

Schema (version 1):

``meta(key TEXT PRIMARY KEY, value TEXT)``
    JSON values: ``format`` ("gradguard.store"), ``schema_version``, ``layers`` (names),
    ``metrics`` (metric names, the row order of ``steps.data``), ``run`` (run metadata).
``steps(step INTEGER PRIMARY KEY, wall_time REAL, loss REAL, loss_given INTEGER, data BLOB)``
    One row per recorded step. ``data`` is float64 little-endian of shape
    [len(metrics), len(layers)], NaN where not measured. ``loss`` is NULL when not given
    or NaN (``loss_given`` tells which).
``findings(id INTEGER PRIMARY KEY, kind, severity, layer, step, message, evidence, fixes)``
    The findings so far (``evidence`` and ``fixes`` as JSON); replaced at every flush.

Every flush is one transaction, so a killed run keeps every step up to its last flush.

Retention (``Recorder(keep=R)``, ``watch(store_keep=R)``; default 100,000 rows, ``None`` keeps
every row): once the store holds more than R rows, the write that crosses it also deletes
rows, in the same transaction, by the policy of :mod:`gradguard.trace_history`: the last R/4
steps and the anomalies (non-finite steps, steps named by findings, with context) at full
resolution, older steps downsampled to a spike row and a richest row per bucket of steps.
It leaves at most 3/4 R rows, so deleting happens once every R/4 rows, not at every flush.
SQLite reuses the freed pages (no ``VACUUM``), and the write-ahead log is truncated after
each checkpoint, so the files stop growing. Size bound for L layers: the store file holds
at most ``R x (80 L + 40) x 1.5 bytes + 1 MiB`` (a row is 80 L bytes of statistics plus
about 40 of step, time and loss; the factor 1.5 covers B-tree pages that deletes leave part
full), and the ``-wal`` file at most 16 MiB, except during a thinning transaction, when it
briefly holds the pages that transaction changes (at most the store file's size).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..detect.finding import Finding
from ..trace import METRICS, Trace, _reorder
from ..trace_history import MIN_LIMIT, plan, summarize

FORMAT = "gradguard.store"
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_KEEP = 100_000
_WAL_LIMIT = 16 * 2**20  # bytes the write-ahead log is truncated to after a checkpoint
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, wall_time REAL NOT NULL, loss REAL,
    loss_given INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, severity TEXT NOT NULL, layer TEXT,
    step INTEGER, message TEXT NOT NULL, evidence TEXT NOT NULL, fixes TEXT NOT NULL);
"""


class StoreError(ValueError):
    """A file that is not a readable gradguard store, or a store that cannot be written."""


class Recorder:
    """Writes a run to a SQLite file; one transaction per :meth:`write`.

    ``keep``: the most rows the store holds (see Retention in the module docstring); ``None``
    keeps every row.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layers: Sequence[str],
        meta: dict[str, Any],
        overwrite: bool = False,
        keep: int | None = DEFAULT_KEEP,
    ) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < MIN_LIMIT):
            raise ValueError(f"store_keep must be an integer of at least {MIN_LIMIT} rows, or None to keep every row;"
                             f" got {keep!r}")
        self.keep = keep
        # What the retention policy needs of each row in the store, kept here so that deciding
        # never reads the rows back: step numbers [n] and trace_history.summarize rows [n, 3].
        # Blocks, one per write, joined only when the policy runs.
        self._kept_steps: list[np.ndarray] = []
        self._kept_summary: list[np.ndarray] = []
        self._kept_rows = 0
        self.rows_deleted = 0
        self.path = Path(path)
        parent = self.path.resolve().parent
        if not parent.is_dir():
            raise StoreError(f"cannot write store {self.path}: folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot write store {self.path}: folder {parent} is not writable; choose another path")
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"store {self.path} already exists; pass a new path, or overwrite=True to replace it"
                )
            _check_is_store(self.path)  # never delete a file that is not ours
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.layers = list(layers)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a killed process (only power loss can drop the last ones).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            header = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "layers": self.layers,
                "metrics": list(METRICS),
                "run": meta,
            }
            # Tables and header in one transaction: a reader never sees a store without its header.
            with self._transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [(k, json.dumps(v, default=str)) for k, v in header.items()],
                )
        except sqlite3.Error as err:
            raise StoreError(f"cannot write store {self.path}: {err}") from None
        self._closed = False

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def write(
        self,
        steps: np.ndarray,
        values: np.ndarray,
        loss: np.ndarray,
        loss_given: np.ndarray,
        findings: Sequence[Finding] | None = None,
    ) -> None:
        """Append recorded rows (and replace the findings) in one transaction; applies retention."""
        now = time.time()
        values = np.asarray(values, dtype=np.float64)
        steps = np.asarray(steps, dtype=np.int64)
        drop, fresh, kept = self._retain(steps, values, loss, loss_given, findings)
        rows = [
            (
                int(s),
                now,
                # SQLite stores NaN as NULL; loss_given keeps a NaN loss apart from a missing one.
                float(v) if given and not math.isnan(v) else None,
                int(bool(given)),
                np.ascontiguousarray(vals, dtype="<f8").tobytes(),
            )
            for s, vals, v, given, ok in zip(steps, values, loss, loss_given, fresh)
            if ok
        ]
        with self._transaction():
            # Delete before inserting: the freed pages take the new rows, so the file never holds more than keep.
            self._db.executemany("DELETE FROM steps WHERE step = ?", [(int(s),) for s in drop])
            self._db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?)", rows)
            if findings is not None:
                self._db.execute("DELETE FROM findings")
                self._db.executemany(
                    "INSERT INTO findings (kind, severity, layer, step, message, evidence, fixes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (f.kind, f.severity, f.layer, f.step, f.message, json.dumps(f.evidence, default=str),
                         json.dumps([fx.__dict__ for fx in f.fixes]))
                        for f in findings
                    ],
                )
        # Only after the commit: a failed write leaves the store, and this record of it, as they were.
        self._kept_steps, self._kept_summary = kept
        self._kept_rows = sum(len(b) for b in self._kept_steps)
        self.rows_deleted += len(drop)

    def _retain(
        self,
        steps: np.ndarray,
        values: np.ndarray,
        loss: np.ndarray,
        loss_given: np.ndarray,
        findings: Sequence[Finding] | None,
    ) -> tuple[np.ndarray, np.ndarray, tuple[list[np.ndarray], list[np.ndarray]]]:
        """Under the retention policy: (stored steps to delete, mask of the new rows to insert, the new record)."""
        fresh = np.ones(len(steps), dtype=bool)
        none = np.zeros(0, dtype=np.int64)
        if self.keep is None:
            return none, fresh, ([], [])
        summary = summarize(values, np.asarray(loss, dtype=np.float64), np.asarray(loss_given, dtype=bool))
        blocks_s, blocks_m = [*self._kept_steps, steps], [*self._kept_summary, summary]
        if self._kept_rows + len(steps) <= self.keep:
            return none, fresh, (blocks_s, blocks_m)
        all_steps, all_summary = np.concatenate(blocks_s), np.concatenate(blocks_m)
        protect = [f.step for f in findings or () if f.step is not None]
        keep = plan(all_steps, all_summary, self.keep, protect)
        n_old = self._kept_rows
        return all_steps[:n_old][~keep[:n_old]], keep[n_old:], ([all_steps[keep]], [all_summary[keep]])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()


class _Tx:
    """BEGIN ... COMMIT, or ROLLBACK on error (sqlite3's own context manager needs autocommit off)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _as_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected the path of a .db store or .npz trace (str or Path), got {type(path).__name__}")
    return Path(path)


def _check_is_store(path: Path) -> None:
    if not path.is_file():
        raise StoreError(f"{path} does not exist or is not a file")
    with open(path, "rb") as fh:
        magic = fh.read(16)
    if magic != _SQLITE_MAGIC:
        raise StoreError(
            f"{path} is not a gradguard store (not an SQLite file). "
            "Stores are written by gradguard.watch(model, store='run.db')."
        )


def _connect_ro(path: Path) -> sqlite3.Connection:
    _check_is_store(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        raw = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as err:
        raise StoreError(f"{path} is not a readable gradguard store: {err}") from None
    if json.loads(raw.get("format", "null")) != FORMAT:
        db.close()
        raise StoreError(f"{path} is an SQLite file but not a gradguard store (no gradguard header)")
    try:
        version = json.loads(raw.get("schema_version", "0"))
    except json.JSONDecodeError:
        version = None
    if isinstance(version, bool) or not isinstance(version, int):
        db.close()
        raise StoreError(f"{path} is a damaged gradguard store: its schema_version is {version!r}, not an integer")
    if version > SCHEMA_VERSION:
        db.close()
        raise StoreError(
            f"{path} was written by a newer gradguard (schema {version}, this one reads up to "
            f"{SCHEMA_VERSION}); upgrade gradguard to read it"
        )
    return db


def load_store(path: str | os.PathLike[str]) -> Trace:
    """The Trace of a store: of a finished, running or killed run."""
    path = _as_path(path)
    db = _connect_ro(path)
    try:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        layers, metrics = meta["layers"], meta["metrics"]
        rows = db.execute("SELECT step, loss, loss_given, data FROM steps ORDER BY step").fetchall()
    except (sqlite3.Error, KeyError, json.JSONDecodeError) as err:
        raise StoreError(f"{path} is a damaged gradguard store: {err}") from None
    finally:
        db.close()
    run = dict(meta.get("run") or {})
    trace = Trace(layers, run)
    if rows:
        shape = (len(metrics), len(layers))
        try:
            values = np.stack([np.frombuffer(r[3], dtype="<f8").reshape(shape) for r in rows])
        except ValueError as err:
            raise StoreError(f"{path} is a damaged gradguard store: a row has the wrong size ({err})") from None
        loss = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        given = np.array([bool(r[2]) for r in rows])
        trace.append(np.array([r[0] for r in rows]), _reorder(values, metrics), loss, given)
    return trace


def load_findings(path: str | os.PathLike[str]) -> list[Finding]:
    """The findings recorded in a store (as of its last flush)."""
    path = _as_path(path)
    db = _connect_ro(path)
    try:
        rows = db.execute(
            "SELECT kind, severity, layer, step, message, evidence, fixes FROM findings ORDER BY id"
        ).fetchall()
    except sqlite3.Error as err:
        raise StoreError(f"{path} is a damaged gradguard store: {err}") from None
    finally:
        db.close()
    return [
        Finding.from_dict(
            {"kind": k, "severity": s, "layer": layer, "step": st, "message": m,
             "evidence": json.loads(e), "fixes": json.loads(fx)}
        )
        for k, s, layer, st, m, e, fx in rows
    ]


def load(path: str | os.PathLike[str]) -> Trace:
    """Load a Trace from a store (``.db``) or a saved Trace (``.npz``), whichever ``path`` is."""
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if zipfile.is_zipfile(path):
        return Trace.load(path)
    return load_store(path)
