"""Chromium and Daphne for the browser tests (a pytest plugin, see tests/conftest.py).

- `chromium`: headless Chromium (/usr/bin/chromium) driven by Playwright. With CI set, a
  missing browser fails the test; elsewhere it skips it. Nothing else skips a browser test.
- `asgi_server`: Daphne serving Baton and its static files from the test database, for pages
  that need their WebSockets (pytest-django's live_server speaks WSGI only).
- `signed_in_context(chromium, url, user)`: a browser context with `user`'s session.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections
from django.test import Client
from playwright.sync_api import Browser, BrowserContext, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


class AsgiServer:
    """Daphne's `runserver` (static files with --insecure) in a child process that opens the
    test database, like the Celery worker. Restartable on the same port, which cuts every open
    page's connection. Tests that use it need committed data (`transactional_db`)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(settings.VAR_DIR) / f"test-{settings.TEST_ID}-daphne.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BATON_TEST_WORKER": "1"}
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "runserver",
                    "--noreload",
                    "--insecure",
                    "--skip-checks",
                    f"127.0.0.1:{self.port}",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited early; see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"daphne not up; see {self.log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def asgi_server(transactional_db):
    server = AsgiServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def chromium() -> Iterator[Browser]:
    """Headless Chromium, closed after the test."""
    if not CHROMIUM.exists():
        if _on_ci():
            pytest.fail(f"CI runs every browser test, and {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
            # Code inside sync_playwright runs in a greenlet with its own context, hence its
            # own database connection, which pytest-django does not close (PostgreSQL then
            # refuses to drop the test database).
            connections.close_all()


def signed_in_context(browser: Browser, base_url: str, user, **options) -> BrowserContext:
    """A context on `base_url` that carries a session of `user` (no login form to fill)."""
    client = Client()
    client.force_login(user)
    context = browser.new_context(base_url=base_url, **options)
    context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": base_url,
            }
        ]
    )
    context.set_default_timeout(30_000)
    return context
