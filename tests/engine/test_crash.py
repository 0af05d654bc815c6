"""A worker SIGKILLed mid-step: the step is redelivered, nothing is paid for or done twice."""

import time

import pytest

from runs import engine
from runs.models import Run, Step, UsageRecord
from teams.models import OutboxMessage
from tests.factories import make_agent, make_tool, make_workflow

pytestmark = pytest.mark.integration


def test_killed_worker_step_is_redelivered_and_finishes_without_repeats(
    _session_worker, worker_factory, alice, fake_llm
):
    _session_worker.stop()  # only the worker we kill may take the step
    publish = make_tool(
        "publish_report",
        entrypoint="baton.publish_report",
        side_effect=True,
        args_schema={
            "type": "object",
            "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
            "required": ["title", "body"],
        },
    )
    make_agent("publisher", model=fake_llm.model(), api_base=fake_llm.base_url, tools=[publish])
    workflow = make_workflow(
        {
            "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}}},
            "nodes": [
                {
                    "id": "publish",
                    "kind": "agent",
                    "agent": "publisher",
                    "prompt": "Publish a report on {topic}",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    doomed = worker_factory("doomed")
    # Call 1 asks for the tool (fast); call 2, the final answer, hangs until we kill the worker.
    fake_llm.fail_next({}, {"hang": 20})
    run = engine.start_run(workflow.latest_version(), {"topic": "crashes"}, alice)
    deadline = time.monotonic() + 30
    while fake_llm.request_count < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_llm.request_count == 2
    assert OutboxMessage.objects.count() == 1  # the side effect happened before the crash
    doomed.kill()
    fake_llm.reset()

    worker_factory("rescuer")
    run = engine.wait_for(run, timeout_s=90)

    assert run.status == Run.SUCCEEDED, run.error
    step = run.steps.get()
    assert step.attempt == 2 and step.status == Step.SUCCEEDED
    assert OutboxMessage.objects.count() == 1, "the side-effect tool ran twice"
    assert UsageRecord.objects.filter(run=run).count() == 2
    # After the crash only the unfinished call was made again: the first was replayed.
    assert fake_llm.request_count == 1
