"""A real Celery worker process for integration tests.

The worker runs `tests.settings` with BATON_TEST_WORKER=1, so it opens the test database that
pytest-django created and the same Redis prefix as the suite. Tests that use it need committed
data: mark them `transactional_db` (or use `live_server`).
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings

from orchestrator_site.celery import worker_command

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(self, name: str = "w1", concurrency: int = 8, extra_env: dict | None = None):
        self.name = name
        self.concurrency = concurrency
        self.extra_env = extra_env or {}
        self.log_path = Path(settings.VAR_DIR) / f"test-{settings.TEST_ID}-{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "WorkerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        start_at = self.log_path.stat().st_size
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "BATON_TEST_WORKER": "1",
            **self.extra_env,
        }
        self.process = subprocess.Popen(
            worker_command(
                self.concurrency,
                settings.CELERY_TASK_DEFAULT_QUEUE,
                hostname=f"{self.name}-{settings.TEST_ID}@%h",
                extra=["--without-gossip", "--without-mingle"],
            ),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early; see {self.log_path}")
            with open(self.log_path) as f:
                f.seek(start_at)
                if " ready." in f.read():
                    return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"worker not ready within {timeout_s}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: no acks, no cleanup."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def _session_worker(django_db_setup, django_db_blocker):
    worker = WorkerProcess("session").start()
    yield worker
    worker.stop()


def quiesce(timeout_s: float = 30.0) -> None:
    """Let the workers go idle before the test's tables are flushed.

    Active runs are cancelled, so what is queued finishes at once; then we wait until the queue
    is empty and no delivered message is unacknowledged (acks_late: a task is acked when it is
    done), and for this process's publisher. A worker still writing while PostgreSQL truncates
    the tables would deadlock the flush.
    """
    import redis

    from runs import events
    from runs.models import Run

    Run.objects.filter(status__in=Run.ACTIVE).update(status=Run.CANCELLED, cancel_requested=True)
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    url = settings.CELERY_BROKER_URL
    client = (
        redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
        if url.startswith("redis+socket://")
        else redis.Redis.from_url(url)
    )
    deadline = time.monotonic() + timeout_s
    idle_since = None
    while time.monotonic() < deadline:
        busy = client.llen(f"{prefix}{settings.CELERY_TASK_DEFAULT_QUEUE}") or client.hlen(
            f"{prefix}unacked"
        )
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > 0.3:
            break
        time.sleep(0.05)
    client.close()
    events.flush()


@pytest.fixture
def celery_worker(_session_worker, transactional_db):
    """A running worker that sees this test's committed rows."""
    if _session_worker.process.poll() is not None:
        _session_worker.start()
    yield _session_worker
    quiesce()


@pytest.fixture
def worker_factory(django_db_setup, transactional_db):
    """Start extra workers (e.g. to SIGKILL one); all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(name: str, **kwargs) -> WorkerProcess:
        worker = WorkerProcess(name, **kwargs).start()
        started.append(worker)
        return worker

    yield start
    quiesce()
    for worker in started:
        worker.stop()
