import os
import sys

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

app = Celery("baton")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def worker_command(
    concurrency: int, queue: str, *, hostname: str = "", loglevel: str = "INFO", extra=()
) -> list[str]:
    """The command line of a Baton worker: steps wait on I/O (the LLM, PostgreSQL, Redis), so
    a threads pool of `concurrency` threads, consuming the steps' `queue`. `make run`, the
    test suite, `make bench` and `make chaos` all start their workers with it."""
    command = [sys.executable, "-m", "celery", "-A", "orchestrator_site", "worker"]
    command += ["--pool", "threads", "--concurrency", str(concurrency), "--queues", queue]
    if hostname:
        command += ["--hostname", hostname]
    return [*command, *extra, "--loglevel", loglevel]
