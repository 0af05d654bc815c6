"""Test overlay: everything from the real settings, with per-session isolation.

Each pytest session gets an id, exported as BATON_TEST_ID so the Celery workers and servers the
suite starts (child processes) read the same database, Redis socket and key prefix. Two suites
on one machine never see each other's queues or rows.
"""

import os
import uuid

os.environ.setdefault("BATON_TEST_ID", uuid.uuid4().hex[:8])
TEST_ID = os.environ["BATON_TEST_ID"]
os.environ.setdefault("BATON_REDIS_PREFIX", f"baton-test-{TEST_ID}")
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's sync API inside pytest

from orchestrator_site.settings import *  # noqa: E402,F403
from orchestrator_site.settings import DATABASE_URL, VAR_DIR  # noqa: E402

DEBUG = False
SECRET_KEY = "test-secret-key-not-for-production"
ALLOWED_HOSTS = ["*"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Workers started by the suite must open the test database, not the real one: they run with
# BATON_TEST_WORKER=1 and point NAME at the name pytest-django creates.
if DATABASE_URL:
    _test_db = f"test_baton_{TEST_ID}"
    DATABASES["default"]["TEST"] = {"NAME": _test_db}  # noqa: F405
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
else:
    _test_db = str(VAR_DIR / f"test-{TEST_ID}.sqlite3")
    DATABASES["default"]["TEST"] = {"NAME": _test_db}  # noqa: F405
if os.environ.get("BATON_TEST_WORKER"):
    DATABASES["default"]["NAME"] = _test_db  # noqa: F405

# Without REDIS_URL the suite runs its own redis-server (tests/conftest.py) on this socket.
if not os.environ.get("REDIS_URL"):
    EMBEDDED_REDIS_SOCKET = VAR_DIR / f"test-redis-{TEST_ID}.sock"
    REDIS_URL = f"redis+socket://{EMBEDDED_REDIS_SOCKET}"
    CELERY_BROKER_URL = REDIS_URL
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0]["address"] = f"unix://{EMBEDDED_REDIS_SOCKET}"  # noqa: F405
    CACHES["default"]["LOCATION"] = f"unix://{EMBEDDED_REDIS_SOCKET}"  # noqa: F405

BATON_STEP_LEASE_S = 6
BATON_RETRY_BACKOFF_S = 0.05
BATON_STREAM_THROTTLE_MS = 50
