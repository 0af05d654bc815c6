"""The stuck-step sweeper: work whose worker vanished, or whose Celery message was lost, comes back
within the configured time (the lease, the pending-step staleness and beat's sweep interval).

The tests play Celery beat themselves: they call `engine.sweep_stuck_steps()` at beat's interval
from settings.CELERY_BEAT_SCHEDULE, so every second of the recovery is measured.
"""

import time
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from runs import engine
from runs.models import Run, Step, UsageRecord
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.integration

SWEEP_EVERY_S = settings.CELERY_BEAT_SCHEDULE["sweep-stuck-steps"]["schedule"]
# A pending step nobody claimed for this long lost its doorbell (runs/engine.py).
PENDING_STALE_S = max(settings.BATON_STEP_LEASE_S * 3, 15)
# Claiming and running one short step on a busy two-core CI machine.
EXECUTION_MARGIN_S = 15


def stranded_run(owner, agent_model: dict | None = None) -> tuple[Run, Step]:
    """A running run whose only step no Celery message will ever deliver: it is created under
    the global stop switch (so no doorbell rings), then set running behind the engine's back."""
    make_agent("writer", **(agent_model or {}))
    workflow = make_workflow(pipeline_spec("writer"), owner=owner)
    engine.set_stop_everything(True, owner)
    run = engine.start_run(workflow.latest_version(), {"topic": "sweeping"}, owner)
    engine.set_stop_everything(False, owner)
    Run.objects.filter(pk=run.pk).update(
        status=Run.RUNNING, started_at=timezone.now(), blocked_on=""
    )
    return run, run.steps.get()


def sweep_like_beat(run: Run, timeout_s: float) -> tuple[float, list[dict]]:
    """Sweep every SWEEP_EVERY_S until the run ends; returns (seconds taken, sweep results)."""
    started = time.monotonic()
    sweeps = []
    while time.monotonic() - started < timeout_s:
        sweeps.append(engine.sweep_stuck_steps())
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while time.monotonic() < next_sweep:
            run.refresh_from_db()
            if run.status in Run.TERMINAL:
                return time.monotonic() - started, sweeps
            time.sleep(0.1)
    raise TimeoutError(f"run {run.pk} still {run.status} after {timeout_s:.0f}s of sweeping")


def test_step_of_a_vanished_worker_is_reclaimed_once_its_lease_runs_out(celery_worker, alice):
    run, step = stranded_run(alice)
    # A worker claimed it, beat its lease until 2 s from now, then vanished.
    Step.objects.filter(pk=step.pk).update(
        status=Step.RUNNING,
        attempt=1,
        started_at=timezone.now(),
        lease_until=timezone.now() + timedelta(seconds=2),
    )

    took, sweeps = sweep_like_beat(run, timeout_s=60)

    assert sweeps[0]["requeued"] == 0, "a step whose lease is still alive was taken over"
    assert run.status == Run.SUCCEEDED, run.error
    assert took <= 2 + SWEEP_EVERY_S + EXECUTION_MARGIN_S
    step.refresh_from_db()
    assert step.status == Step.SUCCEEDED and step.attempt == 2
    assert UsageRecord.objects.filter(step=step).count() == 1


def test_pending_step_whose_message_was_lost_is_rung_again_once_stale(celery_worker, alice):
    run, step = stranded_run(alice)
    # Created long enough ago that it turns stale in 2 s: until then its doorbell may still
    # be on its way, and ringing again would only queue a duplicate.
    Step.objects.filter(pk=step.pk).update(
        created_at=timezone.now() - timedelta(seconds=PENDING_STALE_S - 2)
    )

    took, sweeps = sweep_like_beat(run, timeout_s=60)

    assert sweeps[0]["requeued"] == 0, "a fresh pending step was rung twice"
    assert run.status == Run.SUCCEEDED, run.error
    assert took <= 2 + SWEEP_EVERY_S + EXECUTION_MARGIN_S
    step.refresh_from_db()
    assert step.status == Step.SUCCEEDED and step.attempt == 1


def test_step_that_lost_its_worker_ten_times_fails_the_run_with_the_reason(transactional_db, alice):
    run, step = stranded_run(alice)
    Step.objects.filter(pk=step.pk).update(
        status=Step.RUNNING, attempt=10, lease_until=timezone.now() - timedelta(seconds=1)
    )

    result = engine.sweep_stuck_steps()

    assert result["failed"] == 1 and result["requeued"] == 0
    run.refresh_from_db()
    step.refresh_from_db()
    assert run.status == Run.FAILED and "worker lost 10 times" in run.error
    assert step.status == Step.FAILED and step.error_kind == "transient"


def test_sigkilled_worker_whose_message_is_gone_is_recovered_by_the_sweeper(
    celery_worker, alice, fake_llm
):
    """The whole path: a worker dies mid-LLM-call and Redis forgets its unacked message (a
    Redis restart does that), so only the sweeper can bring the step back."""
    make_agent("writer", model=fake_llm.model(), api_base=fake_llm.base_url)
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    fake_llm.fail_next({"hang": 60})
    run = engine.start_run(workflow.latest_version(), {"topic": "vanishing"}, alice)
    deadline = time.monotonic() + 30
    while fake_llm.request_count < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_llm.request_count == 1, "the step never reached its LLM call"

    celery_worker.kill()
    broker = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    unacked = broker.keys(f"{prefix}unacked*")
    assert unacked, "the killed worker's message should be held as unacked"
    broker.delete(*unacked)
    fake_llm.reset()  # the next call answers at once
    celery_worker.start()  # a replacement worker, which knows nothing of the lost step

    took, _ = sweep_like_beat(run, timeout_s=90)

    assert run.status == Run.SUCCEEDED, run.error
    # The lease ran out at most BATON_STEP_LEASE_S after the kill; the next sweep rang.
    assert took <= settings.BATON_STEP_LEASE_S + SWEEP_EVERY_S + EXECUTION_MARGIN_S
    step = run.steps.get()
    assert step.attempt == 2 and step.status == Step.SUCCEEDED
    assert UsageRecord.objects.filter(run=run).count() == 1
