import copy
import os
import uuid

import pytest
from django.conf import settings
from django.db import connection

from orchestrator_site import embedded_redis

pytest_plugins = ["tests.worker", "tests.fake_llm", "tests.browser"]

_redis_process = None


def pytest_configure(config):
    """Without REDIS_URL (a fresh machine) the suite runs its own redis-server."""
    global _redis_process
    if not os.environ.get("REDIS_URL") and _redis_process is None:
        _redis_process = embedded_redis.start(settings.EMBEDDED_REDIS_SOCKET)


def pytest_unconfigure(config):
    if _redis_process is not None:
        embedded_redis.stop(_redis_process)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Before the test database is dropped, end connections other threads left open (a
    Playwright greenlet, a publisher thread), or PostgreSQL refuses the drop."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(autouse=True)
def _fresh_cache(settings):
    """Every test gets its own cache namespace (login throttling, warning markers)."""
    caches = copy.deepcopy(settings.CACHES)
    caches["default"]["KEY_PREFIX"] += f":{uuid.uuid4().hex[:8]}"
    settings.CACHES = caches


@pytest.fixture
def alice(django_user_model):
    """Owns the workflows in most tests."""
    return django_user_model.objects.create_user("alice", "alice@example.com", "alice-pass-123")


@pytest.fixture
def bob(django_user_model):
    """A member of alice's workflows."""
    return django_user_model.objects.create_user("bob", "bob@example.com", "bob-pass-123")


@pytest.fixture
def charlie(django_user_model):
    """An outsider: sees none of alice's work."""
    return django_user_model.objects.create_user("charlie", "charlie@example.com", "charlie-123")


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("admin", "admin@example.com", "admin-123")
