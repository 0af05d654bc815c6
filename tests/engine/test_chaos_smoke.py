"""`make chaos` in miniature: the chaos driver runs end to end against its own stack and
judges its runs, so a change that breaks crash recovery or the driver itself fails CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_chaos_driver_survives_a_worker_kill_and_a_flaky_llm_with_nothing_lost(tmp_path):
    figures = tmp_path / "chaos.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DJANGO_SETTINGS_MODULE",
            "BATON_TEST_ID",
            "BATON_TEST_WORKER",
            "BATON_REDIS_PREFIX",
        )
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos",
            "--scenarios",
            "ac",
            "--runs",
            "3",
            "--kills",
            "1",
            "--llm-runs",
            "3",
            "--workers",
            "1",
            "--latency-ms",
            "1000",
            "--lease-s",
            "4",
            "--visibility-s",
            "5",
            "--deadline-s",
            "45",
            "--json",
            str(figures),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {row["scenario"][0]: row for row in json.loads(figures.read_text())["rows"]}
    kills = rows["a"]
    assert kills["faults"].startswith("1 SIGKILL"), kills["faults"]
    assert kills["runs"] == kills["succeeded"] == 3
    assert kills["lost"] == kills["duplicates"] == kills["half_written"] == 0
    flaky = rows["c"]
    assert flaky["runs"] == 3 and flaky["succeeded"] + flaky["failed_explained"] == 3
    assert flaky["wrong"] == flaky["lost"] == 0
