"""Shared fixtures: small models and float64 references computed independently of gradguard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # two shared cores: one thread per process is faster and steadier
    yield


def mlp(
    depth: int, width: int, act: type[nn.Module] = nn.ReLU, d_in: int | None = None, d_out: int = 10
) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = d_in or width
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), act()]
        fan_in = width
    layers.append(nn.Linear(fan_in, d_out))
    return nn.Sequential(*layers)


def ref_layer_grad(module: nn.Module) -> tuple[float, float, float]:
    """float64 (norm, max-abs, non-finite count) of the gradients a module owns directly."""
    own = [p for p in module._parameters.values() if p is not None and p.grad is not None]
    grads = [p.grad.detach().double().reshape(-1) for p in own]
    g = torch.cat(grads)
    finite = torch.isfinite(g)
    gf = torch.where(finite, g, 0.0)
    return float(gf.norm()), float(gf.abs().max()), float((~finite).sum())


def ref_norm(tensors) -> float:
    return float(torch.cat([t.detach().double().reshape(-1) for t in tensors]).norm())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# Tensor methods that read a value back to the host (a synchronisation on an accelerator).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture
def count_reads(monkeypatch):
    """Counts calls of every method in READS, by name, while the test runs."""
    calls: dict[str, int] = dict.fromkeys(READS, 0)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, __name=name, __orig=original, **k):
            calls[__name] += 1
            return __orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.fixture
def tmp_store(tmp_path):
    return tmp_path / "run.db"


np.seterr(all="ignore")


# Browser fixtures for the HTML reports: Debian's chromium, driven by the playwright package
# (playwright's own browser download is not used). CI installs both, so a missing one fails.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
BROWSER_INSTALL = (
    "install the browser with `apt-get install -y chromium` (as root) and playwright with "
    "`pip install -e '.[test]'`; `.ci/run` does both"
)


@pytest.fixture(scope="session")
def browser():
    """A headless chromium for the whole session, closed at the end.

    While it is alive the playwright event loop is marked as running in this thread, so
    ``asyncio.run()`` cannot be called from tests that run after a browser test.
    """
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the browser tests need the playwright package: {BROWSER_INSTALL}", pytrace=False)
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(f"the browser tests need `chromium` on PATH: {BROWSER_INSTALL}", pytrace=False)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """``open_page(path, setup=None) -> (page, errors)``: a local file opened in its own browser context.

    ``errors`` collects console errors, uncaught page errors, dialogs (dismissed) and requests
    that leave the file (aborted: a report must be self-contained). ``setup(page)`` runs before
    the page loads, to add listeners or routes of a test's own. Pages close at teardown.
    """
    from pathlib import Path

    pages = []

    def on_console(errors, msg):
        if msg.type == "error":
            errors.append(f"console: {msg.text}")

    def on_dialog(errors, dialog):
        errors.append(f"dialog {dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_route(errors, route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            errors.append(f"external request: {url}")
            route.abort()

    def _open(path, setup=None):
        page = browser.new_page()
        pages.append(page)
        errors: list[str] = []
        page.on("console", lambda msg: on_console(errors, msg))
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on("dialog", lambda dialog: on_dialog(errors, dialog))
        page.route("**/*", lambda route: on_route(errors, route))
        if setup is not None:
            setup(page)
        page.goto(Path(path).resolve().as_uri(), wait_until="load")
        return page, errors

    yield _open
    for page in pages:
        page.close()
