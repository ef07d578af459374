"""The Trace: training statistics indexed by (step, layer, metric), plus run metadata.

A Trace is what every part of gradguard shares: ``watch`` fills it, the recorder persists
it, detectors read it, reports draw it. It is deliberately plain: numpy arrays and a dict.

Reading interface (stable):

- ``trace.layers``: list of layer names (qualified module names, ``"(root)"`` for
  parameters owned by the model itself), in module registration order.
- ``trace.steps``: int64 array [S] of recorded step numbers (0-based, increasing).
- ``trace.metric(name)``: float64 array [S, L]; NaN where not measured.
- ``trace.loss``: float64 array [S]; NaN where no loss was given.
- ``trace.loss_given``: bool array [S]; tells a NaN loss apart from a missing one.
- ``trace.meta``: dict of run metadata (model summary, torch version, seed, start time...).

Metric names and units (all per layer, per recorded step):

==================  ==========================================================
``grad_norm``       L2 norm of the layer's gradient (finite elements), float64
``grad_absmax``     largest absolute gradient element (finite elements; every ``weights_every`` steps)
``grad_nonfinite``  number of NaN/inf gradient elements
``weight_norm``     L2 norm of the layer's parameters (every ``weights_every`` steps)
``update_norm``     L2 norm of the optimizer's change to the parameters
``update_ratio``    ``update_norm / weight_norm`` (before the step)
``act_mean``        mean of the layer's activation (sampled steps)
``act_std``         standard deviation of the layer's activation (sampled steps)
``act_saturated``   fraction of saturated units of a sigmoid/tanh-like activation
``act_dead``        fraction of units inactive for every sample over a window of batches
==================  ==========================================================

A layer's "activation" is the output of the activation module (``nn.ReLU``,
``nn.Sigmoid``...) that runs right after it, or its own output when none does.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS: tuple[str, ...] = (
    "grad_norm",
    "grad_absmax",
    "grad_nonfinite",
    "weight_norm",
    "update_norm",
    "update_ratio",
    "act_mean",
    "act_std",
    "act_saturated",
    "act_dead",
)
_METRIC_INDEX = {m: i for i, m in enumerate(METRICS)}
FORMAT_VERSION = 1


class Trace:
    """Statistics by (step, layer, metric) and run metadata; see the module docstring."""

    def __init__(self, layers: Sequence[str], meta: dict[str, Any] | None = None) -> None:
        # A bare string is a sequence too: Trace("fc") would silently make layers "f" and "c".
        names = list(_iterable(layers))
        if isinstance(layers, (str, bytes)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"layers must be a list of layer names (str), got {layers!r:.80}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict of run metadata, got {type(meta).__name__}")
        self.layers: list[str] = names
        self.meta: dict[str, Any] = dict(meta or {})
        # Rows arrive in blocks (one per flush); they are joined on first read.
        self._steps: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._loss: list[np.ndarray] = []
        self._given: list[np.ndarray] = []

    # -- building -----------------------------------------------------------------
    def append(
        self, steps: np.ndarray, values: np.ndarray, loss: np.ndarray, loss_given: np.ndarray | None = None
    ) -> None:
        """Add rows: ``steps`` [n], ``values`` [n, metrics, layers], ``loss`` [n].

        ``loss_given`` [n] says which losses were given; by default, the non-NaN ones.
        """
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float64)
        loss = np.asarray(loss, dtype=np.float64).reshape(-1)
        given = ~np.isnan(loss) if loss_given is None else np.asarray(loss_given, dtype=bool).reshape(-1)
        expected = (len(steps), len(METRICS), len(self.layers))
        if values.shape != expected or loss.shape != (len(steps),) or given.shape != loss.shape:
            raise ValueError(
                f"Trace.append: values must have shape {expected} and loss ({len(steps)},); "
                f"got {values.shape} and {loss.shape}"
            )
        if len(steps) == 0:
            return
        last = self._last_step()
        if np.any(np.diff(steps) <= 0) or (last is not None and steps[0] <= last):
            raise ValueError("Trace.append: steps must be strictly increasing")
        self._steps.append(steps)
        self._values.append(values)
        self._loss.append(loss)
        self._given.append(given)

    def _last_step(self) -> int | None:
        return int(self._steps[-1][-1]) if self._steps else None

    def _join(self) -> None:
        if len(self._steps) > 1:
            self._steps = [np.concatenate(self._steps)]
            self._values = [np.concatenate(self._values)]
            self._loss = [np.concatenate(self._loss)]
            self._given = [np.concatenate(self._given)]

    # -- reading ------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        """Recorded step numbers, int64 [S]."""
        self._join()
        return self._steps[0].copy() if self._steps else np.zeros(0, dtype=np.int64)

    @property
    def loss(self) -> np.ndarray:
        """Loss per recorded step, float64 [S]; NaN where none was given."""
        self._join()
        return self._loss[0].copy() if self._loss else np.zeros(0, dtype=np.float64)

    @property
    def loss_given(self) -> np.ndarray:
        """Whether a loss was given at each recorded step, bool [S]."""
        self._join()
        return self._given[0].copy() if self._given else np.zeros(0, dtype=bool)

    def metric(self, name: str) -> np.ndarray:
        """One metric as float64 [steps, layers]; NaN where not measured."""
        if name not in _METRIC_INDEX:
            raise KeyError(f"unknown metric {name!r}; the metrics are: {', '.join(METRICS)}")
        self._join()
        if not self._values:
            return np.zeros((0, len(self.layers)), dtype=np.float64)
        return self._values[0][:, _METRIC_INDEX[name], :].copy()

    def values(self) -> np.ndarray:
        """All metrics as float64 [steps, metrics, layers] (metrics ordered as ``METRICS``)."""
        self._join()
        if not self._values:
            return np.zeros((0, len(METRICS), len(self.layers)), dtype=np.float64)
        return self._values[0].copy()

    def __len__(self) -> int:
        return sum(len(s) for s in self._steps)

    def __repr__(self) -> str:
        return f"Trace({len(self)} steps, {len(self.layers)} layers)"

    def tail(self, n: int) -> Trace:
        """A new Trace holding the last ``n`` recorded steps (same layers and meta)."""
        out = Trace(self.layers, self.meta)
        if n <= 0 or not len(self):
            return out
        # Only the last blocks are read: a running watch calls this every flush, and joining a
        # long history each time would cost a copy of all of it.
        first, held = len(self._steps), 0
        while first > 0 and held < n:
            first -= 1
            held += len(self._steps[first])
        out._steps = [_last(self._steps[first:], n)]
        out._values = [_last(self._values[first:], n)]
        out._loss = [_last(self._loss[first:], n)]
        out._given = [_last(self._given[first:], n)]
        return out

    def keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the rows where the bool mask ``keep`` [S] is true (in place); see ``trace_history``."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ValueError(f"Trace.keep_rows: the mask must have shape ({len(self)},), got {keep.shape}")
        if not len(self):
            return
        self._join()
        self._steps = [self._steps[0][keep]]
        self._values = [self._values[0][keep]]
        self._loss = [self._loss[0][keep]]
        self._given = [self._given[0][keep]]

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, values, loss, loss_given) without copies; callers must not change them."""
        self._join()
        if not self._steps:
            return (np.zeros(0, dtype=np.int64), np.zeros((0, len(METRICS), len(self.layers))),
                    np.zeros(0), np.zeros(0, dtype=bool))
        return self._steps[0], self._values[0], self._loss[0], self._given[0]

    # -- persistence --------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the Trace to a compressed ``.npz`` file; returns the path."""
        path = Path(path)
        header = {"format": "gradguard.trace", "version": FORMAT_VERSION, "metrics": list(METRICS)}
        np.savez_compressed(
            path,
            header=np.array(json.dumps(header)),
            layers=np.array(json.dumps(self.layers)),
            meta=np.array(json.dumps(self.meta, default=str)),
            steps=self.steps,
            values=self.values(),
            loss=self.loss,
            loss_given=self.loss_given,
        )
        # np.savez adds ".npz" when missing; report the file actually written.
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a Trace written by :meth:`save`; raises ``ValueError`` on a corrupt file."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header.get("format") != "gradguard.trace":
                    raise ValueError("not a gradguard trace")
                if int(header.get("version", 0)) > FORMAT_VERSION:
                    raise ValueError(
                        f"written by a newer gradguard (format {header['version']}); upgrade gradguard"
                    )
                trace = cls(json.loads(str(data["layers"])), json.loads(str(data["meta"])))
                values = _reorder(data["values"], header.get("metrics", list(METRICS)))
                trace.append(data["steps"], values, data["loss"], data["loss_given"])
        # TypeError, AttributeError, IndexError: arrays or JSON of the wrong kind or shape.
        except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, ValueError, EOFError, TypeError,
                AttributeError, IndexError) as err:
            raise ValueError(f"{path} is not a readable gradguard trace (.npz): {err}") from None
        return trace


def _last(blocks: list[np.ndarray], n: int) -> np.ndarray:
    """The last ``n`` rows of consecutive blocks, as one array (a copy, so it never pins a long history)."""
    return (np.concatenate(blocks) if len(blocks) > 1 else blocks[0])[-n:].copy()


def _iterable(layers: Any) -> Any:
    try:
        return iter(layers)
    except TypeError:
        raise TypeError(f"layers must be a list of layer names (str), got {type(layers).__name__}") from None


def _reorder(values: np.ndarray, names: list[str]) -> np.ndarray:
    """Map stored metric columns onto this version's METRICS (missing ones become NaN)."""
    out = np.full((values.shape[0], len(METRICS), values.shape[2]), np.nan)
    for j, name in enumerate(names):
        if name in _METRIC_INDEX:
            out[:, _METRIC_INDEX[name], :] = values[:, j, :]
    return out
