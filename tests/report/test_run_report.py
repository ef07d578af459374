"""`gradguard report`: the post-mortem page of real recorded runs (one killed), opened in headless Chromium."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradguard
from gradguard.cli import main
from gradguard.record import Recorder
from gradguard.report.run import write_run_report

EVIL = "<script>alert(1)</script>"
LAYER = f"layers.{EVIL}"
NAN_STEP = 37
STEPS = 60
SECTIONS = ("run", "nonfinite", "findings", "heatmap", "total", "updates", "activations", "loss", "layers")
FIGURES = ("heatmap-figure", "total-figure", "updates-figure", "activations-figure", "loss-figure")


class Named(nn.Module):
    """A tanh MLP whose layers live in a ModuleDict, one of them under a hostile name."""

    def __init__(self) -> None:
        super().__init__()
        names = ["inp", "h0", EVIL, "h1", "out"]
        self.layers = nn.ModuleDict({n: nn.Linear(8 if n == "inp" else 16, 3 if n == "out" else 16) for n in names})
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.layers.items():
            x = layer(x)
            if name != "out":
                x = self.act(x)
        return x


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real run recorded to a store, with NaN gradients in two layers at NAN_STEP (whose update is skipped)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "run.db"
    model = Named()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with gradguard.watch(model, optimizer=opt, store=path, flush_every=10, weights_every=2,
                         activations_every=5) as w:
        for step in range(STEPS):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if step == NAN_STEP:
                # "out" comes later in the layer order: the first non-finite layer is the hostile one.
                model.layers["out"].weight.grad.mul_(float("nan"))
                model.layers[EVIL].weight.grad.mul_(float("nan"))
            w.step(loss=loss)
            if step != NAN_STEP:  # as a guard would: never apply a non-finite step
                opt.step()
    return path


def _committed(path) -> int:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM steps").fetchone()[0])
    finally:
        db.close()


def _figure_box(page, figure: str) -> dict:
    box = page.locator(f"#{figure} svg").first.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 100, figure
    return box


def test_report_of_a_run_with_nan_in_a_browser(store, open_page, tmp_path):
    path = write_run_report(store, tmp_path / "nested" / "report.html")
    html = path.read_text(encoding="utf-8")
    assert EVIL not in html  # escaped everywhere, inside the figures' SVG comments too
    assert path.stat().st_size < 5_000_000
    page, errors = open_page(path)
    assert errors == []
    assert page.locator("script").count() == 0
    text = page.inner_text("body")
    assert LAYER in text  # shown as text, never run (no dialog among the errors)
    for section in SECTIONS:
        assert page.locator(f"section#{section}").count() == 1, section
    for figure in FIGURES:
        _figure_box(page, figure)
    assert page.inner_text("#first-nonfinite-step") == str(NAN_STEP)
    assert page.inner_text("#first-nonfinite-layer") == LAYER
    assert "1 of 60 recorded steps had a non-finite gradient" in page.inner_text("#first-nonfinite")
    assert "guard events are not recorded in the store" in page.inner_text("#total")
    findings = gradguard.load_findings(store)
    assert any(f.kind == "nonfinite" and f.step == NAN_STEP and f.layer == LAYER for f in findings)
    assert page.locator("#findings li.finding").count() == len(findings)
    assert page.locator("#findings .fix").count() == sum(len(f.fixes) for f in findings)
    rows = page.locator("#layers-table tbody tr")
    assert rows.count() == 5
    assert rows.nth(2).locator("td").first.inner_text() == LAYER
    assert rows.nth(2).locator("td").last.inner_text() == "256"  # its weight's NaN values at NAN_STEP
    assert "60" in page.inner_text("#meta-table") and "Named" in page.inner_text("#meta-table")


CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import gradguard
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 10))
    w = gradguard.watch(model, store=sys.argv[1], flush_every=5, activations_every=3)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    flushed = 0
    while True:  # runs until killed
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        w.step(loss=loss)
        with torch.no_grad():  # plain SGD by hand: torch.optim would import torch._dynamo (seconds)
            for p in model.parameters():
                p -= 0.1 * p.grad
        if len(w.trace) != flushed:
            flushed = len(w.trace)
            print(flushed, flush=True)
    """
)


@pytest.mark.slow
def test_report_of_a_killed_run(open_page, tmp_path):
    store = tmp_path / "killed.db"
    seen = 0
    with subprocess.Popen([sys.executable, "-c", CHILD, str(store)], stdout=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 60
        while seen < 30 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert seen >= 30, "the child did not get far enough"

    committed = _committed(store)
    assert committed >= seen
    page, errors = open_page(write_run_report(store, tmp_path / "killed.html"))
    assert errors == []
    assert f"3 layers, {committed} recorded steps" in page.inner_text("header")
    meta = dict(
        (row.locator("td").first.inner_text(), row.locator("td").last.inner_text())
        for row in page.locator("#meta-table tbody tr").all()
    )
    assert meta["recorded steps"] == str(committed)
    assert meta["step range"] == f"0 to {committed - 1}"
    assert page.inner_text("#first-nonfinite-step") == "none"
    for figure in ("heatmap-figure", "total-figure", "loss-figure"):
        _figure_box(page, figure)
    assert page.locator("#layers-table tbody tr").count() == 3


def test_report_command(store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.html"
    result = runner.invoke(main, ["report", str(store), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.stdout

    random_bytes = tmp_path / "random.db"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    for bad, says in ((tmp_path / "missing.db", "no such file"), (random_bytes, "not a gradguard store")):
        result = runner.invoke(main, ["report", str(bad)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], result.stderr
        assert not bad.with_suffix(".report.html").exists()


def test_default_output_is_next_to_the_store(tmp_path):
    store = tmp_path / "empty.db"
    Recorder(store, ["a", "b"], {"model": "Tiny"}).close()  # a run killed before its first flush
    result = CliRunner().invoke(main, ["report", str(store)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "empty.report.html").read_text(encoding="utf-8")
    assert "0 recorded steps" in page and "holds no recorded steps" in page


def test_report_of_a_saved_trace(store, open_page, tmp_path):
    npz = gradguard.load(store).save(tmp_path / "run.npz")
    page, errors = open_page(write_run_report(npz, tmp_path / "npz.html"))
    assert errors == []
    assert page.locator("#findings li.finding").count() == 0
    assert "holds no findings" in page.inner_text("#findings")
    assert page.inner_text("#first-nonfinite-step") == str(NAN_STEP)
    for figure in FIGURES:
        _figure_box(page, figure)
