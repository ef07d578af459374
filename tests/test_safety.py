"""Safety: no network access, no unpickling, hostile names shown as text, and the CLI says what it executes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradguard as gg
from gradguard.cli import main

PACKAGE = Path(gg.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'

# -- (a) no network ------------------------------------------------------------------------------------------
# Loaded by every Python process started with this folder on PYTHONPATH (lab workers included).
SITECUSTOMIZE = """
import socket

def _blocked(*args, **kwargs):
    raise OSError("network access blocked by gradguard's safety test")

socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
"""

MAIN_PATHS = """
import importlib, pkgutil, socket, sys
import torch
from torch import nn
import gradguard as gg
from gradguard.cli import main

try:
    socket.create_connection(("127.0.0.1", 9))
except OSError as err:
    assert "blocked" in str(err), err
else:
    raise AssertionError("the network is not blocked: this test would prove nothing")

for info in pkgutil.walk_packages(gg.__path__, "gradguard."):  # every module, the optional integrations too
    importlib.import_module(info.name)

torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with gg.watch(model, optimizer=opt, store="run.db", flush_every=2) as w:
    for _ in range(4):
        opt.zero_grad()
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        w.log_loss(loss)
        opt.step()
d = gg.diagnose(model, (torch.randn(32, 8), torch.randn(32, 2)), nn.MSELoss(), steps=2, hessian=False)
d.to_html("diagnosis.html")
for argv in (["report", "run.db", "-o", "run.html"], ["summary", "run.db"],
             ["lab", "run", "seeds-derivatives", "--out", "lab", "--jobs", "1"]):
    try:
        main(argv, standalone_mode=False)
    except SystemExit as exit:
        assert exit.code in (0, None), (argv, exit.code)
print("ALL PATHS RAN")
"""


@pytest.mark.slow
def test_main_paths_run_with_the_network_blocked(tmp_path):
    """Sinks for W&B and MLflow servers and the Ray executor are network clients by design: they are imported
    here but not used; everything else (watch, store, diagnose, report, summary, a lab case) must not connect."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", MAIN_PATHS], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ALL PATHS RAN" in out.stdout
    for page in ("run.html", "diagnosis.html", "lab/index.html"):
        assert (tmp_path / page).stat().st_size > 1000


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


NETWORK_MODULES = ("socket", "urllib.request", "http.client", "requests", "urllib3", "httpx", "aiohttp", "ftplib",
                   "smtplib")
# Network clients by design, each an opt-in the user asks for by name.
NETWORK_ALLOWED = {"lab/executors.py": "--executor ray checks that the user's Ray cluster answers"}


def test_no_network_imports_in_the_package():
    found = {}
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix()
        hits = sorted(n for n in _imports(path) if n in NETWORK_MODULES or n.startswith(("requests.", "http.client")))
        if hits and rel not in NETWORK_ALLOWED:
            found[rel] = hits
    assert not found, f"network modules imported: {found}"
    assert len(SOURCES) > 40  # the walk found the package


# -- (b) no unpickling -----------------------------------------------------------------------------------------
def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    bad = []
    for path in SOURCES:
        rel = path.relative_to(PACKAGE).as_posix()
        for call, func in _calls(path):
            keywords = {k.arg: k.value for k in call.keywords}
            if func == "torch.load":
                wo = keywords.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
            if func in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load"):
                bad.append(f"{rel}:{call.lineno} {func}")
            if func in ("np.load", "numpy.load"):
                ap = keywords.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    bad.append(f"{rel}:{call.lineno} np.load with allow_pickle")
    assert not bad, bad


def test_a_pickled_object_in_a_trace_file_is_refused(tmp_path):
    """gradguard loads no .pt file; the files it does load (.npz traces, --data) must never unpickle."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.npz"
    np.savez(path, header=np.array([Evil()], dtype=object), values=np.array([Evil()], dtype=object))
    with pytest.raises(ValueError, match="not a readable gradguard trace"):
        gg.load(path)
    target = tmp_path / "t.py"
    target.write_text("from torch import nn\ndef make():\n    return nn.Linear(64, 10)\n")
    result = CliRunner().invoke(main, ["diagnose", "--data", str(path), f"{target}:make"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not marker.exists()


# -- (c) hostile names are text ---------------------------------------------------------------------------------
def _hostile_model() -> nn.Module:
    """An MLP whose hidden layers live in a ModuleDict under hostile names, in a class with a hostile name."""
    cls = type(f"Net{SCRIPT}", (nn.Module,), {
        "forward": lambda self, x: self.layers["out"](torch.sigmoid(self.layers[IMG](torch.tanh(
            self.layers[SCRIPT](torch.tanh(self.layers["inp"](x))))))),
    })
    model = cls()
    model.layers = nn.ModuleDict({"inp": nn.Linear(8, 16), SCRIPT: nn.Linear(16, 16), IMG: nn.Linear(16, 16),
                                  "out": nn.Linear(16, 2)})
    return model


def _check_page(open_page, path, *texts):
    html = Path(path).read_text(encoding="utf-8")
    assert SCRIPT not in html and IMG not in html  # escaped everywhere, SVG comments included
    page, errors = open_page(path)
    assert errors == []  # no dialog, no console error, no request leaving the file
    assert page.locator("img[src='x']").count() == 0 and page.locator("script").count() == 0
    body = page.inner_text("body")
    for text in texts:
        assert text in body, text


def test_diagnosis_html_shows_hostile_names_as_text(open_page, tmp_path):
    torch.manual_seed(0)
    model = _hostile_model()
    d = gg.diagnose(model, (torch.randn(64, 8) * 30, torch.randn(64, 2)), nn.MSELoss(), steps=2, hessian=False)
    assert any(SCRIPT in n for n in d.profile.names) and any(IMG in n for n in d.profile.names)
    _check_page(open_page, d.to_html(tmp_path / "d.html"), f"layers.{SCRIPT}", f"layers.{IMG}", f"Net{SCRIPT}")


def test_run_report_shows_hostile_names_and_findings_as_text(open_page, tmp_path):
    torch.manual_seed(0)
    model = _hostile_model()
    store = tmp_path / "run.db"
    with gg.watch(model, store=store, flush_every=2) as w:
        for step in range(4):
            model(torch.randn(16, 8)).sum().backward()
            if step == 3:
                model.layers[IMG].weight.grad.mul_(float("nan"))
            w.step(loss=1.0)
            model.zero_grad()
    messages = [f.message for f in gg.load_findings(store) if f.layer and IMG in f.layer]
    assert messages, "a finding names the hostile layer"
    out = CliRunner().invoke(main, ["report", str(store), "-o", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    _check_page(open_page, tmp_path / "r.html", f"layers.{SCRIPT}", f"layers.{IMG}")


HOSTILE_CASE = f'''
from gradguard.lab import Outcome, Source, case


@case("safety-hostile-title", title={SCRIPT!r}, question={IMG!r}, setup={SCRIPT!r},
      source=Source({IMG!r}, {SCRIPT!r}, qualitative=True))
def hostile(ctx):
    return Outcome({{"x": 1.0}}, {{"x": 1.0}}, True, None, {IMG!r})
'''


def test_lab_report_shows_a_hostile_user_case_as_text(open_page, tmp_path):
    from gradguard.lab.runner import load_user, run_case, write_outputs

    path = tmp_path / "hostile_cases.py"
    path.write_text(textwrap.dedent(HOSTILE_CASE))
    load_user(str(path))
    result = run_case("safety-hostile-title", 0, False, user=[str(path)])
    assert result.passed, result.error
    report = write_outputs([result], tmp_path / "lab", seed=0, full=False)
    _check_page(open_page, report, SCRIPT, IMG)


# -- (d) the CLI says plainly what it executes -------------------------------------------------------------------
@pytest.mark.parametrize("command", [["diagnose"], ["lab", "run"], ["lab", "list"], ["lab"]])
def test_help_says_files_are_executed_as_python(command):
    result = CliRunner().invoke(main, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "executed as Python code" in text and "trust" in text, text
