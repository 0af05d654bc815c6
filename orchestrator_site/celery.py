import os
import sys

from celery import Celery, signals

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


@signals.worker_init.connect
def _switch_threads_often(**_):
    """A worker's threads mostly wait on I/O and hand work to each other (the pool, the
    publisher, the sender), and each wake-up waits for the GIL. CPython lets a busy thread keep
    it for 5 ms; at 1 ms a step's queries and a rendered event wait less behind another step's
    Python. `make bench` on 2 cores: W1 33 -> 28 ms per step, W3 6.5 -> 5.4 s, live p99 90 -> 70 ms
    (0.3 ms was slower again: too many switches)."""
    sys.setswitchinterval(0.001)
