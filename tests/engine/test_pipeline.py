import pytest

from runs import engine
from runs.models import Run, RunEvent, Step, UsageRecord
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.integration


def test_pipeline_runs_every_step_on_a_real_worker(celery_worker, alice):
    for name in ("researcher", "analyst", "writer"):
        make_agent(name)
    workflow = make_workflow(pipeline_spec("researcher", "analyst", "writer"), owner=alice)
    run = engine.start_run(workflow.latest_version(), {"topic": "durable agents"}, alice)

    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    steps = list(run.steps.order_by("created_at"))
    assert [s.node_id for s in steps] == ["researcher", "analyst", "writer"]
    assert all(s.status == Step.SUCCEEDED and s.output_text for s in steps)
    assert run.cost > 0 and run.total_tokens > 0
    assert UsageRecord.objects.filter(run=run).count() == 3
    assert "durable agents" in steps[0].input["messages"][1]["content"]
    seqs = list(RunEvent.objects.filter(run=run).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert run.result == steps[-1].output
