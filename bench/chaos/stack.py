"""The stack one chaos run owns: a database, a redis-server, Celery workers and beat.

Everything is private to the run, so it can break things freely: a directory `var/chaos-<id>/`
(SQLite file, Redis socket, logs), a PostgreSQL database `baton_chaos_<id>` when DATABASE_URL
is set (dropped at the end), a redis-server of its own (scenario b stops it, so it can never be
a shared one) and its own Redis key prefix.

Nothing here imports Django: `Stack.environment()` must be in os.environ before django.setup().
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from orchestrator_site import embedded_redis

ROOT = Path(__file__).resolve().parents[2]
# Celery's log line for a finished sweep (worker --loglevel INFO, local time).
_SWEEP_LINE = re.compile(
    r"\[(?P<at>[\d-]+ [\d:,]+): INFO/\w+\] Task runs\.tasks\.sweep_stuck_steps\[[^\]]+\] "
    r"succeeded in [\d.e-]+s: \{'requeued': (?P<requeued>\d+), 'failed': (?P<failed>\d+)"
)
# libpq reads PGAPPNAME, so every connection a worker opens carries this name and scenario d
# can drop exactly the workers' connections, never the driver's.
WORKER_APP_NAME = "baton-chaos-worker"


class Database:
    """PostgreSQL (a database created for this run and dropped after it) or a SQLite file."""

    def __init__(self, base_url: str, run_id: str):
        self.base_url = base_url
        self.name = f"baton_chaos_{run_id}"
        self.url = self._url_for(self.name) if base_url else ""
        self._admin = None

    @property
    def is_postgres(self) -> bool:
        return bool(self.base_url)

    @property
    def label(self) -> str:
        if not self.is_postgres:
            return "SQLite (temporary file)"
        parts = urlsplit(self.url)
        return f"PostgreSQL {parts.hostname}:{parts.port or 5432}/{self.name}"

    def _url_for(self, name: str) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))

    def create(self) -> None:
        if not self.is_postgres:
            return
        import psycopg

        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        if not self.is_postgres:
            return
        import psycopg

        if self._admin is not None:
            self._admin.close()
            self._admin = None
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def terminate_worker_connections(self) -> int:
        """pg_terminate_backend every connection the workers hold now; returns how many."""
        import psycopg

        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(
                self.url, autocommit=True, application_name="baton-chaos-driver"
            )
        rows = self._admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s "
            "AND pid <> pg_backend_pid()",
            (WORKER_APP_NAME,),
        ).fetchall()
        return sum(1 for (done,) in rows if done)


class Service:
    """A child process in its own session (so a kill takes its threads and children too),
    logging to a file, ready when a marker line appears in its log."""

    def __init__(
        self, name: str, argv: list[str], env: dict, log_path: Path, ready_marker: str | None
    ):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.process: subprocess.Popen | None = None
        self.starts = 0
        # Down on purpose (killed by the chaos monkey, stopped at the end): the supervisor
        # leaves it alone.
        self.held = False
        self.ready = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 120.0) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.ready = False
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        self.held = False
        if self.ready_marker is None:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
                )
            with open(self.log_path, errors="replace") as log:
                log.seek(offset)
                if self.ready_marker in log.read():
                    self.ready = True
                    return self
            time.sleep(0.1)
        self.kill()
        self.held = False  # not down on purpose: the supervisor tries again
        raise TimeoutError(f"{self.name} not ready within {timeout_s:.0f}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: no acks, no cleanup."""
        self.held = True
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.held = True
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


class Stack:
    """Owns the processes of one chaos run. Use: prepare() -> django.setup() + migrate ->
    start_processes(...) -> ... -> close()."""

    def __init__(
        self,
        *,
        var_dir: Path,
        database_url: str,
        run_id: str,
        lease_s: int | None,
        visibility_s: int | None,
    ):
        self.run_id = run_id
        self.var_dir = var_dir
        self.database = Database(database_url, run_id)
        self.redis_socket = var_dir / "redis.sock"
        self.redis_process: subprocess.Popen | None = None
        self.redis_restarts = 0
        self.lease_s = lease_s
        self.visibility_s = visibility_s
        self.workers: list[Service] = []
        self.beat: Service | None = None
        # (service, exit code, time.monotonic()) of every process that died on its own.
        self.crashes: list[tuple[str, int, float]] = []
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None

    def environment(self) -> dict[str, str]:
        env = {
            "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
            "BATON_VAR_DIR": str(self.var_dir),
            "DATABASE_URL": self.database.url,
            "REDIS_URL": f"redis+socket://{self.redis_socket}",
            "BATON_REDIS_PREFIX": f"chaos-{self.run_id}",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        if self.lease_s:
            env["BATON_STEP_LEASE_S"] = str(self.lease_s)
        if self.visibility_s:
            env["BATON_VISIBILITY_TIMEOUT"] = str(self.visibility_s)
        return env

    def prepare(self) -> None:
        """Create the database and start Redis; export the environment to this process."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.database.create()
        self.start_redis()
        for name in ("BATON_TEST_ID", "BATON_TEST_WORKER"):  # never pick up a test session's
            os.environ.pop(name, None)
        os.environ.update(self.environment())

    # --- redis ---

    def start_redis(self) -> None:
        self.redis_process = embedded_redis.start(self.redis_socket)

    def stop_redis(self) -> None:
        """Stop Redis the hard way. It keeps nothing on disk, so every queued and unacked
        message is gone when it comes back: the worst a Redis restart can do."""
        if self.redis_process is not None and self.redis_process.poll() is None:
            self.redis_process.kill()
            self.redis_process.wait()

    def restart_redis(self) -> None:
        self.start_redis()
        self.redis_restarts += 1

    # --- celery ---

    def _child_env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("BATON_TEST_ID", "BATON_TEST_WORKER")
        }
        return {**env, **self.environment(), **extra}

    def start_processes(self, *, workers: int, concurrency: int, queue: str) -> None:
        """Start the workers and beat in parallel (each boots Django and LiteLLM, slowly)."""
        from orchestrator_site.celery import worker_command

        for index in range(1, workers + 1):
            name = f"w{index}"
            self.workers.append(
                Service(
                    name,
                    worker_command(
                        concurrency,
                        queue,
                        hostname=f"chaos-{self.run_id}-{name}@%h",
                        extra=["--without-gossip", "--without-mingle"],
                    ),
                    self._child_env(PGAPPNAME=WORKER_APP_NAME),
                    self.var_dir / f"worker-{name}.log",
                    " ready.",
                )
            )
        self.beat = Service(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "orchestrator_site",
                "beat",
                "--schedule",
                str(self.var_dir / "celerybeat-schedule"),
                "--loglevel",
                "INFO",
            ],
            self._child_env(),
            self.var_dir / "beat.log",
            "beat: Starting",
        )
        errors: list[BaseException] = []

        def boot(service: Service) -> None:
            try:
                service.start()
            except BaseException as exc:  # reported below, on the main thread
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(s,)) for s in [*self.workers, self.beat]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        self._supervisor = threading.Thread(
            target=self._supervise, name="chaos-supervisor", daemon=True
        )
        self._supervising.set()
        self._supervisor.start()

    def _supervise(self) -> None:
        """Restart a worker or beat that exits on its own, as systemd's Restart=always or a
        container's restart policy would in production, and remember the crash."""
        while self._supervising.is_set():
            for service in [*self.workers, self.beat]:
                process = service.process
                if (
                    process is not None
                    and not service.held
                    and process.poll() is not None
                    and self._supervising.is_set()
                ):
                    self.crashes.append((service.name, process.returncode, time.monotonic()))
                    try:
                        service.start()
                    except (RuntimeError, TimeoutError):
                        pass  # tried again on the next round
            time.sleep(0.5)

    def crashes_since(self, since: float) -> list[str]:
        return [f"{name} (exit {code})" for name, code, at in self.crashes if at >= since]

    def sweeps_between(self, start: datetime, end: datetime) -> dict[str, int]:
        """What the sweeper did between two moments, summed from the workers' task logs."""
        totals = {"sweeps": 0, "requeued": 0, "failed": 0}
        for worker in self.workers:
            if not worker.log_path.exists():
                continue
            with open(worker.log_path, errors="replace") as log:
                for line in log:
                    found = _SWEEP_LINE.match(line)
                    if not found:
                        continue
                    at = datetime.strptime(found["at"], "%Y-%m-%d %H:%M:%S,%f")
                    if start <= at <= end:
                        totals["sweeps"] += 1
                        totals["requeued"] += int(found["requeued"])
                        totals["failed"] += int(found["failed"])
        return totals

    # --- teardown ---

    def close(self, keep: bool) -> None:
        self._supervising.clear()
        if self._supervisor is not None:
            self._supervisor.join()
        for service in [*self.workers, *([self.beat] if self.beat else [])]:
            service.stop()
        self.stop_redis()
        if keep:
            return
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # Django was never set up: nothing to close
            pass
        self.database.drop()
        shutil.rmtree(self.var_dir, ignore_errors=True)
