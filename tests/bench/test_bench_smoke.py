"""`python -m bench.bench --quick` end to end: the harness starts its own stack (a database of
its own, Redis, a Celery worker, Daphne, the fake LLM server), runs every workload with small
counts, prints its table and writes its JSON. Targets are figures in the benchmark, never
assertions here: this only proves the harness measures what it claims to."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.workloads import W2_MILESTONES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

FIGURES = [
    "w1_run_ms",
    "w1_step_ms",
    "w1_hop_ms",
    "w1_llm_ms",
    "w2_run_ms",
    "w3_total_s",
    "w3_steps_per_s",
    "live_step_ms",
    "live_group_ms",
    "report_costs_staff_ms",
    "report_costs_member_ms",
    "report_runs_staff_ms",
    "report_runs_member_ms",
    "profile_queries",
    "profile_step_ms",
    "profile_step_cpu_ms",
    "profile_publish_ms",
    "reference_ms",
]


@pytest.mark.timeout(150)
def test_quick_benchmark_measures_every_workload_and_writes_its_results(tmp_path):
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench",
            "--quick",
            "--out",
            str(out),
            # Its own PostgreSQL database when DATABASE_URL is set, so a `make bench` running
            # alongside keeps its baton_bench.
            "--db-name",
            f"baton_bench_smoke_{os.getpid()}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    report = json.loads(out.read_text())
    assert report["errors"] == {}
    figures = report["figures"]
    for key in FIGURES:
        assert figures[key]["n"] > 0 and figures[key]["median"] > 0, (key, figures[key])
        assert figures[key]["min"] <= figures[key]["median"] <= figures[key]["max"]
    # Each issue target sits beside its figure with a verdict, whatever the verdict is.
    for key in ("w1_run_ms", "w2_run_ms", "w3_total_s", "live_step_ms", "report_costs_staff_ms"):
        assert figures[key]["target"]["met"] in (True, False)
    assert any(k.startswith("rss_w3_worker") and v["median"] > 10 for k, v in figures.items())
    assert any(k.startswith("rss_live_daphne") and v["median"] > 10 for k, v in figures.items())
    stack = report["meta"]["stack"]
    assert stack["pool"] == "threads" and stack["concurrency"] >= 1
    assert report["details"]["w3"]["runs_at_once"] == 10
    assert report["details"]["profile"]["queries_by_phase"]
    timeline = {k: v["median"] for k, v in report["details"]["w2"]["timeline_ms"].items()}
    assert list(timeline) == list(W2_MILESTONES)
    assert 0 < timeline["fan step claimed"] < timeline["first LLM answer recorded"]
    assert timeline["first LLM answer recorded"] < timeline["join claimed"]
    assert timeline["join claimed"] <= timeline["run finished"]

    assert "W1 pipeline: wall per run" in result.stdout
    assert "PASS" in result.stdout or "FAIL" in result.stdout
