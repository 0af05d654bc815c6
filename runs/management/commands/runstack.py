"""Run the whole Baton stack in the foreground: Redis, Daphne processes sharing the web port, a
Celery worker and Celery beat.

honcho's Manager starts each process in its own session, prefixes every output line with the
process name, and on SIGINT/SIGTERM sends SIGTERM to every process group (SIGKILL after 5 s), so
one Ctrl-C leaves nothing behind. If any process exits, the others are stopped too.
"""

import os
import shlex
import socket
import sys
import time

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from honcho.manager import Manager

from orchestrator_site.celery import worker_command
from orchestrator_site.web import web_command

# How long web/worker/beat wait for Redis to answer PING before giving up (and so stopping
# the stack): an embedded server starts in well under a second, a remote one should be up.
REDIS_WAIT_S = 30.0


def wait_for_redis(url: str, timeout_s: float = REDIS_WAIT_S) -> None:
    """Block until the Redis at `url` (redis-py syntax) answers PING; exit 1 on timeout.

    Runs in each child's shell line before it execs the real program, so nothing connects to
    the broker before it exists.
    """
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.ping():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            print(f"Redis at {url} did not answer PING within {timeout_s:.0f}s", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.1)


def _embedded_redis_socket() -> str | None:
    """The socket to run our own redis-server on, or None when REDIS_URL names a Redis."""
    embedded_url = f"redis+socket://{settings.EMBEDDED_REDIS_SOCKET}"
    return str(settings.EMBEDDED_REDIS_SOCKET) if settings.REDIS_URL == embedded_url else None


def _redis_py_url() -> str:
    """kombu spells unix sockets `redis+socket://`, redis-py `unix://`."""
    return settings.REDIS_URL.replace("redis+socket://", "unix://", 1)


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Command(BaseCommand):
    help = "Run Redis (unless REDIS_URL is set), Daphne, a Celery worker and beat until Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Daphne bind address.")
        parser.add_argument("--port", type=int, default=8000, help="Daphne port.")
        parser.add_argument(
            "--web-processes",
            type=int,
            default=settings.BATON_WEB_PROCESSES,
            help="Daphne processes sharing the port (default: BATON_WEB_PROCESSES).",
        )
        parser.add_argument(
            "--concurrency", type=int, default=8, help="Threads of the Celery worker."
        )

    def handle(
        self, *args, host: str, port: int, web_processes: int, concurrency: int, **options
    ) -> None:
        if web_processes < 1:
            raise CommandError("--web-processes must be at least 1.")
        if not _port_is_free(host, port):
            raise CommandError(f"{host}:{port} is in use; stop what runs there or pass --port.")
        socket_path = _embedded_redis_socket()
        redis_url = _redis_py_url()
        if socket_path:
            try:
                if redis.Redis(unix_socket_path=socket_path, socket_connect_timeout=1).ping():
                    raise CommandError(
                        f"A Redis already answers on {socket_path}: is another `make run` "
                        "using this var/ directory?"
                    )
            except (redis.RedisError, OSError):
                pass  # nothing there: the normal case

        python = sys.executable
        # Children must load the same settings module as this command (e.g. --settings=...).
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE}
        env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixed stream as they are written
        wait = shlex.join(
            [
                python,
                "-c",
                "import sys; from runs.management.commands.runstack import wait_for_redis; "
                "wait_for_redis(sys.argv[1])",
                redis_url,
            ]
        )

        def after_redis(argv: list[str]) -> str:
            # `exec` so the program replaces the shell and receives honcho's signals itself.
            return f"{wait} && exec {shlex.join(argv)}"

        manager = Manager()
        if socket_path:
            manager.add_process(
                "redis",
                "exec "
                + shlex.join(
                    [
                        python,
                        "-c",
                        "import sys; from orchestrator_site import embedded_redis; "
                        "embedded_redis.serve_forever(sys.argv[1])",
                        socket_path,
                    ]
                ),
                env=env,
                cwd=str(settings.BASE_DIR),
            )
        beat = [python, "-m", "celery", "-A", "orchestrator_site", "beat", "-l", "INFO"]
        processes = {}
        for number in range(1, web_processes + 1):
            processes[f"web{number}" if web_processes > 1 else "web"] = web_command(host, port)
        processes["worker"] = worker_command(concurrency, settings.CELERY_TASK_DEFAULT_QUEUE)
        processes["beat"] = beat
        for name, argv in processes.items():
            manager.add_process(name, after_redis(argv), env=env, cwd=str(settings.BASE_DIR))

        database = settings.DATABASES["default"]
        self.stdout.write(
            f"Baton on http://{host}:{port}/ ({web_processes} web process"
            f"{'es' if web_processes > 1 else ''}) with {database['ENGINE'].rsplit('.', 1)[-1]} "
            f"database {database['NAME']} and "
            f"{'an embedded Redis on ' + socket_path if socket_path else 'the Redis of REDIS_URL'}."
            " Ctrl-C stops everything."
        )
        self.stdout.flush()
        manager.loop()
        sys.exit(manager.returncode)
