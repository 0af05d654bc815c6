"""What a step looks up by name (its agent with role and tools, the model's prices) is kept per
process under the lookup token its claim read, and any edit to those replaces the token, so
the next step sees the edit (runs/models.py LookupToken)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs import engine, nodes, pricing
from runs.models import LookupToken, ModelPrice
from tests.factories import make_agent, make_tool, pipeline_spec, silent_run

pytestmark = pytest.mark.django_db


def claimed_token(step) -> int:
    return engine._claimed_row(step.pk).lookup_token


def test_the_claim_reads_the_token_and_lookups_under_it_need_no_query(alice):
    _, step = silent_run(pipeline_spec("writer"), alice)
    agent = make_agent("writer", tools=[make_tool("calc")])
    ModelPrice.objects.create(model="m", input_per_1m=1, effective_from=timezone.now())
    token = claimed_token(step)
    assert token == LookupToken.objects.get(name=LookupToken.LOOKUPS).value

    first = nodes.get_agent("writer", token)
    tools = nodes.tools_of(first, token)
    price = pricing.price_for("m", timezone.now(), token)
    with CaptureQueriesContext(connection) as queries:
        assert nodes.get_agent("writer", token) is first
        assert nodes.tools_of(first, token) is tools
        assert pricing.price_for("m", timezone.now(), token) is price
    assert not queries.captured_queries
    assert first.pk == agent.pk and [t.name for t in tools] == ["calc"]


@pytest.mark.parametrize(
    "edit",
    [
        "agent saved",
        "role saved",
        "tool saved",
        "tool added",
        "tool removed",
        "tool deleted",
        "price added",
    ],
)
def test_every_edit_of_what_steps_look_up_replaces_the_token(alice, edit):
    _, step = silent_run(pipeline_spec("writer"), alice)
    calc = make_tool("calc")
    agent = make_agent("writer", tools=[calc])
    before = claimed_token(step)
    kept = nodes.get_agent("writer", before)

    if edit == "agent saved":
        agent.system_prompt = "Be brief"
        agent.save()
    elif edit == "role saved":
        agent.role.goal = "A new goal"
        agent.role.save()
    elif edit == "tool saved":
        calc.description = "Adds things up"
        calc.save()
    elif edit == "tool added":
        agent.tools.add(make_tool("other"))
    elif edit == "tool removed":
        agent.tools.remove(calc)
    elif edit == "tool deleted":
        calc.delete()
    else:
        ModelPrice.objects.create(model="m", input_per_1m=2, effective_from=timezone.now())

    after = claimed_token(step)
    assert after != before
    fresh = nodes.get_agent("writer", after)
    assert fresh is not kept
    if edit == "agent saved":
        assert fresh.system_prompt == "Be brief"
    if edit == "role saved":
        assert fresh.role.goal == "A new goal"


def test_a_kept_price_list_still_picks_the_price_in_force_at_the_call(alice):
    now = timezone.now()
    ModelPrice.objects.create(model="m", input_per_1m=1, effective_from=now - timedelta(days=1))
    ModelPrice.objects.create(
        model="m", input_per_1m=Decimal("3"), effective_from=now + timedelta(days=1)
    )
    _, step = silent_run(pipeline_spec("writer"), alice)
    token = claimed_token(step)

    assert pricing.price_for("m", now, token).input_per_1m == 1
    assert pricing.price_for("m", now + timedelta(days=2), token).input_per_1m == 3
    assert pricing.price_for("m", now - timedelta(days=2), token) is None


def test_a_tool_offered_to_the_llm_carries_a_copy_of_its_schema(alice):
    tool = make_tool("calc")
    offered = tool.as_function()
    offered["function"]["parameters"]["properties"]["extra"] = {"type": "string"}

    assert "extra" not in tool.args_schema["properties"]
