"""`manage.py runstack` is what `make run` ends with: the whole stack in one foreground process.

These tests start it for real (embedded Redis, two Daphne processes, Celery worker and beat) in a
scratch var directory, the way a fresh machine would, and check that one SIGINT leaves no process
behind.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.core.management import call_command

from orchestrator_site import embedded_redis

ROOT = Path(__file__).resolve().parent.parent.parent
STARTUP_S = 120  # two shared cores: importing Django, LiteLLM and Celery four times takes a while
SHUTDOWN_S = 20

# Variables that would point the stack at the suite's database/Redis instead of its own.
_SUITE_ONLY_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SETTINGS_MODULE",
    "BATON_TEST_ID",
    "BATON_TEST_WORKER",
    "BATON_REDIS_PREFIX",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _processes_of_run(var_dir: str) -> dict[int, str]:
    """pid -> command line of every process that belongs to the stack using `var_dir`.

    Every process of a stack inherits BATON_VAR_DIR, so this finds them even after they have
    been re-parented to init, which a walk of the process tree would miss. redis-server
    overwrites its environment with its process title, but that title names its socket path.
    """
    found = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        for process in psutil.process_iter():
            try:
                cmdline = " ".join(process.cmdline())
                if var_dir in cmdline or process.environ().get("BATON_VAR_DIR") == var_dir:
                    found[process.pid] = cmdline
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found
    marker = f"BATON_VAR_DIR={var_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if var_dir in cmdline or marker in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = cmdline
        except OSError:
            continue
    return found


def _get(url: str) -> int | None:
    """HTTP status of `url`, or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture
def stack_env():
    """Environment of a fresh checkout: no DATABASE_URL/REDIS_URL, its own migrated var dir."""
    # Short path: the embedded Redis's unix socket lives in it (sun_path is ~107 bytes).
    var_dir = tempfile.mkdtemp(prefix="baton-stack-")
    env = {k: v for k, v in os.environ.items() if k not in _SUITE_ONLY_ENV}
    env.update(
        BATON_VAR_DIR=var_dir,
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        PYTHONUNBUFFERED="1",
    )
    try:
        migrate = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if migrate.returncode != 0:
            pytest.fail(f"migrate failed:\n{migrate.stdout}\n{migrate.stderr}")
        yield env
    finally:
        # Whatever a failed test left running belongs to this run only: stop it by pid.
        for pid in _processes_of_run(var_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(var_dir, ignore_errors=True)


class Stack:
    """`manage.py runstack` with two web processes as a subprocess, with its output in a file
    under its var dir."""

    def __init__(self, env: dict[str, str]):
        self.var_dir = env["BATON_VAR_DIR"]
        self.port = _free_port()
        self.log_path = Path(self.var_dir) / "stack.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "runstack",
                    "--port",
                    str(self.port),
                    "--web-processes",
                    "2",
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # like a terminal: the signal goes to runstack alone
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout_s: float = STARTUP_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(
                    f"runstack exited ({self.process.returncode}) before {what}:\n"
                    + self.output()[-6000:]
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout_s}s:\n" + self.output()[-6000:])
            time.sleep(0.25)

    def wait_until_worker_and_beat_run(self) -> None:
        self.wait_for(lambda: " ready." in self.output(), "ready Celery worker")
        self.wait_for(lambda: "beat: Starting" in self.output(), "Celery beat")

    def stop_with(self, signum: int) -> dict[int, str]:
        """Send `signum` to runstack; return what is still running after SHUTDOWN_S."""
        self.process.send_signal(signum)
        deadline = time.monotonic() + SHUTDOWN_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None and not _processes_of_run(self.var_dir):
                break
            time.sleep(0.2)
        left = _processes_of_run(self.var_dir)
        if self.process.poll() is None:
            left[self.process.pid] = "runstack"
        return left

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.mark.integration
def test_runstack_serves_the_site_and_one_sigint_stops_every_process(stack_env):
    stack = Stack(stack_env)
    try:
        login = f"http://127.0.0.1:{stack.port}/accounts/login/"
        stack.wait_for(lambda: _get(login) is not None, "HTTP answer")
        assert _get(login) == 200, stack.output()[-6000:]
        stack.wait_until_worker_and_beat_run()

        for name in ("redis", "web1", "web2", "worker", "beat"):
            assert re.search(rf"^\d\d:\d\d:\d\d {name}\s*\| ", stack.output(), re.MULTILINE), name
        commands = _processes_of_run(stack.var_dir).values()
        assert sum("-m daphne" in command for command in commands) == 2
        running = " ".join(commands)
        assert "redis-server" in running
        assert "celery -A orchestrator_site worker" in running
        assert "celery -A orchestrator_site beat" in running

        assert stack.stop_with(signal.SIGINT) == {}, stack.output()[-6000:]
        assert not (Path(stack.var_dir) / "redis.sock").exists()
    finally:
        stack.kill()


@pytest.mark.integration
def test_runstack_stops_every_process_on_sigterm(stack_env):
    stack = Stack(stack_env)
    try:
        stack.wait_until_worker_and_beat_run()
        assert stack.stop_with(signal.SIGTERM) == {}, stack.output()[-6000:]
    finally:
        stack.kill()


@pytest.mark.integration
def test_runstack_refuses_a_port_that_is_in_use(stack_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "manage.py", "runstack", "--port", str(port)],
            cwd=ROOT,
            env=stack_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port} is in use" in result.stderr
    assert _processes_of_run(stack_env["BATON_VAR_DIR"]) == {}


@pytest.mark.integration
def test_runstack_refuses_a_var_dir_whose_redis_already_runs(stack_env):
    var_dir = Path(stack_env["BATON_VAR_DIR"])
    other_stack_redis = embedded_redis.start(var_dir / "redis.sock")
    try:
        result = subprocess.run(
            [sys.executable, "manage.py", "runstack", "--port", str(_free_port())],
            cwd=ROOT,
            env=stack_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other_stack_redis.poll() is None  # the running one is left alone
    finally:
        embedded_redis.stop(other_stack_redis)
    assert result.returncode != 0
    assert "A Redis already answers" in result.stderr


def _ensure_admin() -> str:
    out = StringIO()
    call_command("ensure_admin", url="http://127.0.0.1:8000/accounts/login/", stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_ensure_admin_creates_a_superuser_with_a_random_password_printed_once():
    first = _ensure_admin()

    password = re.search(r"password: (\S+)", first).group(1)
    assert "http://127.0.0.1:8000/accounts/login/" in first
    admin = authenticate(username="admin", password=password)
    assert admin is not None and admin.is_superuser and admin.is_staff
    assert len(password) >= 20

    second = _ensure_admin()
    assert password not in second
    assert "manage.py changepassword admin" in second
    assert authenticate(username="admin", password=password) is not None
    assert get_user_model().objects.filter(username="admin").count() == 1


@pytest.mark.django_db
def test_ensure_admin_never_reuses_a_password_across_fresh_databases():
    first = re.search(r"password: (\S+)", _ensure_admin()).group(1)
    get_user_model().objects.filter(username="admin").delete()
    second = re.search(r"password: (\S+)", _ensure_admin()).group(1)
    assert first != second
