"""runs/rows.py: the hand-written SELECTs of the step's hot path and of the publisher read the
same values the ORM reads (JSON, decimals, dates, on SQLite and PostgreSQL alike), and leave out
what they say."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs import engine, fragments, nodes, pricing, rows
from runs.models import ModelPrice, Run, RunEvent, Step
from tests.factories import make_agent, make_tool, pipeline_spec, silent_run

pytestmark = pytest.mark.django_db


def same_values(read: Model, expected: Model, left_out: tuple = ()) -> None:
    for field in type(expected)._meta.concrete_fields:
        if field.name in left_out:
            assert field.attname in read.get_deferred_fields()
        else:
            assert getattr(read, field.attname) == getattr(expected, field.attname), field.name


def test_a_row_reads_every_field_as_the_orm_does(alice):
    run, _ = silent_run(pipeline_spec("writer"), alice)
    Run.objects.filter(pk=run.pk).update(
        state={"notes": ["é", 1.5, None]}, cost=Decimal("0.12345678"), started_at=timezone.now()
    )
    expected = Run.objects.get(pk=run.pk)
    reader = rows.Rows([(Run, "r", ())])

    (read,) = reader.first(
        f"SELECT {reader.columns()} FROM {rows.table(Run)} r WHERE r.id = %s", [run.pk]
    )

    same_values(read, expected)
    assert isinstance(read.cost, Decimal) and read.started_at.tzinfo is not None
    assert read._state.adding is False and read._state.db == connection.alias


def test_the_claim_reads_the_step_with_its_run_workflow_and_version_in_one_query(alice):
    run, step = silent_run(pipeline_spec("writer"), alice)
    make_agent("writer")

    found = engine._claimed_row(step.pk)

    same_values(found, Step.objects.get(pk=step.pk))
    same_values(found.run, Run.objects.get(pk=run.pk))
    same_values(found.run.workflow, run.workflow, left_out=("draft", "layout"))
    same_values(found.run.version, run.version, left_out=("spec", "layout"))
    assert found.stopped is False
    assert engine._claimed_row(step.pk + 1000) is None


def test_an_agent_comes_with_its_role_and_its_tools_by_name(alice):
    tools = [make_tool("zeta", "baton.calculator"), make_tool("alpha", "baton.calculator")]
    agent = make_agent("writer", tools=tools, system_prompt="Be brief")

    read = nodes.get_agent("writer")

    same_values(read, agent)
    assert read.role.name == agent.role.name
    assert [t.name for t in nodes.tools_of(read)] == ["alpha", "zeta"]


def test_the_price_in_force_is_the_newest_that_started_before_the_call():
    now = timezone.now()
    ModelPrice.objects.create(model="m", input_per_1m=1, effective_from=now - timedelta(days=2))
    newer = ModelPrice.objects.create(
        model="m", input_per_1m=Decimal("2.5"), effective_from=now - timedelta(days=1)
    )
    ModelPrice.objects.create(model="m", input_per_1m=9, effective_from=now + timedelta(days=1))

    same_values(pricing.price_for("m", now), newer)
    assert pricing.price_for("m", now - timedelta(days=3)) is None
    assert pricing.price_for("other", now) is None


def test_one_insert_numbers_the_iterations_of_each_node(alice):
    run, step = silent_run(pipeline_spec("writer"), alice)
    again = [Step(run=run, node_id=step.node_id, kind="agent") for _ in range(2)]

    engine._insert_steps([*again, Step(run=run, node_id="other", kind="agent")])

    assert [s.iteration for s in again] == [1, 2]
    assert sorted(run.steps.values_list("node_id", "iteration")) == sorted(
        [(step.node_id, 0), (step.node_id, 1), (step.node_id, 2), ("other", 0)]
    )
    assert all(s.pk and Step.objects.get(pk=s.pk).created_at for s in again)
    assert Run.objects.get(pk=run.pk).step_count == 1 + 3  # counted on the run as well


def test_the_runs_list_reads_a_row_and_renders_it_as_the_orm_would(alice):
    run, _ = silent_run(pipeline_spec("writer"), alice)
    Run.objects.filter(pk=run.pk).update(
        cost=Decimal("0.0123"),
        total_tokens=42,
        started_at=timezone.now() - timedelta(seconds=75),
        finished_at=timezone.now(),
    )
    anonymous = Run.objects.create(workflow=run.workflow, version=run.version, started_by=None)

    found = fragments.dashboard_runs({run.pk, anonymous.pk, anonymous.pk + 1000})

    assert set(found) == {run.pk, anonymous.pk}
    for pk in found:
        expected = Run.objects.select_related("workflow", "version", "started_by").get(pk=pk)
        with CaptureQueriesContext(connection) as queries:
            html = fragments.render_dashboard_row(found[pk], inserted=False)
        assert html == fragments.render_dashboard_row(expected, inserted=False)
        assert not queries.captured_queries
    assert "alice" in fragments.render_dashboard_row(found[run.pk], inserted=True)
    assert found[anonymous.pk].started_by is None
    assert fragments.dashboard_runs(set()) == {}


def test_an_update_prepares_each_value_as_the_orm_does_and_adds_to_columns(alice):
    run, step = silent_run(pipeline_spec("writer"), alice)
    agent = make_agent("writer")
    finished = timezone.now()

    changed = rows.update(
        Step,
        "id = %s AND attempt = %s",
        [step.pk, step.attempt],
        values={
            "output": {"text": "é", "n": [1, None]},
            "finished_at": finished,
            "agent": agent,
            "lease_until": None,
        },
        add={"cost": Decimal("0.00000125"), "total_tokens": 7},
    )
    rows.update(Step, "id = %s", [step.pk], add={"cost": Decimal("0.5"), "total_tokens": 3})

    assert changed == 1
    saved = Step.objects.get(pk=step.pk)
    assert saved.output == {"text": "é", "n": [1, None]}
    assert saved.finished_at == finished and saved.agent_id == agent.pk
    assert saved.lease_until is None
    assert saved.cost == Decimal("0.50000125") and saved.total_tokens == 10
    assert rows.update(Step, "id = %s AND attempt = %s", [step.pk, 99], values={"error": "x"}) == 0
    assert Step.objects.get(pk=step.pk).error == ""


def test_an_insert_sets_each_key_in_order_and_fills_defaults(alice):
    run, _ = silent_run(pipeline_spec("writer"), alice)
    created = [
        RunEvent(run=run, seq=100 + i, kind="bench.test", payload={"i": i}) for i in range(3)
    ]

    rows.insert(created)

    for event in created:
        stored = RunEvent.objects.get(pk=event.pk)
        assert (stored.seq, stored.payload) == (event.seq, event.payload)
        assert stored.created_at is not None and event._state.adding is False


def test_an_insert_unless_conflicting_writes_nothing_and_leaves_the_transaction_usable(alice):
    run, _ = silent_run(pipeline_spec("writer"), alice)
    first = RunEvent(run=run, seq=100, kind="bench.test", payload={"n": 1})
    assert rows.insert([first], unless_conflicting=True) is True

    twin = RunEvent(run=run, seq=100, kind="bench.test", payload={"n": 2})  # same (run, seq)
    with CaptureQueriesContext(connection) as captured:
        assert rows.insert([twin], unless_conflicting=True) is False

    assert twin.pk is None and twin._state.adding is True
    assert not any(q["sql"].startswith("SAVEPOINT") for q in captured.captured_queries)
    assert RunEvent.objects.get(run=run, seq=100).payload == {"n": 1}  # still usable
    with pytest.raises(ValueError):
        rows.insert([first, twin], unless_conflicting=True)


def test_each_reader_works_its_columns_out_once_however_many_readers_there_are(alice):
    readers = [rows.Rows([(Run, "r", ())]) for _ in range(8)]
    for reader in readers:
        reader.columns()

    layouts = [reader._layout(connection.vendor) for reader in readers]

    assert all(
        reader._layout(connection.vendor) is layout
        for reader, layout in zip(readers, layouts, strict=True)
    )
