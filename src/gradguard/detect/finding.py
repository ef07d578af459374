"""Finding: what was found, where, how bad, why (the numbers) and what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "error")
KINDS = (
    "vanishing_gradient",
    "exploding_gradient",
    "nonfinite",
    "saturated_activation",
    "dead_units",
    "bad_init_scale",
    "unnormalized_input",
    "learning_rate_too_high",
    "vanishing_through_time",
    "exploding_through_time",
)


@dataclass(frozen=True)
class Fix:
    """A concrete remedy: a one-line title, the code that applies it, and a stable name."""

    title: str
    code: str
    name: str = ""


@dataclass(frozen=True)
class Finding:
    """One detected problem.

    ``kind`` is from a fixed vocabulary (see ``KINDS``); ``layer`` is a qualified module
    name or None for the whole model; ``step`` is the step it refers to; ``evidence``
    holds the numbers it rests on; ``fixes`` are remedies, most likely first.
    """

    kind: str
    severity: str
    message: str
    layer: str | None = None
    step: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    fixes: tuple[Fix, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        d = asdict(self)
        d["fixes"] = [asdict(f) for f in self.fixes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        fixes = tuple(Fix(**f) for f in d.get("fixes", ()))
        return cls(
            kind=d["kind"], severity=d["severity"], message=d["message"], layer=d.get("layer"),
            step=d.get("step"), evidence=dict(d.get("evidence", {})), fixes=fixes,
        )

    def __str__(self) -> str:
        where = f" in {self.layer}" if self.layer else ""
        when = f" at step {self.step}" if self.step is not None else ""
        return f"[{self.severity}] {self.kind}{where}{when}: {self.message}"
