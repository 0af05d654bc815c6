"""Transient, semantic and permanent failures, fallbacks and the tool circuit breaker."""

import pytest

from runs import engine
from runs.models import Run, Step, ToolHealth
from tests.factories import make_agent, make_tool, make_workflow

pytestmark = pytest.mark.integration

TOPIC = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}


def one_agent_workflow(owner, node_extra=None, edges=(), extra_nodes=(), slug="wf"):
    node = {
        "id": "ask",
        "kind": "agent",
        "agent": "asker",
        "prompt": "About {topic}",
        **(node_extra or {}),
    }
    return make_workflow(
        {"input_schema": TOPIC, "nodes": [node, *extra_nodes], "edges": list(edges)},
        owner=owner,
        slug=slug,
    )


def fake_agent(fake_llm, **fields):
    return make_agent("asker", model=fake_llm.model(), api_base=fake_llm.base_url, **fields)


def finish(workflow, user=None):
    run = engine.start_run(workflow.latest_version(), {"topic": "agents"}, user)
    return engine.wait_for(run, timeout_s=60)


def test_transient_errors_are_retried_and_every_attempt_is_recorded(celery_worker, alice, fake_llm):
    fake_agent(fake_llm)
    fake_llm.fail_next({"status": 429, "message": "slow down"}, {"status": 500})
    run = finish(one_agent_workflow(alice))
    assert run.status == Run.SUCCEEDED, run.error
    step = run.steps.get()
    assert [a["error_kind"] for a in step.attempts] == ["transient", "transient"]
    assert "slow down" in step.attempts[0]["error"]
    assert step.attempt == 3 and fake_llm.request_count == 3


def test_retries_are_bounded_per_agent_then_the_run_fails_with_the_reason(
    celery_worker, alice, fake_llm
):
    fake_agent(fake_llm, max_retries=1)
    fake_llm.fail_next({"status": 503}, {"status": 503}, {"status": 503})
    run = finish(one_agent_workflow(alice))
    assert run.status == Run.FAILED
    step = run.steps.get()
    assert step.error_kind == "transient" and "gave up after 2 attempts" in step.error
    assert fake_llm.request_count == 2


def test_fallback_model_is_tried_when_the_main_model_keeps_failing(celery_worker, alice, fake_llm):
    fake_agent(fake_llm, max_retries=0, fallback_models=["openai/backup-model"])
    fake_llm.fail_next({"status": 503})
    run = finish(one_agent_workflow(alice))
    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.get().model == "openai/backup-model"
    assert fake_llm.requests[-1]["model"] == "backup-model"


def test_permanent_error_fails_the_run_with_the_providers_message(celery_worker, alice, fake_llm):
    fake_agent(fake_llm)
    fake_llm.fail_next({"status": 401, "message": "Incorrect API key provided"})
    run = finish(one_agent_workflow(alice))
    assert run.status == Run.FAILED
    assert "Incorrect API key provided" in run.error
    assert run.steps.get().error_kind == "permanent"
    assert fake_llm.request_count == 1


SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}


def test_output_failing_its_schema_gets_one_repair_prompt(celery_worker, alice, fake_llm):
    fake_agent(fake_llm)
    fake_llm.reply_next({"content": "I think the score is high"})
    run = finish(one_agent_workflow(alice, {"output_schema": SCHEMA}))
    assert run.status == Run.SUCCEEDED, run.error
    assert isinstance(run.result["score"], int)
    repair = fake_llm.requests[1]["messages"][-1]["content"]
    assert "not usable" in repair and "JSON" in repair


def test_semantic_failure_after_repair_takes_the_failure_edge(celery_worker, alice, fake_llm):
    fake_agent(fake_llm)
    make_tool("calculator")
    fake_llm.reply_next({"content": "nope"}, {"content": "still nope"})
    fallback = {
        "id": "fallback",
        "kind": "tool",
        "tool": "calculator",
        "args": {"expression": "1+1"},
    }
    run = finish(
        one_agent_workflow(
            alice,
            {"output_schema": SCHEMA},
            extra_nodes=[fallback],
            edges=[{"source": "ask", "target": "fallback", "on": "failure"}],
        )
    )
    assert run.status == Run.SUCCEEDED, run.error
    ask = run.steps.get(node_id="ask")
    assert ask.status == Step.FAILED and ask.error_kind == "semantic"
    assert run.result["result"] == 2


def test_semantic_failure_without_edge_or_escalation_fails_the_run(celery_worker, alice, fake_llm):
    fake_agent(fake_llm)
    fake_llm.reply_next({"content": ""}, {"content": ""})
    run = finish(one_agent_workflow(alice, {"escalate": False}))
    assert run.status == Run.FAILED
    assert "empty" in run.error


def test_a_tool_that_keeps_failing_trips_its_circuit_breaker(celery_worker, alice, settings):
    make_tool(
        "flaky",
        entrypoint="baton.flaky",
        args_schema={"type": "object", "properties": {"fail": {"type": "boolean"}}},
    )
    workflow = make_workflow(
        {
            "input_schema": {"type": "object"},
            "nodes": [{"id": "call", "kind": "tool", "tool": "flaky", "args": {"fail": True}}],
            "edges": [],
        },
        owner=alice,
    )
    errors = []
    for _ in range(settings.BATON_TOOL_BREAKER_FAILURES + 1):
        run = engine.wait_for(engine.start_run(workflow.latest_version(), {}, alice))
        errors.append(run.error)
    assert all("flaky tool failed on purpose" in e for e in errors[:-1])
    assert "circuit open" in errors[-1]
    assert ToolHealth.objects.get(tool="flaky").open_until is not None
