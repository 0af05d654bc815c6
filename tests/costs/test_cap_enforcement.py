"""Spend caps enforced by the engine, on a real Celery worker with the scripted provider."""

from decimal import Decimal as D

import pytest

from runs import costs, engine
from runs.models import Run, UsageRecord
from tests.costs.usage import make_usage
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.integration


def test_run_stops_before_a_call_that_would_break_the_daily_cap(celery_worker, alice):
    writer = make_agent("writer")
    workflow = make_workflow(
        pipeline_spec("writer", "editor"), owner=alice, slug="capped", daily_cost_cap=D("5.00")
    )
    make_agent("editor")
    earlier = engine.start_run(workflow.latest_version(), {"topic": "caps"}, alice)
    earlier = engine.wait_for(earlier, timeout_s=60)
    assert earlier.status == Run.SUCCEEDED, earlier.error
    # Today's spend so far leaves less headroom than one more call is estimated to cost.
    make_usage(earlier, writer, str(D("5.00") - earlier.cost - D("0.00000001")))

    run = engine.start_run(workflow.latest_version(), {"topic": "caps"}, alice)
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.BUDGET_EXCEEDED
    assert run.error.startswith(
        "workflow capped daily cap $5.00 would be exceeded: $5.00 spent today + $"
    )
    assert not UsageRecord.objects.filter(run=run).exists()
    assert costs.cap_breach(workflow, D(0)) is None  # the refused call reserved nothing
