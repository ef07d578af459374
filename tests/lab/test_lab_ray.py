"""gradguard lab on Ray and seed sweeps: the local executor's results.json, byte for byte; errors at the boundary."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradguard.cli import main

QUICK = ("rnn-gradient-through-time", "lecun1998-stability")  # the built-in cases that finish fastest

USER_CASES = textwrap.dedent(
    '''
    import os

    import torch
    from gradguard.lab import Context, Outcome, Source, case


    @case("worker-probe", title="What a worker sets up", question="?", setup="-", source=Source("-", "-"),
          default=False)
    def worker_probe(ctx: Context) -> Outcome:
        tiny = float(torch.tensor([1e-39]) * 1.0)  # subnormal in float32: 0 when denormals are flushed
        sample = float(torch.rand(1))
        measured = {"mkl_cbwr": os.environ.get("MKL_CBWR"), "threads": torch.get_num_threads(), "tiny": tiny,
                    "sample": sample}
        return Outcome(measured, {}, measured["mkl_cbwr"] == "COMPATIBLE")


    @case("even-seed", title="Holds for even seeds", question="?", setup="-", source=Source("-", "-"),
          default=False)
    def even_seed(ctx: Context) -> Outcome:
        return Outcome({"seed": ctx.seed}, {"seed": "even"}, ctx.seed % 2 == 0)


    @case("raises", title="A case that raises", question="?", setup="-", source=Source("-", "-"), default=False)
    def raises(ctx: Context) -> Outcome:
        raise RuntimeError("this experiment is broken")
    '''
)


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "ray_cases.py"
    path.write_text(USER_CASES)
    return path


@pytest.fixture(autouse=True)
def _no_usage_stats(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise try to report home


def lab(*args: str):
    return CliRunner().invoke(main, ["lab", "run", *args])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.strip().splitlines() if line]


def assert_ray_stopped() -> None:
    import ray

    assert not ray.is_initialized()  # the local Ray the command started is shut down


@pytest.mark.slow
def test_ray_gives_the_local_results_json_and_reports_a_raising_case(user_file, tmp_path):
    files = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        result = lab(*QUICK, "worker-probe", "raises", "--cases", str(user_file), "--out", str(out), "--jobs", "2",
                     "--executor", executor)
        assert result.exit_code == 1, result.output  # `raises` fails; the others go on
        files[executor] = (out / "results.json").read_bytes()
        assert "raises: RuntimeError: this experiment is broken" in result.stdout
    assert_ray_stopped()
    assert files["local"] == files["ray"]
    doc = json.loads(files["ray"])
    by_name = {c["name"]: c for c in doc["cases"]}
    assert [c["name"] for c in doc["cases"]] == [*QUICK, "worker-probe", "raises"]
    assert all(by_name[n]["passed"] for n in QUICK)
    probe = by_name["worker-probe"]["measured"]
    assert probe["mkl_cbwr"] == "COMPATIBLE" and probe["threads"] == 1 and probe["tiny"] == 0.0
    assert by_name["raises"]["error"] == "RuntimeError: this experiment is broken"
    assert doc["passed"] == 3 and doc["failed"] == 1


@pytest.mark.slow
def test_seed_sweep_is_identical_on_both_executors(tmp_path):
    files = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        result = lab(QUICK[0], "--seeds", "0-1", "--out", str(out), "--jobs", "2", "--executor", executor)
        assert result.exit_code == 0, result.output
        files[executor] = (out / "results.json").read_bytes()
        assert (out / f"{QUICK[0]}-seed0.png").is_file() and (out / f"{QUICK[0]}-seed1.png").is_file()
    assert_ray_stopped()
    assert files["local"] == files["ray"]
    doc = json.loads(files["ray"])
    assert doc["seeds"] == [0, 1] and doc["reproduced"] == {QUICK[0]: 2}
    assert [run["seed"] for run in doc["runs"]] == [0, 1]
    first, second = (run["cases"][0]["measured"] for run in doc["runs"])
    assert first != second  # each seed really ran with its own seed


@pytest.mark.slow
def test_sweep_counts_the_reproducing_seeds_and_one_seed_keeps_the_single_layout(user_file, tmp_path, open_page):
    out = tmp_path / "sweep"
    result = lab("even-seed", "worker-probe", "--seeds", "0,1,2", "--cases", str(user_file), "--out", str(out),
                 "--jobs", "2")
    assert result.exit_code == 1, result.output  # even-seed does not hold for seed 1
    assert "even-seed (seed 1): not reproduced" in result.stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["reproduced"] == {"even-seed": 2, "worker-probe": 3}
    assert doc["passed"] == 1 and doc["failed"] == 1
    assert [[c["passed"] for c in run["cases"]] for run in doc["runs"]] == [[True, True], [False, True], [True, True]]
    samples = [run["cases"][1]["measured"]["sample"] for run in doc["runs"]]
    assert len(set(samples)) == 3
    page, errors = open_page(out / "index.html")
    assert errors == []
    summary = page.locator("#summary-table").inner_text()
    assert "reproduced for 2 of 3 seeds" in summary and "reproduced for 3 of 3 seeds" in summary
    seeds = page.locator("section#even-seed p.seeds").inner_text()
    assert "Reproduced for 2 of 3 seeds" in seeds and "1: not reproduced" in seeds
    assert page.locator("section#even-seed .badge").text_content() == "not reproduced"

    single, plain = tmp_path / "single", tmp_path / "plain"
    assert lab("even-seed", "--seeds", "4", "--cases", str(user_file), "--out", str(single)).exit_code == 0
    assert lab("even-seed", "--seed", "4", "--cases", str(user_file), "--out", str(plain)).exit_code == 0
    assert (single / "results.json").read_bytes() == (plain / "results.json").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--seeds", "0-a"), "neither a seed"),
        (("--seeds", "3-1"), "is empty"),
        (("--seeds", "0-2,1"), "seed 1 is listed twice"),
        (("--seeds", "0,1", "--seed", "3"), "not both"),
        (("--address", "127.0.0.1:6379"), "use it with --executor ray"),
        (("--executor", "ray", "--address", "no-port-here"), "is not a Ray address"),
        (("--executor", "ray", "--address", "head:port"), "is not a Ray address"),
    ],
)
def test_bad_seeds_and_addresses_are_one_error_line(args, message, tmp_path):
    result = lab(QUICK[0], *args, "--out", str(tmp_path / "never"))
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.stderr
    assert not (tmp_path / "never").exists()  # nothing ran


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = code + "\nfrom gradguard.cli import main\nmain(args=sys.argv[1:], prog_name='gradguard')\n"
    return subprocess.run([sys.executable, "-c", "import sys\n" + script, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow  # a fresh interpreter loads torch and the cases
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_nothing_listens_is_one_error_line_at_once(scheme, tmp_path):
    address = f"{scheme}127.0.0.1:{free_port()}"
    start = time.perf_counter()
    result = run_cli("", "lab", "run", QUICK[0], "--executor", "ray", "--address", address,
                     "--out", str(tmp_path / "never"))
    assert time.perf_counter() - start < 60  # Ray's own retries would take minutes
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no Ray cluster answers at " + address), result.stderr
    assert not (tmp_path / "never").exists()


def test_missing_ray_is_one_error_line_naming_the_extra(tmp_path):
    result = run_cli("sys.modules['ray'] = None  # import ray now fails, as when it is not installed",
                     "lab", "run", QUICK[0], "--executor", "ray", "--out", str(tmp_path / "never"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "pip install 'gradguard[ray]'" in lines[0]
    assert not (tmp_path / "never").exists()
