"""The lab's HTML report: per case the question, setup, plot, numbers, the source's claim, the verdict, the meaning."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import CaseResult


def _rows(d: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in d.items()]


def write_report(results: Sequence[CaseResult], path: Path, *, seed: int, full: bool) -> Path:
    """Render ``index.html`` (self-contained: plots inlined as data URIs)."""
    from ..report.html import write

    cases = []
    for r in results:
        cases.append({
            "name": r.name, "title": r.title, "group": r.group, "question": r.question, "setup": r.setup,
            "citation": r.citation, "claim": r.claim, "qualitative": r.qualitative,
            "measured": _rows(r.measured), "expected": _rows(r.expected), "passed": r.passed,
            "interpretation": r.interpretation, "table": r.table,
            "image": "data:image/png;base64," + base64.b64encode(r.png).decode("ascii") if r.png else None,
            "error": r.error,
        })
    passed = sum(r.passed for r in results)
    summary = [
        [r.title, r.citation, "qualitative" if r.qualitative else "quantitative",
         "reproduced" if r.passed else ("error" if r.error else "not reproduced")]
        for r in results
    ]
    return write(
        path,
        "lab.html.j2",
        title="gradguard lab: vanishing and exploding gradients, reproduced",
        subtitle=(f"{passed} of {len(results)} cases reproduce their source's claim; seed {seed}"
                  + (", full size" if full else ", default size")),
        toc=[(c["name"], c["title"]) for c in cases],
        cases=cases,
        summary=summary,
    )
