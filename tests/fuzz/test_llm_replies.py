"""Whatever an LLM answers (garbage text, JSON with NaN, tool calls with any name and any
arguments), the step it belongs to ends succeeded, failed with a reason, or queued for a
retry: never an exception out of the engine, never a step left running.

The step runs in this process (engine.execute_step, as the Celery task does) against the fake
OpenAI-compatible server, whose next reply is the generated one.
"""

import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runs import engine, events
from runs.models import Run, Step
from tests.factories import make_agent, make_tool, make_workflow
from tests.fuzz import FUZZ, TEXT, json_values
from tests.fuzz.test_tools import ARGUMENTS, SCHEMAS

pytestmark = pytest.mark.django_db(transaction=True)

SPECIAL_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 2**80])
WEIRD_JSON = st.recursive(
    st.one_of(json_values(4), SPECIAL_NUMBERS),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
CONTENT = st.one_of(
    TEXT,
    WEIRD_JSON.map(json.dumps),
    WEIRD_JSON.map(lambda v: f"Here you go:\n```json\n{json.dumps(v)}\n```"),
    st.integers(1000, 2500).map(lambda n: "[" * n + "]" * n),
    st.just("<script>window.__xss=1</script>"),
)
TOOL_CALLS = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.one_of(st.sampled_from([*SCHEMAS, "unknown_tool", ""]), TEXT),
            "arguments": st.one_of(
                ARGUMENTS,
                WEIRD_JSON,
                st.dictionaries(st.sampled_from(["expression", "text"]), SPECIAL_NUMBERS),
            ),
        }
    ),
    max_size=2,
)
REPLIES = st.one_of(
    st.fixed_dictionaries({"content": CONTENT}),
    st.fixed_dictionaries({"content": st.one_of(st.just(""), CONTENT), "tool_calls": TOOL_CALLS}),
)


@pytest.fixture(autouse=True)
def _events_sent():
    """Events are published from a background thread: let it finish before the database goes."""
    yield
    events.flush()


@pytest.fixture
def agent_workflows(alice, fake_llm):
    tools = [
        make_tool(name, entrypoint=f"baton.{name}", args_schema=schema)
        for name, schema in SCHEMAS.items()
        if name != "flaky"
    ]
    make_agent(
        "replier",
        model=fake_llm.model(),
        api_base=fake_llm.base_url,
        tools=tools,
        max_retries=1,
        max_tool_rounds=2,
    )
    node = {
        "id": "answer",
        "kind": "agent",
        "agent": "replier",
        "prompt": "Answer",
        "escalate": False,
    }
    return {
        "free": make_workflow({"nodes": [node], "edges": []}, owner=alice, slug="free"),
        "json": make_workflow(
            {"nodes": [{**node, "output_schema": {"type": "object"}}], "edges": []},
            owner=alice,
            slug="json",
        ),
    }


@settings(FUZZ, max_examples=15)
@given(reply=REPLIES, shape=st.sampled_from(["free", "json"]))
# Found by this test; kept so that every run tries them.
@example(reply={"content": '{"score": NaN}'}, shape="json")
@example(reply={"content": '{"score": 1e999}'}, shape="json")
@example(reply={"content": "[" * 2000 + "]" * 2000}, shape="json")
@example(
    reply={
        "content": "",
        "tool_calls": [{"name": "calculator", "arguments": {"expression": math.nan}}],
    },
    shape="free",
)
@example(
    reply={
        "content": "",
        "tool_calls": [{"name": "calculator", "arguments": {"expression": "1e308 * 10"}}],
    },
    shape="free",
)
def test_any_llm_reply_ends_the_step_with_a_result_or_a_reason(
    agent_workflows, fake_llm, alice, reply, shape
):
    workflow = agent_workflows[shape]
    run = Run.objects.create(
        workflow=workflow,
        version=workflow.latest_version(),
        started_by=alice,
        status=Run.RUNNING,
        budget=workflow.run_budget(),
    )
    step = Step.objects.create(run=run, node_id="answer", kind="agent")
    fake_llm.reset()
    fake_llm.reply_next(reply)

    engine.execute_step(step.pk)

    step.refresh_from_db()
    assert step.status in (Step.SUCCEEDED, Step.FAILED, Step.PENDING), step.status
    if step.status == Step.FAILED:
        # The agent's reason, not a database error about the JSON it could not store.
        assert step.error and "IntegrityError" not in step.error and "DataError" not in step.error
    if step.status == Step.PENDING:  # a transient failure: retried later, with its reason
        assert step.attempts and step.attempts[-1]["error"]
