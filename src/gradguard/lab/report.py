"""The lab's HTML report: per case the question, setup, plot, numbers, the source's claim, the verdict, the meaning."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import CaseResult


def _rows(d: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in d.items()]


def write_report(results: Sequence[CaseResult], path: Path, *, seed: int, full: bool,
                 runs: Mapping[int, Sequence[CaseResult]] | None = None) -> Path:
    """Render ``index.html`` (self-contained: plots inlined as data URIs).

    ``runs``: a seed sweep's results per seed; ``results`` (seed ``seed``'s) are then the ones
    shown in full, and each case says how many seeds reproduce its claim.
    """
    from ..report.html import write

    cases = []
    for r in results:
        cases.append({
            "name": r.name, "title": r.title, "group": r.group, "question": r.question, "setup": r.setup,
            "citation": r.citation, "claim": r.claim, "qualitative": r.qualitative,
            "measured": _rows(r.measured), "expected": _rows(r.expected), "passed": r.passed,
            "interpretation": r.interpretation, "table": r.table,
            "image": "data:image/png;base64," + base64.b64encode(r.png).decode("ascii") if r.png else None,
            "error": r.error, "seeds": None,
        })
    passed = sum(r.passed for r in results)
    summary = [
        [r.title, r.citation, "qualitative" if r.qualitative else "quantitative",
         "reproduced" if r.passed else ("error" if r.error else "not reproduced")]
        for r in results
    ]
    if runs is not None and len(runs) > 1:
        counts = [sum(rs[i].passed for rs in runs.values()) for i in range(len(results))]
        for i, c in enumerate(cases):
            c["seeds"] = [f"{s}: " + ("reproduced" if rs[i].passed else ("error" if rs[i].error else "not reproduced"))
                          for s, rs in runs.items()]
            c["reproduced"] = counts[i]
            c["shown_seed"] = seed
            c["passed"] = counts[i] == len(runs)
            summary[i][3] = f"reproduced for {counts[i]} of {len(runs)} seeds"
        passed = sum(n == len(runs) for n in counts)
        seeds_text = "seeds " + ", ".join(map(str, runs))
        subtitle = f"{passed} of {len(results)} cases reproduce their source's claim under every seed; {seeds_text}"
    else:
        subtitle = f"{passed} of {len(results)} cases reproduce their source's claim; seed {seed}"
    return write(
        path,
        "lab.html.j2",
        title="gradguard lab: vanishing and exploding gradients, reproduced",
        subtitle=subtitle + (", full size" if full else ", default size"),
        toc=[(c["name"], c["title"]) for c in cases],
        cases=cases,
        summary=summary,
    )
