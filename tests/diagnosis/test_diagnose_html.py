"""A Diagnosis as HTML, opened in headless Chromium: every section and figure there, names escaped, no errors."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import gradguard

EVIL = "<script>alert(1)</script>"


class Named(nn.Module):
    """A sigmoid MLP whose layers live in a ModuleDict, one of them under a hostile name."""

    def __init__(self) -> None:
        super().__init__()
        names = ["inp"] + [f"h{i}" for i in range(8)] + [EVIL, "out"]
        self.layers = nn.ModuleDict({n: nn.Linear(16 if n != "inp" else 8, 16 if n != "out" else 3) for n in names})
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.layers.items():
            x = layer(x)
            if name != "out":
                x = self.act(x)
        return x


def test_diagnosis_report_in_a_browser(open_page, tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    d = gradguard.diagnose(Named(), (x, y), F.cross_entropy, steps=5)
    assert f"layers.{EVIL}" in d.profile.names
    d.try_fixes(["relu_he", "batchnorm"], steps=5)
    path = d.to_html(tmp_path / "nested" / "diagnosis.html")
    page, errors = open_page(path)
    assert errors == []
    text = page.inner_text("body")
    assert f"layers.{EVIL}" in text  # shown as text, never run (no dialog among the errors)
    for section in ("findings", "profile", "theory", "init", "stability", "run", "fixes"):
        assert page.locator(f"section#{section}").count() == 1, section
    for figure in ("profile-figure", "loss-figure"):
        box = page.locator(f"#{figure} svg").bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 100, figure
    assert page.locator("#profile-table tbody tr").count() == len(d.profile.order)
    assert page.locator("#fixes-table tbody tr").count() == len(d.fix_results)
    assert page.locator("li.finding").count() == len(d.findings)
    assert d.findings[0].kind in text
    shot = tmp_path / "diagnosis.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recurrent_report_has_the_time_section(open_page, tmp_path):
    torch.manual_seed(0)

    class RNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(3, 16, batch_first=True)
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    d = gradguard.diagnose(RNN(), (torch.randn(8, 60, 3), torch.randn(8, 1)), F.mse_loss, steps=3, hessian=False)
    page, errors = open_page(d.to_html(tmp_path / "rnn.html"))
    assert errors == []
    assert page.locator("#time-figure svg").count() == 1
    assert "rnn" in page.inner_text("#time-table")
