"""Several web processes on one port (orchestrator_site/web.py, what `make run` starts): the
kernel spreads the connections over all of them, and the events of a run reach its pages on
every one of them through the Redis channel layer.

The processes are real Daphnes serving the test database, like the suite's Celery worker; each
writes an access log of its own, which tells which of them answered what.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from orchestrator_site.web import web_command
from runs import events
from tests.factories import make_agent, make_workflow
from tests.runs.test_consumers import event_lines
from tests.runs.test_views import FANOUT, make_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
STARTUP_S = 120  # two shared cores: each process imports Django and Baton on its own
TIMEOUT_S = 15  # a page that missed a live message catches up from the log within 5 s


class WebProcesses:
    """`count` web processes on one free port, each with its output and access log in
    `log_dir`."""

    def __init__(self, count: int, log_dir: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BATON_TEST_WORKER": "1"}
        self.access_logs = [log_dir / f"web{number}-access.log" for number in range(1, count + 1)]
        self.outputs = [log_dir / f"web{number}.log" for number in range(1, count + 1)]
        self.processes = []
        for access_log, output in zip(self.access_logs, self.outputs, strict=True):
            command = web_command("127.0.0.1", self.port, ["--access-log", str(access_log)])
            with open(output, "wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def wait_bound(self) -> None:
        """Until every process has bound its socket: it does so before it becomes Daphne. (A
        connection made while only one has goes to that one.)"""
        deadline = time.monotonic() + STARTUP_S
        for process in self.processes:
            while b"-m\0daphne\0" not in Path(f"/proc/{process.pid}/cmdline").read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"web process {process.pid} did not start:\n{self.output()}")
                time.sleep(0.05)

    def served(self, request: str) -> list[int]:
        """How many access log lines of each process contain `request`."""
        return [log.read_text().count(request) if log.exists() else 0 for log in self.access_logs]

    def wait_served(self, request: str, total: int) -> list[int]:
        """`served(request)` once the processes have logged `total` of them (a line is written
        just after its response is sent)."""
        deadline = time.monotonic() + TIMEOUT_S
        while sum(self.served(request)) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.served(request)

    def output(self) -> str:
        return "\n".join(f"{path.name}:\n{path.read_text()[-3000:]}" for path in self.outputs)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def web(transactional_db, tmp_path):
    processes = WebProcesses(2, tmp_path)
    try:
        processes.wait_bound()
        yield processes
    finally:
        processes.stop()


def test_connections_to_the_one_port_are_spread_over_every_web_process(web):
    for _ in range(40):
        # A fresh connection each time; one to a process that is still starting waits in its
        # socket's queue and is answered once Daphne is up.
        with urllib.request.urlopen(f"{web.url}/accounts/login/", timeout=STARTUP_S) as response:
            assert response.status == 200

    served = web.wait_served('"GET /accounts/login/" 200', 40)
    assert sum(served) == 40, web.output()
    assert all(served), served


def test_a_runs_events_reach_its_pages_on_every_web_process(web, alice):
    make_agent("analyst")
    workflow = make_workflow(FANOUT, owner=alice, slug="fanout", name="Fan-out team")
    run = make_run(workflow, alice)
    client = Client()
    client.force_login(alice)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value

    async def scenario() -> list[str]:
        import aiohttp

        headers = {"Origin": web.url, "Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"}
        url = f"ws://127.0.0.1:{web.port}/ws/runs/{run.pk}/"
        timeout = aiohttp.ClientTimeout(total=STARTUP_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            pages = [await http.ws_connect(url, headers=headers) for _ in range(20)]
            try:
                for page in pages:
                    await page.send_str(json.dumps({"last_seq": 0}))
                connected = web.wait_served("WSCONNECT /ws/runs/", 20)
                assert sum(connected) == 20, web.output()
                assert all(connected), connected

                events.append_event(run.pk, "run.totals", {"tokens": 10, "cost": "0.01"})
                events.flush()
                return [(await page.receive_str(timeout=TIMEOUT_S)) for page in pages]
            finally:
                for page in pages:
                    await page.close()

    for html in asyncio.run(scenario()):
        assert event_lines(html) == [1]


def test_a_port_another_program_listens_on_is_refused():
    with socket.socket() as taken:  # no SO_REUSEPORT: not a web process of ours
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            web_command("127.0.0.1", port),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
