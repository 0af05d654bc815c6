import datetime as dt
from decimal import Decimal as D

import pytest

from runs import costs
from tests.costs.usage import at, make_run, make_usage
from tests.factories import make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db


def march(**fields) -> costs.ReportFilters:
    return costs.ReportFilters(start=dt.date(2025, 3, 1), end=dt.date(2025, 3, 31), **fields)


def report_for(viewer, **fields) -> dict:
    filters = march(**fields)
    return costs.build_report(viewer, filters)


def figures(row: dict) -> tuple:
    return (
        row["spent"],
        row["prompt"],
        row["completion"],
        row["cached"],
        row["tokens"],
        row["calls"],
    )


def by_label(report: dict, table: str) -> dict:
    return {row["label"]: figures(row) for row in report["tables"][table]}


def test_totals_add_up_every_call_the_owner_may_see(world, alice):
    report = report_for(alice)

    assert figures(report["totals"]) == (D("1.65"), 7500, 1400, 1100, 8900, 4)


def test_grouping_by_workflow_agent_model_and_user_matches_hand_computed_figures(world, alice):
    report = report_for(alice)

    assert by_label(report, "by_workflow") == {
        "Beta": (D("1.20"), 4000, 800, 1000, 4800, 1),
        "Alpha": (D("0.45"), 3500, 600, 100, 4100, 3),
    }
    assert by_label(report, "by_agent") == {
        "critic": (D("1.50"), 6000, 1100, 1000, 7100, 2),
        "writer": (D("0.15"), 1500, 300, 100, 1800, 2),
    }
    assert by_label(report, "by_model") == {
        "anthropic/claude-3-5-sonnet": (D("1.50"), 6000, 1100, 1000, 7100, 2),
        "openai/gpt-4o-mini": (D("0.15"), 1500, 300, 100, 1800, 2),
    }
    assert by_label(report, "by_user") == {
        "alice": (D("1.60"), 7000, 1300, 1100, 8300, 3),
        "bob": (D("0.05"), 500, 100, 0, 600, 1),
    }
    # Most expensive first.
    assert [row["label"] for row in report["tables"]["by_workflow"]] == ["Beta", "Alpha"]


def test_staff_see_every_workflow(world, admin_user):
    report = report_for(admin_user)

    assert report["totals"]["spent"] == D("6.65")
    assert by_label(report, "by_workflow")["Gamma"] == (D("5.00"), 9000, 900, 0, 9900, 1)


def test_member_sees_the_shared_workflow_only(world, bob):
    report = report_for(bob)

    assert by_label(report, "by_workflow") == {"Alpha": (D("0.45"), 3500, 600, 100, 4100, 3)}


def test_outsider_sees_nothing_of_others(world, charlie):
    report = report_for(charlie)

    assert by_label(report, "by_workflow") == {"Gamma": (D("5.00"), 9000, 900, 0, 9900, 1)}
    assert {row["label"] for row in report["tables"]["by_user"]} == {"charlie"}
    assert [row["run_id"] for row in report["top_runs"]] == [world["runs"][3].pk]


def test_filters_narrow_every_figure(world, alice, bob):
    assert report_for(alice, workflow=world["alpha"])["totals"]["spent"] == D("0.45")
    assert report_for(alice, agent=world["critic"])["totals"]["spent"] == D("1.50")
    assert report_for(alice, model="openai/gpt-4o-mini")["totals"]["tokens"] == 1800
    assert report_for(alice, user=bob)["totals"]["spent"] == D("0.05")
    week = costs.ReportFilters(start=dt.date(2025, 3, 10), end=dt.date(2025, 3, 16))
    assert figures(costs.build_report(alice, week)["totals"]) == (D("0.05"), 500, 100, 0, 600, 1)


def test_weekly_buckets_start_on_monday_and_include_empty_weeks(world, alice):
    series = report_for(alice, bucket="week")["series"]

    assert [(row["bucket"], row["spent"], row["tokens"]) for row in series] == [
        (dt.date(2025, 2, 24), D(0), 0),
        (dt.date(2025, 3, 3), D("0.40"), 3500),
        (dt.date(2025, 3, 10), D("0.05"), 600),
        (dt.date(2025, 3, 17), D("1.20"), 4800),
        (dt.date(2025, 3, 24), D(0), 0),
        (dt.date(2025, 3, 31), D(0), 0),
    ]


def test_daily_and_monthly_buckets(world, alice):
    daily = report_for(alice, bucket="day")["series"]
    monthly = report_for(alice, bucket="month")["series"]

    assert len(daily) == 31
    assert {row["bucket"].day: row["spent"] for row in daily if row["calls"]} == {
        3: D("0.40"),
        10: D("0.05"),
        17: D("1.20"),
    }
    assert [(row["bucket"], row["spent"], row["calls"]) for row in monthly] == [
        (dt.date(2025, 3, 1), D("1.65"), 4)
    ]


def test_bucket_edges_are_utc_midnight(alice, world):
    run = world["runs"][0]
    make_usage(run, world["writer"], "0.01", 10, 0, 0, at(3, 23, 23, 59, 59))
    make_usage(run, world["writer"], "0.02", 10, 0, 0, at(3, 24, 0, 0, 0))

    series = {row["bucket"]: row["spent"] for row in report_for(alice, bucket="week")["series"]}

    assert series[dt.date(2025, 3, 17)] == D("1.21")
    assert series[dt.date(2025, 3, 24)] == D("0.02")


def test_range_end_date_is_included_whole(world, alice):
    make_usage(world["runs"][0], world["writer"], "0.07", 1, 0, 0, at(3, 31, 23, 59, 59))
    make_usage(world["runs"][0], world["writer"], "9.00", 1, 0, 0, at(4, 1, 0, 0, 0))

    assert report_for(alice)["totals"]["spent"] == D("1.72")


def test_top_runs_are_the_twenty_most_expensive(alice, world):
    delta = make_workflow(pipeline_spec("writer"), owner=alice, slug="delta", name="Delta")
    made = []
    for cents in range(1, 26):
        run = make_run(delta, alice)
        make_usage(run, world["writer"], f"{cents / 100:.2f}", 10, 1, 0, at(3, 20))
        made.append(run.pk)

    top = report_for(alice, workflow=delta)["top_runs"]

    assert len(top) == 20
    assert [row["run_id"] for row in top] == made[::-1][:20]
    assert top[0]["spent"] == D("0.25") and top[0]["run"].pk == made[-1]


def _runs_costing(workflow, user, agent, amounts: list[str]) -> list:
    runs = []
    for amount in amounts:
        run = make_run(workflow, user)
        make_usage(run, agent, amount, 100, 10, 0, at(3, 12))
        runs.append(run)
    return runs


def test_runs_over_three_times_their_workflow_median_are_anomalies(alice, world):
    writer = world["writer"]
    # beta: 0.10 0.10 0.11 0.12 0.30 1.00 + r3 1.20 -> median 0.12, 3x = 0.36
    quiet = _runs_costing(world["beta"], alice, writer, ["0.10", "0.10", "0.11", "0.12"])
    near, wild = _runs_costing(world["beta"], alice, writer, ["0.30", "1.00"])

    report = report_for(alice)

    flagged = {row["run_id"]: row for row in report["anomalies"]}
    assert set(flagged) == {wild.pk, world["runs"][2].pk}
    assert flagged[wild.pk]["median"] == D("0.12")
    assert flagged[wild.pk]["ratio"] == D("8.3")
    assert near.pk not in flagged and all(run.pk not in flagged for run in quiet)
    assert report["anomaly_count"] == 2


def test_median_of_an_even_number_of_runs_is_the_mean_of_the_middle_two(alice, world):
    # beta with r3 (1.20): 0.10 0.20 0.30 0.40 0.50 1.20 -> median 0.35, 3x = 1.05
    _runs_costing(world["beta"], alice, world["critic"], ["0.10", "0.20", "0.30", "0.40", "0.50"])

    report = report_for(alice, workflow=world["beta"])

    assert [(row["run_id"], row["median"]) for row in report["anomalies"]] == [
        (world["runs"][2].pk, D("0.35"))
    ]


def test_medians_are_per_workflow(alice, world):
    # A 0.40 run is ordinary in alpha (median 0.40) although beta's runs are cheaper.
    _runs_costing(world["beta"], alice, world["critic"], ["0.01", "0.01", "0.01", "0.01"])
    _runs_costing(world["alpha"], alice, world["critic"], ["0.40", "0.40"])

    flagged = {row["run_id"] for row in report_for(alice)["anomalies"]}

    assert flagged == {world["runs"][2].pk}


def test_agent_and_model_filters_list_the_runs_that_called_them_at_their_whole_cost(alice, world):
    r1, r2, r3, _ = world["runs"]
    earlier = make_run(world["alpha"], alice)  # February: outside the range
    make_usage(earlier, world["writer"], "9.00", 100, 10, 0, at(2, 27))

    by_model = report_for(alice, model="openai/gpt-4o-mini")
    by_agent = report_for(alice, agent=world["critic"])
    both = report_for(alice, agent=world["critic"], model="openai/gpt-4o-mini")

    # r1 called gpt-4o-mini (writer, 0.10) and claude (critic, 0.30): it counts whole, 0.40.
    assert [(row["run_id"], row["spent"]) for row in by_model["top_runs"]] == [
        (r1.pk, D("0.40")),
        (r2.pk, D("0.05")),
    ]
    assert {row["median"] for row in by_model["top_runs"]} == {D("0.225")}
    assert [(row["run_id"], row["spent"]) for row in by_agent["top_runs"]] == [
        (r3.pk, D("1.20")),
        (r1.pk, D("0.40")),
    ]
    assert both["top_runs"] == [] and both["anomalies"] == []
