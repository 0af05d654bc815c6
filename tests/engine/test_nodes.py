"""Every node kind, end to end on a real Celery worker with the scripted provider."""

import pytest

from runs import engine
from runs.models import Run, Step, ToolCall
from teams.models import OutboxMessage
from tests.factories import make_agent, make_role, make_tool, make_workflow

pytestmark = pytest.mark.integration

TOPIC_SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}},
    "required": ["topic"],
}


def run_to_end(workflow, data=None, user=None, timeout_s=60):
    run = engine.start_run(workflow.latest_version(), data or {"topic": "agents"}, user)
    return engine.wait_for(run, timeout_s=timeout_s)


def steps_of(run):
    return {(s.node_id, s.iteration): s for s in run.steps.all()}


def test_agent_node_validates_json_output_against_its_schema(celery_worker, alice):
    make_agent("extractor")
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["title", "score"],
    }
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "extract",
                    "kind": "agent",
                    "agent": "extractor",
                    "prompt": "Extract facts about {topic}",
                    "output_schema": schema,
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    output = run.steps.get().output
    assert isinstance(output["title"], str) and isinstance(output["score"], int)
    assert run.state["extract"] == output
    system = run.steps.get().input["messages"][0]["content"]
    assert "extractor role" in system and "Respond with JSON matching this schema" in system


def test_agent_calls_its_tools_and_records_each_call(celery_worker, alice):
    calculator = make_tool("calculator")
    make_agent("mathematician", tools=[calculator])
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "solve",
                    "kind": "agent",
                    "agent": "mathematician",
                    "prompt": "Compute {topic}",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    step = run.steps.get()
    assert step.tool_calls[0]["tool"] == "calculator"
    assert step.tool_calls[0]["result"]["result"] == 42
    call = ToolCall.objects.get(step=step)
    assert call.idempotency_key == f"run{run.pk}-step{step.pk}-e0-call0"
    assert step.usage.count() == 2  # the call that asked for the tool, then the answer


def test_tool_node_calls_a_registered_tool_with_templated_arguments(celery_worker, alice):
    make_tool(
        "word_count",
        entrypoint="baton.word_count",
        args_schema={"type": "object", "properties": {"text": {"type": "string"}}},
    )
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {"id": "count", "kind": "tool", "tool": "word_count", "args": {"text": "{topic}"}}
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow, {"topic": "one two three"})
    assert run.status == Run.SUCCEEDED, run.error
    assert run.result == {"words": 3, "characters": 13}


def _router_workflow(owner, llm_agent=None):
    router = {"id": "route", "kind": "router"}
    if llm_agent:
        router["agent"] = llm_agent
    return make_workflow(
        {
            "input_schema": {"type": "object", "properties": {"size": {"type": "integer"}}},
            "nodes": [
                router,
                {"id": "big", "kind": "tool", "tool": "calculator", "args": {"expression": "1"}},
                {"id": "small", "kind": "tool", "tool": "calculator", "args": {"expression": "2"}},
            ],
            "edges": [
                {
                    "source": "route",
                    "target": "big",
                    "label": "big",
                    "condition": {"path": "size", "op": "gt", "value": 10},
                },
                {"source": "route", "target": "small", "label": "small", "default": True},
            ],
        },
        owner=owner,
        slug=f"router-{llm_agent or 'rule'}",
    )


def test_router_rule_picks_the_matching_edge_else_the_default(celery_worker, alice):
    make_tool("calculator")
    workflow = _router_workflow(alice)
    big = run_to_end(workflow, {"size": 50})
    small = run_to_end(workflow, {"size": 5})
    assert {s.node_id for s in big.steps.all()} == {"route", "big"}
    assert {s.node_id for s in small.steps.all()} == {"route", "small"}
    assert big.status == small.status == Run.SUCCEEDED


def test_router_llm_classification_picks_one_labelled_edge(celery_worker, alice):
    make_tool("calculator")
    make_agent("classifier")
    run = run_to_end(_router_workflow(alice, llm_agent="classifier"), {"size": 1})
    assert run.status == Run.SUCCEEDED, run.error
    route = run.steps.get(node_id="route")
    assert route.output["route"] in ("big", "small")
    assert {s.node_id for s in run.steps.all()} == {"route", route.output["target"]}
    assert (
        "CHOOSE ONE OF: big | small" in route.input["messages"][-1]["content"]
        or route.usage.count() == 1
    )


def _fanout_spec(policy="fail", failing=False, timeout=None):
    parallel = {"id": "fan", "kind": "parallel"}
    if timeout:
        parallel["branch_timeout_s"] = timeout
    branches = [
        {
            "id": f"a{i}",
            "kind": "agent",
            "agent": f"analyst{i}",
            "prompt": "Angle {i} on {topic}".replace("{i}", str(i)),
        }
        for i in range(3)
    ]
    if failing:
        branches[1]["prompt"] = "SCRIPTED_FAIL: permanent"
        branches[1]["kind"] = "tool"
        branches[1]["tool"] = "flaky"
        branches[1]["args"] = {"fail": True}
        del branches[1]["agent"]
    return {
        "input_schema": TOPIC_SCHEMA,
        "nodes": [
            parallel,
            *branches,
            {"id": "join", "kind": "join", "on_branch_failure": policy},
            {"id": "synth", "kind": "agent", "agent": "synthesiser", "prompt": "Combine {join}"},
        ],
        "edges": [
            *({"source": "fan", "target": f"a{i}"} for i in range(3)),
            *({"source": f"a{i}", "target": "join"} for i in range(3)),
            {"source": "join", "target": "synth"},
        ],
    }


def _fanout_agents(fake_llm=None):
    extra = {"model": fake_llm.model(), "api_base": fake_llm.base_url} if fake_llm else {}
    for i in range(3):
        make_agent(f"analyst{i}", **extra)
    make_agent("synthesiser", **extra)


def test_parallel_branches_run_at_the_same_time_and_join_waits_for_all(
    celery_worker, alice, fake_llm
):
    fake_llm.latency_ms = 700
    _fanout_agents(fake_llm)
    run = run_to_end(make_workflow(_fanout_spec(), owner=alice))
    assert run.status == Run.SUCCEEDED, run.error
    branches = [run.steps.get(node_id=f"a{i}") for i in range(3)]
    latest_start = max(s.started_at for s in branches)
    earliest_end = min(s.finished_at for s in branches)
    assert latest_start < earliest_end, "branches did not overlap in time"
    join = run.steps.get(node_id="join")
    assert join.started_at >= max(s.finished_at for s in branches)
    assert set(join.output["branches"]) == {"a0", "a1", "a2"}
    assert run.steps.get(node_id="synth").status == Step.SUCCEEDED


def test_join_fails_the_run_when_a_branch_fails_under_the_fail_policy(celery_worker, alice):
    _fanout_agents()
    make_tool(
        "flaky",
        entrypoint="baton.flaky",
        args_schema={"type": "object", "properties": {"fail": {"type": "boolean"}}},
    )
    run = run_to_end(make_workflow(_fanout_spec(policy="fail", failing=True), owner=alice))
    assert run.status == Run.FAILED
    assert "a1" in run.error


def test_join_continues_without_a_failed_branch_under_the_continue_policy(celery_worker, alice):
    _fanout_agents()
    make_tool(
        "flaky",
        entrypoint="baton.flaky",
        args_schema={"type": "object", "properties": {"fail": {"type": "boolean"}}},
    )
    run = run_to_end(make_workflow(_fanout_spec(policy="continue", failing=True), owner=alice))
    assert run.status == Run.SUCCEEDED, run.error
    join = run.steps.get(node_id="join")
    assert join.output["failed"] == ["a1"]
    assert join.output["branches"]["a0"]["status"] == "succeeded"


def test_branch_past_its_timeout_is_cut_off_by_the_sweeper(celery_worker, alice, fake_llm):
    _fanout_agents(fake_llm)
    workflow = make_workflow(_fanout_spec(policy="continue", timeout=1), owner=alice)
    fake_llm.fail_next({}, {"hang": 30})  # the second branch's call hangs
    run = engine.start_run(workflow.latest_version(), {"topic": "agents"}, alice)
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine.sweep_stuck_steps()
        run.refresh_from_db()
        if run.status in Run.TERMINAL:
            break
        time.sleep(0.5)
    fake_llm.reset()
    assert run.status == Run.SUCCEEDED, run.error
    join = run.steps.get(node_id="join")
    assert "timeout" in [b["status"] for b in join.output["branches"].values()]


def test_loop_edge_is_followed_at_most_its_bound(celery_worker, alice):
    make_tool("calculator")
    workflow = make_workflow(
        {
            "input_schema": {"type": "object"},
            "nodes": [
                {"id": "work", "kind": "tool", "tool": "calculator", "args": {"expression": "1+1"}},
                {"id": "done", "kind": "tool", "tool": "calculator", "args": {"expression": "3"}},
            ],
            "edges": [
                {"source": "work", "target": "work", "max_iterations": 3},
                {
                    "source": "work",
                    "target": "done",
                    "condition": {"path": "work.result", "op": "eq", "value": 2},
                },
            ],
        },
        owner=alice,
    )
    run = run_to_end(workflow, {})
    assert run.status == Run.SUCCEEDED, run.error
    iterations = sorted(run.steps.filter(node_id="work").values_list("iteration", flat=True))
    assert iterations == [0, 1, 2, 3]
    assert run.edge_counts == {"work->work": 3}


def test_supervisor_picks_workers_by_name_until_finish(celery_worker, alice):
    make_agent("boss")
    make_agent("coder")
    make_agent("tester")
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "team",
                    "kind": "supervisor",
                    "agent": "boss",
                    "workers": ["coder", "tester"],
                    "max_turns": 5,
                    "prompt": "Build {topic}",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    output = run.steps.get().output
    assert [t["worker"] for t in output["transcript"]] == ["coder", "tester"]
    assert output["result"] == output["transcript"][-1]["output"]


def test_supervisor_turns_are_bounded(celery_worker, alice):
    make_agent("boss")
    make_agent("coder")
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "team",
                    "kind": "supervisor",
                    "agent": "boss",
                    "workers": ["coder"],
                    "max_turns": 1,
                    "prompt": "Build {topic}",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.steps.get().output["turns"] == 1


def test_vote_collects_answers_and_a_judge_picks_recording_disagreement(celery_worker, alice):
    make_agent("optimist", role=make_role("Researcher", goal="Find facts"))
    make_agent("pessimist", role=make_role("Analyst", goal="Weigh the risks"))
    make_agent("judge")
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "vote",
                    "kind": "vote",
                    "agents": ["optimist", "pessimist"],
                    "judge": "judge",
                    "mode": "pick",
                    "prompt": "Should we adopt {topic}?",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    output = run.steps.get().output
    assert [a["agent"] for a in output["answers"]] == ["optimist", "pessimist"]
    assert output["picked"] in ("Answer 1", "Answer 2")
    assert output["distinct_answers"] == 2 and output["agreement"] is False
    assert run.result == output["result"]


def test_debate_runs_rounds_until_agreement_then_a_judge_decides(celery_worker, alice):
    for name in ("pro", "con", "chair"):
        make_agent(name)
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "debate",
                    "kind": "debate",
                    "agents": ["pro", "con"],
                    "judge": "chair",
                    "max_rounds": 4,
                    "prompt": "Is {topic} worth it?",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    output = run.steps.get().output
    assert output["agreed"] is True and output["rounds"] == 2
    assert all(t["text"].startswith("AGREE") for t in output["transcript"][-1])


def test_debate_summarises_older_rounds_past_its_token_limit(celery_worker, alice):
    for name in ("pro", "con", "chair"):
        make_agent(name)
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "debate",
                    "kind": "debate",
                    "agents": ["pro", "con"],
                    "judge": "chair",
                    "max_rounds": 3,
                    "summarise_after_tokens": 50,
                    "prompt": "Is {topic} worth it?",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    output = run.steps.get().output
    assert output["summary"], "older rounds were not summarised"
    assert len(output["transcript"]) == 1


def test_subworkflow_runs_a_child_run_and_returns_its_result(celery_worker, alice):
    make_tool(
        "word_count",
        entrypoint="baton.word_count",
        args_schema={"type": "object", "properties": {"text": {"type": "string"}}},
    )
    make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {"id": "count", "kind": "tool", "tool": "word_count", "args": {"text": "{topic}"}}
            ],
            "edges": [],
        },
        owner=alice,
        slug="child",
    )
    parent = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "delegate",
                    "kind": "subworkflow",
                    "workflow": "child",
                    "input": {"topic": "{topic} and more"},
                }
            ],
            "edges": [],
        },
        owner=alice,
        slug="parent",
    )
    run = run_to_end(parent, {"topic": "two words"})
    assert run.status == Run.SUCCEEDED, run.error
    child = Run.objects.get(parent=run)
    assert child.status == Run.SUCCEEDED and child.input == {"topic": "two words and more"}
    assert run.result == {"words": 4, "characters": 18}
    assert child.parent_step == run.steps.get()


def test_permanent_provider_error_fails_the_run_with_its_message(celery_worker, alice):
    make_agent("researcher")
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "r",
                    "kind": "agent",
                    "agent": "researcher",
                    "prompt": "SCRIPTED_FAIL: permanent",
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.FAILED
    step = run.steps.get()
    assert step.error_kind == "permanent" and "r:" in run.error


def test_side_effect_tool_node_runs_once(celery_worker, alice):
    make_tool(
        "publish_report",
        entrypoint="baton.publish_report",
        side_effect=True,
        args_schema={"type": "object", "properties": {"title": {"type": "string"}}},
    )
    workflow = make_workflow(
        {
            "input_schema": TOPIC_SCHEMA,
            "nodes": [
                {
                    "id": "publish",
                    "kind": "tool",
                    "tool": "publish_report",
                    "args": {"title": "On {topic}"},
                }
            ],
            "edges": [],
        },
        owner=alice,
    )
    run = run_to_end(workflow)
    assert run.status == Run.SUCCEEDED, run.error
    assert OutboxMessage.objects.get().payload["title"] == "On agents"
