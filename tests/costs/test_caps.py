from decimal import Decimal as D

import pytest
from django.core import mail

from runs import costs
from runs.models import Run
from tests.costs.conftest import DAY
from tests.costs.usage import at, make_run, make_usage
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db

NOW = at(3, 15, 12)  # a Saturday in the middle of March 2025


@pytest.fixture
def agent():
    return make_agent("writer", model="openai/gpt-4o-mini")


@pytest.fixture
def demo(alice):
    return make_workflow(
        pipeline_spec("writer"), owner=alice, slug="demo-pipeline", name="Demo pipeline"
    )


@pytest.fixture
def run(demo, alice):
    return make_run(demo, alice, status=Run.RUNNING)


def test_daily_cap_counts_today_only(demo, run, agent):
    demo.daily_cost_cap = D("1.00")
    make_usage(run, agent, "0.50", when=NOW - DAY)
    make_usage(run, agent, "0.98", when=at(3, 15, 0, 0, 0))

    assert costs.cap_breach(demo, D("0.02"), now=NOW) is None
    assert costs.cap_breach(demo, D("0.03"), now=NOW).message == (
        "workflow demo-pipeline daily cap $1.00 would be exceeded: "
        "$0.98 spent today + $0.03 estimated"
    )


def test_monthly_cap_counts_this_utc_month(demo, run, agent):
    demo.monthly_cost_cap = D("10.00")
    make_usage(run, agent, "7.00", when=at(2, 28, 23, 59, 59))  # last month
    make_usage(run, agent, "9.50", when=at(3, 1, 0, 0, 0))
    make_usage(run, agent, "0.40", when=NOW)

    assert costs.cap_breach(demo, D("0.10"), now=NOW) is None
    assert costs.cap_breach(demo, D("0.20"), now=NOW).message == (
        "workflow demo-pipeline monthly cap $10.00 would be exceeded: "
        "$9.90 spent this month + $0.20 estimated"
    )


def test_monthly_cap_sees_new_spend_of_today_after_caching_the_past_days(demo, run, agent):
    demo.monthly_cost_cap = D("10.00")
    make_usage(run, agent, "9.00", when=at(3, 2))
    assert costs.cap_breach(demo, D("0.50"), now=NOW) is None

    make_usage(run, agent, "0.60", when=NOW)

    assert "$9.60 spent this month" in costs.cap_breach(demo, D("0.50"), now=NOW).message


def test_global_cap_counts_every_workflow(settings, demo, run, agent, bob):
    other = make_workflow(pipeline_spec("writer"), owner=bob, slug="other")
    make_usage(run, agent, "12.00", when=at(3, 3))
    make_usage(make_run(other, bob), agent, "7.95", when=NOW)
    settings.BATON_GLOBAL_MONTHLY_CAP = None
    assert costs.cap_breach(demo, D("5"), now=NOW) is None

    settings.BATON_GLOBAL_MONTHLY_CAP = D("20")

    assert costs.cap_breach(demo, D("0.05"), now=NOW) is None
    assert costs.cap_breach(demo, D("0.10"), now=NOW).message == (
        "global monthly cap $20.00 would be exceeded: $19.95 spent this month + $0.10 estimated"
    )


def test_calls_in_flight_count_but_not_the_callers_own_reservation(demo, run, agent, alice):
    demo.daily_cost_cap = D("1.00")
    make_usage(run, agent, "0.30", when=NOW)
    make_run(demo, alice, status=Run.RUNNING, reserved_cost=D("0.40"))
    make_run(demo, alice, status=Run.SUCCEEDED, reserved_cost=D("5"))  # finished: ignored
    # The engine reserves its estimate on its run before it asks.
    Run.objects.filter(pk=run.pk).update(reserved_cost=D("0.30"))

    assert costs.cap_breach(demo, D("0.30"), now=NOW) is None
    Run.objects.filter(pk=run.pk).update(reserved_cost=D("0.31"))
    assert costs.cap_breach(demo, D("0.31"), now=NOW).message == (
        "workflow demo-pipeline daily cap $1.00 would be exceeded: "
        "$0.30 spent today + $0.40 in flight + $0.31 estimated"
    )


def test_no_caps_means_no_breach_and_no_queries(demo, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert costs.cap_breach(demo, D("1000"), now=NOW) is None


def test_warning_email_at_80_percent_is_sent_once_per_cap_per_day(
    demo, run, agent, admin_user, django_capture_on_commit_callbacks
):
    demo.daily_cost_cap = D("1.00")
    make_usage(run, agent, "0.79", when=NOW)
    with django_capture_on_commit_callbacks(execute=True):
        assert costs.notify_if_near_caps(demo, now=NOW) == []
    assert mail.outbox == []

    make_usage(run, agent, "0.06", when=NOW)
    with django_capture_on_commit_callbacks(execute=True):
        banners = costs.notify_if_near_caps(demo, now=NOW)
        costs.notify_if_near_caps(demo, now=NOW)
        costs.cap_breach(demo, D("0.01"), now=NOW)

    assert banners == ["Workflow demo-pipeline daily cap $1.00: 85% used ($0.85 spent today)."]
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["admin@example.com"]
    assert mail.outbox[0].subject == "Baton: workflow demo-pipeline daily cap is 85% used"
    assert "$0.85 spent today" in mail.outbox[0].body

    make_usage(run, agent, "0.90", when=NOW + DAY)
    with django_capture_on_commit_callbacks(execute=True):
        costs.notify_if_near_caps(demo, now=NOW + DAY)
    assert len(mail.outbox) == 2  # a new day, a new period


def test_refused_call_emails_staff_once(
    demo, run, agent, admin_user, django_capture_on_commit_callbacks
):
    demo.monthly_cost_cap = D("2.00")
    make_usage(run, agent, "1.00", when=NOW)
    with django_capture_on_commit_callbacks(execute=True):
        assert costs.cap_breach(demo, D("1.50"), now=NOW)
        assert costs.cap_breach(demo, D("1.50"), now=NOW)

    assert [message.subject for message in mail.outbox] == [
        "Baton: workflow demo-pipeline monthly cap reached, LLM calls refused"
    ]


def test_nothing_is_sent_when_the_callers_transaction_rolls_back(
    demo, run, agent, admin_user, django_capture_on_commit_callbacks
):
    demo.daily_cost_cap = D("1.00")
    make_usage(run, agent, "0.95", when=NOW)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        costs.notify_if_near_caps(demo, now=NOW)
    assert len(callbacks) == 1 and mail.outbox == []

    with django_capture_on_commit_callbacks(execute=True):
        costs.notify_if_near_caps(demo, now=NOW)
    assert len(mail.outbox) == 1


def test_spend_warnings_name_each_cap_over_80_percent(settings, demo, run, agent):
    settings.BATON_GLOBAL_MONTHLY_CAP = D("100")
    demo.daily_cost_cap = D("1.00")
    demo.monthly_cost_cap = D("2.00")
    make_usage(run, agent, "1.10", when=at(3, 2))
    make_usage(run, agent, "0.50", when=NOW)

    assert costs.spend_warnings(demo, now=NOW) == [
        "Workflow demo-pipeline monthly cap $2.00: 80% used ($1.60 spent this month).",
    ]

    make_usage(run, agent, "0.60", when=NOW)
    assert costs.spend_warnings(demo, now=NOW) == [
        "Workflow demo-pipeline daily cap $1.00: 110% used ($1.10 spent today). "
        "New LLM calls are refused until the period ends or the cap is raised.",
        "Workflow demo-pipeline monthly cap $2.00: 110% used ($2.20 spent this month). "
        "New LLM calls are refused until the period ends or the cap is raised.",
    ]


def test_a_zero_cap_refuses_paid_calls_only(demo, run):
    demo.daily_cost_cap = D("0")

    assert costs.cap_breach(demo, D("0"), now=NOW) is None
    assert costs.cap_breach(demo, D("0.0001"), now=NOW).message == (
        "workflow demo-pipeline daily cap $0.00 would be exceeded: "
        "$0.00 spent today + $0.0001 estimated"
    )


def test_an_allowance_lets_its_run_past_that_cap_only_and_only_by_that_much(demo, run, agent):
    demo.daily_cost_cap = D("1.00")
    demo.monthly_cost_cap = D("2.00")
    make_usage(run, agent, "0.92", when=at(3, 2))
    make_usage(run, agent, "0.98", when=NOW)
    allowances = {"workflow_daily": D("0.10")}

    assert costs.cap_breach(demo, D("0.03"), now=NOW).status.key == "workflow_daily"
    assert costs.cap_breach(demo, D("0.10"), allowances=allowances, now=NOW) is None
    daily = costs.cap_breach(demo, D("0.13"), allowances=allowances, now=NOW)
    assert daily.message == (
        "workflow demo-pipeline daily cap $1.00 + $0.10 approved for this run would be "
        "exceeded: $0.98 spent today + $0.13 estimated"
    )
    # The daily allowance does not lift the monthly cap ($1.90 spent this month).
    monthly = costs.cap_breach(demo, D("0.11"), allowances=allowances, now=NOW)
    assert monthly.status.key == "workflow_monthly"
    assert monthly.message == (
        "workflow demo-pipeline monthly cap $2.00 would be exceeded: "
        "$1.90 spent this month + $0.11 estimated"
    )


def test_an_allowance_past_the_global_cap_does_not_lift_the_workflow_caps(
    settings, demo, run, agent
):
    settings.BATON_GLOBAL_MONTHLY_CAP = D("1.00")
    demo.daily_cost_cap = D("1.50")
    make_usage(run, agent, "1.00", when=NOW)
    allowances = {"global_monthly": D("5")}

    assert costs.cap_breach(demo, D("0.50"), allowances=allowances, now=NOW) is None
    breach = costs.cap_breach(demo, D("0.60"), allowances=allowances, now=NOW)
    assert breach.status.key == "workflow_daily"


def test_a_breach_carries_the_figures_and_a_raise_for_this_call_and_four_more(
    demo, run, agent, alice
):
    demo.daily_cost_cap = D("1.00")
    make_usage(run, agent, "0.95", when=NOW)
    make_run(demo, alice, status=Run.RUNNING, reserved_cost=D("0.05"))
    Run.objects.filter(pk=run.pk).update(reserved_cost=D("0.03"))

    breach = costs.cap_breach(demo, D("0.03"), allowances={"workflow_daily": D("0.01")}, now=NOW)

    # 0.95 spent + 0.05 in flight + 0.03 estimated - 1.00 cap - 0.01 allowed = 0.02 short.
    assert breach.suggested_raise == D("0.02") + 4 * D("0.03")
    assert breach.figures() == {
        "cap": "workflow_daily",
        "cap_name": "workflow demo-pipeline daily cap",
        "period": "2025-03-15",
        "cap_amount": "1.00000000",
        "spent": "0.95000000",
        "in_flight": "0.05000000",
        "estimate": "0.03000000",
        "allowance": "0.01000000",
    }
    # 0.03 short + 4 x 0.00000003, rounded up.
    assert costs.cap_breach(demo, D("0.00000003"), now=NOW).suggested_raise == D("0.0301")


def test_allowances_accumulate_per_cap_and_unreadable_ones_count_as_nothing():
    budget = {"max_cost": "1", "cap_allowance": {"workflow_daily": "0.25"}}

    budget = costs.grant_cap_allowance(budget, "workflow_daily", D("0.50"))
    budget = costs.grant_cap_allowance(budget, "global_monthly", D("2"))

    assert budget == {
        "max_cost": "1",
        "cap_allowance": {"workflow_daily": "0.75", "global_monthly": "2"},
    }
    assert costs.cap_allowances(budget) == {"workflow_daily": D("0.75"), "global_monthly": D(2)}
    junk = {"workflow_daily": "lots", "workflow_monthly": "NaN", "global_monthly": "-3", "x": "1"}
    assert costs.cap_allowances({"cap_allowance": junk}) == {}
    assert costs.cap_allowances({"cap_allowance": "5"}) == {}
    assert costs.cap_allowances(None) == {}
    with pytest.raises(ValueError, match="not a spend cap"):
        costs.grant_cap_allowance(budget, "max_cost", D(1))


def test_cap_request_figures_show_amounts_and_leave_other_text_as_it_is():
    payload = {
        "limit": "spend_cap",
        "cap": "workflow_monthly",
        "cap_name": "workflow demo monthly cap",
        "period": "2025-03",
        "cap_amount": "20.00000000",
        "spent": "19.99",
        "in_flight": "0",
        "estimate": "0.0016",
        "allowance": "1.5",
        "raise_by": "<b>lots</b>",
    }

    rows = dict(costs.cap_request_figures(payload))

    assert rows["Cap"] == "workflow demo monthly cap, period 2025-03 (UTC)"
    assert rows["Spent this month"] == "$19.99"
    assert rows["This call (estimate)"] == "$0.0016"
    assert rows["Already approved for this run past the cap"] == "$1.50"
    assert rows["Suggested raise"] == "<b>lots</b>"  # escaped by the template
    assert "This run's limit on this cap once approved" not in rows
    payload["raise_by"] = "0.5"
    assert (
        dict(costs.cap_request_figures(payload))["This run's limit on this cap once approved"]
        == "$22.00"
    )
    assert costs.cap_request_figures({"limit": "max_cost", "raise_by": "1"}) == []
    assert costs.cap_request_figures(["not", "a", "dict"]) == []
