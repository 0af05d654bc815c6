"""Prices: the one in force at a call's time, cached tokens at the cached rate, repricing."""

import io
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from django.core.management import call_command

from runs import pricing
from runs.models import ModelPrice, Run, UsageRecord
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db

MODEL = "openai/gpt-4o-mini"


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2025, 3, day, hour, tzinfo=UTC)


def price(
    model: str = MODEL,
    day: int = 1,
    input_: str = "1",
    output: str = "4",
    cached: str = "0.5",
    **fields,
) -> ModelPrice:
    return ModelPrice.objects.create(
        model=model,
        effective_from=at(day, 0),
        input_per_1m=Decimal(input_),
        output_per_1m=Decimal(output),
        cached_input_per_1m=Decimal(cached),
        **fields,
    )


@pytest.fixture
def run(alice) -> Run:
    make_agent("researcher")
    workflow = make_workflow(pipeline_spec("researcher"), owner=alice)
    return Run.objects.create(
        workflow=workflow, version=workflow.latest_version(), started_by=alice
    )


def usage(
    run: Run,
    when: datetime,
    model: str = MODEL,
    prompt: int = 1_000_000,
    completion: int = 1_000_000,
    cached: int = 0,
) -> UsageRecord:
    return UsageRecord.objects.create(
        run=run,
        workflow=run.workflow,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        total_tokens=prompt + completion,
        cost=Decimal("999"),
        price_source="stale",
        at=when,
    )


def test_cached_prompt_tokens_are_priced_at_the_cached_rate():
    row = price(input_="2", output="8", cached="0.5")

    cost, used, source = pricing.compute_cost(MODEL, 1_000_000, 500_000, 600_000, at(5))

    # 400k uncached at $2/M + 600k cached at $0.5/M + 500k out at $8/M
    assert cost == Decimal("0.8") + Decimal("0.3") + Decimal("4")
    assert (used, source) == (row, "price-table")


def test_a_price_change_applies_from_its_date_on():
    old = price(day=1, input_="1", output="1")
    new = price(day=10, input_="3", output="3")

    before = pricing.compute_cost(MODEL, 1_000_000, 0, 0, at(9, 23))
    on_the_day = pricing.compute_cost(MODEL, 1_000_000, 0, 0, at(10, 0))

    assert before[:2] == (Decimal("1"), old)
    assert on_the_day[:2] == (Decimal("3"), new)


def test_price_for_is_one_query_and_ignores_future_prices(django_assert_num_queries):
    current = price(day=1)
    price(day=20)

    with django_assert_num_queries(1):
        assert pricing.price_for(MODEL, at(15)) == current
    assert pricing.price_for(MODEL, datetime(2024, 1, 1, tzinfo=UTC)) is None


def test_without_a_price_row_litellms_map_prices_the_call():
    cost, used, source = pricing.compute_cost(MODEL, 1_000_000, 1_000_000, 400_000, at(1))

    # gpt-4o-mini in LiteLLM's map: $0.15 in, $0.60 out, $0.075 cached per 1M
    assert cost == Decimal("0.09") + Decimal("0.03") + Decimal("0.6")
    assert (used, source) == (None, "litellm-map")


def test_an_unknown_model_is_unpriced_at_zero():
    assert pricing.compute_cost("acme/secret-model", 5000, 5000, 0, at(1)) == (
        Decimal(0),
        None,
        "unpriced",
    )


def test_cost_of_a_fake_server_call_uses_the_price_table(fake_llm):
    from runs import llm

    price(input_="2", output="10", cached="1")
    fake_llm.set_usage(prompt_tokens=3000, completion_tokens=700, cached_tokens=1000)
    result = llm.complete(
        fake_llm.model(),
        [{"role": "user", "content": "Research tides"}],
        api_base=fake_llm.base_url,
        api_key="sk-fake",
    )

    cost, _, source = pricing.compute_cost(
        result.model, result.prompt_tokens, result.completion_tokens, result.cached_tokens, at(2)
    )

    assert cost == (2000 * 2 + 1000 * 1 + 700 * 10) / Decimal(1_000_000)
    assert source == "price-table"


def test_recompute_usage_reprices_records_in_the_range_only(run):
    first = price(day=1, input_="1", output="2", cached="0.5")
    second = price(day=10, input_="3", output="6", cached="1")
    before_first_price = usage(run, datetime(2025, 2, 27, tzinfo=UTC), cached=500_000)
    in_first = usage(run, at(5), cached=500_000)
    in_second = usage(run, at(12))
    last_day = usage(run, at(14, 23))
    after = usage(run, at(15, 1))

    count = pricing.recompute_usage(date(2025, 2, 27), date(2025, 3, 14))

    assert count == 4
    for record in (before_first_price, in_first, in_second, last_day, after):
        record.refresh_from_db()
    # Before any row: LiteLLM's map (0.15 in, 0.075 cached, 0.60 out per 1M).
    assert before_first_price.cost == Decimal("0.075") + Decimal("0.0375") + Decimal("0.6")
    assert (before_first_price.price, before_first_price.price_source) == (None, "litellm-map")
    assert in_first.cost == Decimal("0.5") + Decimal("0.25") + Decimal("2")
    assert (in_first.price, in_first.price_source) == (first, "price-table")
    assert in_second.cost == Decimal("9")
    assert last_day.cost == Decimal("9")
    assert (last_day.price, last_day.price_source) == (second, "price-table")
    assert (after.cost, after.price_source) == (Decimal("999"), "stale")


def test_recompute_usage_can_be_limited_to_one_model(run):
    price(day=1, input_="1", output="1")
    price(model="acme/other", day=1, input_="5", output="5")
    mine = usage(run, at(5), prompt=1_000_000, completion=0)
    other = usage(run, at(5), model="acme/other", prompt=1_000_000, completion=0)
    unknown = usage(run, at(5), model="acme/unknown", prompt=1_000_000, completion=0)

    assert pricing.recompute_usage(at(1, 0), at(20, 0), model="acme/other") == 1
    assert pricing.recompute_usage(at(1, 0), at(20, 0), model="acme/unknown") == 1

    for record in (mine, other, unknown):
        record.refresh_from_db()
    assert mine.cost == Decimal("999")
    assert other.cost == Decimal("5")
    assert (unknown.cost, unknown.price_source) == (Decimal(0), "unpriced")


def test_seed_prices_covers_models_in_use_and_is_idempotent():
    make_agent("cloud", model=MODEL, fallback_models=["anthropic/claude-haiku-4-5"])
    make_agent("local", model="openai/llama-3-8b", api_base="http://localhost:8000/v1")
    make_agent("ollama", model="ollama/llama3")
    make_agent("mystery", model="acme/secret-model")
    make_agent("priced", model="openai/gpt-4o")
    kept = price(model="openai/gpt-4o", day=1, input_="9", output="9", cached="9")

    first_output, second_output = io.StringIO(), io.StringIO()
    call_command("seed_prices", stdout=first_output)
    seeded = {p.model: p for p in ModelPrice.objects.all()}
    call_command("seed_prices", stdout=second_output)

    assert ModelPrice.objects.count() == len(seeded) == 6
    rates = {
        model: (p.input_per_1m, p.output_per_1m, p.cached_input_per_1m)
        for model, p in seeded.items()
    }
    assert rates[MODEL] == (Decimal("0.15"), Decimal("0.6"), Decimal("0.075"))
    assert rates["anthropic/claude-haiku-4-5"] == (Decimal("1"), Decimal("5"), Decimal("0.1"))
    assert rates["scripted/baton"] == (Decimal("0.5"), Decimal("1.5"), Decimal("0.25"))
    assert rates["openai/llama-3-8b"] == rates["ollama/llama3"] == (0, 0, 0)
    assert "acme/secret-model" not in rates
    assert seeded["openai/gpt-4o"] == kept and rates["openai/gpt-4o"][0] == Decimal("9")
    assert seeded[MODEL].effective_from == datetime(2024, 1, 1, tzinfo=UTC)
    assert seeded[MODEL].source == "litellm"
    assert "no known price for acme/secret-model" in first_output.getvalue()
    assert "0 created, 6 already priced, 1 without a known price" in second_output.getvalue()
