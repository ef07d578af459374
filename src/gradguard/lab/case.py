"""A lab case: a declared experiment (question, setup, the source's claim) and the function that measures it.

Cases register themselves with :func:`case`; the registry is what ``gradguard lab`` runs.
A user adds a case the same way, in any Python file passed to ``gradguard lab --cases``::

    from gradguard.lab import Context, Outcome, Source, case

    @case("my-case", title="...", question="...", setup="...",
          source=Source("Author 2024, Sec. 3", "the claim, quoted"))
    def my_case(ctx: Context) -> Outcome:
        ...
        return Outcome(measured={...}, expected={...}, passed=..., figure=fig, interpretation="...")
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """Where the expectation comes from: the citation (with section or figure) and the claim, quoted.

    ``qualitative``: the reproduction checks the claim's direction or ordering at a smaller
    scale, not the paper's numbers; the report says so.
    """

    citation: str
    claim: str
    qualitative: bool = False


@dataclass
class Context:
    """What a case's function is given: the seed, and whether to run the larger ``--full`` version."""

    seed: int = 0
    full: bool = False

    def pick(self, default: T, full: T) -> T:
        """``full`` under ``--full``, else ``default``: sizes, steps and seed counts."""
        return full if self.full else default

    def seeds(self, default: int = 1, full: int = 3) -> list[int]:
        """The seeds to average over: ``seed, seed + 1, ...``."""
        return [self.seed + i for i in range(self.pick(default, full))]


@dataclass
class Outcome:
    """What a case measured, what the source expects, whether it holds, a figure and what it means.

    ``measured`` and ``expected``: JSON-friendly (numbers, strings, lists, dicts). ``table``:
    optional ``(headers, rows)`` for the report. ``interpretation``: a few sentences read
    from the numbers (not a fixed text that would be true whatever they were).
    """

    measured: dict[str, Any]
    expected: dict[str, Any]
    passed: bool
    figure: Figure | None = None
    interpretation: str = ""
    table: tuple[list[str], list[list[Any]]] | None = None


@dataclass(frozen=True)
class Case:
    """A registered case."""

    name: str
    title: str
    question: str
    setup: str
    source: Source
    run: Callable[[Context], Outcome] = field(repr=False)
    group: str = ""
    default: bool = True  # part of the default suite (``gradguard lab``)
    module: str = ""  # where it was defined, so worker processes can import it


REGISTRY: dict[str, Case] = {}


def case(
    name: str,
    *,
    title: str,
    question: str,
    setup: str,
    source: Source,
    group: str = "",
    default: bool = True,
) -> Callable[[Callable[[Context], Outcome]], Callable[[Context], Outcome]]:
    """Register the decorated function as a lab case called ``name`` (lower case, digits and dashes)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"case names are lower case letters, digits and dashes, got {name!r}")
    if not isinstance(source, Source):
        raise TypeError(f"source must be a gradguard.lab.Source, got {type(source).__name__}")

    def register(fn: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        existing = REGISTRY.get(name)
        module = getattr(fn, "__module__", "")
        if existing is not None and (existing.module, existing.run.__qualname__) != (module, fn.__qualname__):
            raise ValueError(f"a lab case called {name!r} is already registered (from {existing.module})")
        REGISTRY[name] = Case(name, title, question, setup, source, fn, group or module.rpartition(".")[2], default,
                              module)
        return fn

    return register


def finite(x: float) -> float | None:
    """A float for results.json: None where it is not finite (JSON has no NaN or inf)."""
    x = float(x)
    return x if math.isfinite(x) else None
