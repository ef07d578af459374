"""The default suite end to end, as `gradguard lab` runs it: every case reproduces, the report shows every case."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from gradguard.lab import REGISTRY
from gradguard.lab.runner import load_builtin


@pytest.mark.slow
def test_default_suite_reproduces_every_case_and_the_report_shows_them(tmp_path, open_page):
    out = tmp_path / "lab"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gradguard.cli", "lab", "--out", str(out), "--jobs", "2"],
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    print(f"default suite: {took:.0f} s")  # the figure for the note; timing is the benchmark's job, not asserted
    doc = json.loads((out / "results.json").read_text())
    failed = [(c["name"], c.get("error")) for c in doc["cases"] if not c["passed"]]
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    load_builtin()
    default = [c.name for c in REGISTRY.values() if c.default and c.module.startswith("gradguard.lab.cases")]
    assert [c["name"] for c in doc["cases"]] == default
    assert len(default) >= 20
    for c in doc["cases"]:
        assert c["source"] and c["claim"] and c["measured"] and c["expected"], c["name"]

    page, errors = open_page(out / "index.html")
    assert errors == []
    for name in default:
        section = page.locator(f"section#{name}")
        assert section.count() == 1, name
        box = page.locator(f"#{name}-figure img").bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 100, name
        verdict = section.locator("h2 .badge").inner_text().strip().lower()  # the badge's CSS upper-cases it
        assert verdict == "reproduced", name
    shot = tmp_path / "lab.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000

    # Same seed, same numbers: the whole suite again, byte for byte.
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "gradguard.cli", "lab", "--out", str(again), "--jobs", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "results.json").read_bytes() == (out / "results.json").read_bytes()
