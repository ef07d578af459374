"""The lab's runner and command: user cases, unknown names, determinism, failures, the report in a browser."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradguard.cli import main
from gradguard.lab import REGISTRY, Context, Outcome, Source, case

USER_CASES = textwrap.dedent(
    '''
    import torch
    import gradguard
    from gradguard.lab import Context, Outcome, Source, case
    from gradguard.report.html import new_figure


    @case("user-depth", title="A user's <b>depth</b> case", question="Does depth shrink a sigmoid net's gradient?",
          setup="10 sigmoid layers of width 8 on random data",
          source=Source("User 2026, Sec. 1 & Fig. <2>", "it shrinks", qualitative=True))
    def user_depth(ctx: Context) -> Outcome:
        g = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        model = torch.nn.Sequential(*[m for _ in range(10) for m in (torch.nn.Linear(8, 8), torch.nn.Sigmoid())])
        with gradguard.watch(model) as w:
            model(torch.randn(16, 8, generator=g)).sum().backward()
            w.step()
        norms = w.trace.metric("grad_norm")[0]
        fig = new_figure()
        ax = fig.add_subplot()
        ax.semilogy(norms)
        ratio = float(norms[0] / norms[-1])
        return Outcome({"ratio": ratio, "threads": torch.get_num_threads()}, {"ratio_below": 0.1}, ratio < 0.1,
                       fig, f"the first layer gets {ratio:.2g} of the last one's gradient")


    @case("user-broken", title="A case that raises", question="?", setup="-", source=Source("-", "-"),
          default=False)
    def user_broken(ctx: Context) -> Outcome:
        raise RuntimeError("this experiment is broken")
    '''
)


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_cases.py"
    path.write_text(USER_CASES)
    return path


def lab(*args: str):
    return CliRunner().invoke(main, ["lab", *args])


def test_user_case_runs_in_worker_processes_and_reaches_the_report(user_file, tmp_path, open_page):
    out = tmp_path / "report"
    result = lab("run", "user-depth", "user-broken", "--cases", str(user_file), "--out", str(out), "--jobs", "2")
    assert result.exit_code == 1, result.output  # user-broken fails: the suite goes on, the status says so
    doc = json.loads((out / "results.json").read_text())
    first, broken = doc["cases"]
    assert first["name"] == "user-depth" and first["passed"] and first["group"] == "my_cases"
    assert first["measured"]["threads"] == 1  # each case runs single-threaded
    assert broken["passed"] is False and "this experiment is broken" in broken["error"]
    assert doc["passed"] == 1 and doc["failed"] == 1
    assert (out / "user-depth.png").read_bytes()[:4] == b"\x89PNG"
    page, errors = open_page(out / "index.html")
    assert errors == []
    section = page.locator("section#user-depth")
    assert section.count() == 1
    assert "A user's <b>depth</b> case" in section.inner_text()  # escaped, shown as text
    assert "Qualitative reproduction" in section.inner_text()
    box = page.locator("#user-depth-figure img").bounding_box()
    assert box is not None and box["width"] > 100
    assert "this experiment is broken" in page.locator("section#user-broken").inner_text()
    page.screenshot(path=str(tmp_path / "lab.png"), full_page=True)


def test_same_seed_same_results_json_and_another_seed_differs(user_file, tmp_path):
    runs = []
    for i, seed in enumerate(("5", "5", "6")):
        out = tmp_path / f"r{i}"
        result = lab("run", "user-depth", "--cases", str(user_file), "--out", str(out), "--seed", seed, "--jobs", "1")
        assert result.exit_code == 0, result.output
        runs.append((out / "results.json").read_bytes())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_unknown_case_is_one_line_listing_the_cases(user_file):
    result = lab("run", "no-such-case", "--cases", str(user_file))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no lab case called 'no-such-case'" in lines[0] and "user-depth" in lines[0]


def test_case_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad_cases.py"
    bad.write_text("raise ImportError('numpy 3 needed')\n")
    result = lab("run", "x", "--cases", str(bad))
    assert result.exit_code == 2 and "ImportError: numpy 3 needed" in result.stderr
    missing = lab("run", "x", "--cases", str(tmp_path / "nowhere.py"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_json_prints_results_only(user_file, tmp_path):
    result = lab("run", "user-depth", "--cases", str(user_file), "--out", str(tmp_path / "o"), "--json", "--jobs", "1")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["cases"][0]["name"] == "user-depth"


def test_list_shows_user_cases_and_marks_the_non_default_ones(user_file):
    result = lab("list", "--cases", str(user_file))
    assert result.exit_code == 0
    broken = next(line for line in result.stdout.splitlines() if "user-broken" in line)
    assert broken.startswith("+")


def test_case_declarations_are_checked():
    with pytest.raises(ValueError, match="lower case"):
        case("Bad Name", title="t", question="q", setup="s", source=Source("c", "x"))
    with pytest.raises(TypeError, match="Source"):
        case("ok-name", title="t", question="q", setup="s", source="a paper")  # type: ignore[arg-type]

    @case("test-dup", title="t", question="q", setup="s", source=Source("c", "x"))
    def one(ctx: Context) -> Outcome:
        return Outcome({}, {}, True)

    try:
        with pytest.raises(ValueError, match="already registered"):
            @case("test-dup", title="t", question="q", setup="s", source=Source("c", "x"))
            def two(ctx: Context) -> Outcome:
                return Outcome({}, {}, True)
    finally:
        del REGISTRY["test-dup"]
