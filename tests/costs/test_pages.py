import csv
import datetime as dt
import io
import re
from decimal import Decimal as D

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.costs.conftest import MARCH
from tests.costs.usage import at, make_run, make_usage
from tests.factories import make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db

URL = "/costs/"


def read_csv(response) -> list[list[str]]:
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.reader(io.StringIO(response.content.decode())))


def test_reports_page_shows_totals_tables_and_charts(client, alice, world):
    client.force_login(alice)

    response = client.get(URL, MARCH)

    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-total="cost">$1.65<' in html
    assert 'data-total="tokens">8,900<' in html
    assert 'data-total="cached">1,100<' in html
    for table in ("by_workflow", "by_agent", "by_model", "by_user", "top-runs", "anomalies"):
        assert f'id="table-{table}"' in html
    assert html.count('<figure class="cost-chart">') == 2


def test_chart_prints_values_and_axis_labels_without_hovering(client, alice, world):
    client.force_login(alice)

    html = client.get(URL, {**MARCH, "bucket": "week"}).content.decode()

    start = html.index('<figure class="cost-chart">')
    chart = html[start : html.index("</figure>", start)]
    values = re.findall(r'class="chart-value"[^>]*>([^<]+)<', chart)
    labels = re.findall(r'class="chart-label"[^>]*>([^<]+)<', chart)
    ticks = re.findall(r'class="chart-tick"[^>]*>([^<]+)<', chart)
    assert values == ["$0.40", "$0.05", "$1.20"]
    assert labels == ["Feb 24", "Mar 03", "Mar 10", "Mar 17", "Mar 24", "Mar 31"]
    assert ticks[0] == "$0" and len(ticks) >= 3
    assert "Cost per week (USD)" in chart


def test_outsider_page_and_csv_show_nothing_of_others(client, charlie, world):
    client.force_login(charlie)

    html = client.get(URL, MARCH).content.decode()
    rows = read_csv(client.get(URL, {**MARCH, "format": "csv", "table": "by_workflow"}))

    assert "Alpha" not in html and "Beta" not in html and "alice" not in html
    assert 'data-total="cost">$5.00<' in html
    assert rows[1:] == [["Gamma", "5.00000000", "9000", "900", "0", "9900", "1"]]


def test_outsider_cannot_filter_by_a_workflow_they_cannot_see(client, charlie, world):
    client.force_login(charlie)

    response = client.get(URL, {**MARCH, "workflow": "alpha"})

    assert response.status_code == 400
    assert "Select a valid choice" in response.content.decode()
    assert "$0.45" not in response.content.decode()


def test_csv_by_model_has_money_and_tokens(client, alice, world):
    client.force_login(alice)

    rows = read_csv(client.get(URL, {**MARCH, "format": "csv", "table": "by_model"}))

    assert rows == [
        [
            "model",
            "cost_usd",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "total_tokens",
            "calls",
        ],
        ["anthropic/claude-3-5-sonnet", "1.50000000", "6000", "1100", "1000", "7100", "2"],
        ["openai/gpt-4o-mini", "0.15000000", "1500", "300", "100", "1800", "2"],
    ]


def test_csv_of_every_table_respects_the_filters(client, alice, world):
    client.force_login(alice)
    query = {**MARCH, "format": "csv", "workflow": "alpha"}

    users = read_csv(client.get(URL, {**query, "table": "by_user"}))
    totals = read_csv(client.get(URL, {**query, "table": "totals"}))
    series = read_csv(client.get(URL, {**query, "table": "series", "bucket": "month"}))
    top = read_csv(client.get(URL, {**query, "table": "top_runs"}))
    agents = read_csv(client.get(URL, {**query, "table": "by_agent"}))
    workflows = read_csv(client.get(URL, {**query, "table": "by_workflow"}))

    assert users[1:] == [
        ["alice", "0.40000000", "3000", "500", "100", "3500", "2"],
        ["bob", "0.05000000", "500", "100", "0", "600", "1"],
    ]
    assert totals[1:] == [
        ["2025-03-01", "2025-03-31", "0.45000000", "3500", "600", "100", "4100", "3"]
    ]
    assert series == [
        [
            "month_start",
            "cost_usd",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "total_tokens",
            "calls",
        ],
        ["2025-03-01", "0.45000000", "3500", "600", "100", "4100", "3"],
    ]
    r1, r2 = world["runs"][:2]
    assert [row[:4] for row in top[1:]] == [
        [str(r1.pk), "alpha", "alice", "succeeded"],
        [str(r2.pk), "alpha", "bob", "succeeded"],
    ]
    assert top[1][5] == "0.40000000" and top[1][9] == "3500" and top[1][10] == "2"
    assert [row[0] for row in agents[1:]] == ["critic", "writer"]
    assert [row[0] for row in workflows[1:]] == ["Alpha"]


def test_csv_of_anomalies_lists_run_median_and_ratio(client, alice, world):
    client.force_login(alice)
    for amount in ("0.10", "0.10", "0.10"):
        make_usage(make_run(world["beta"], alice), world["critic"], amount, 1, 1, 0, at(3, 4))

    rows = read_csv(client.get(URL, {**MARCH, "format": "csv", "table": "anomalies"}))

    assert rows[0][-2:] == ["workflow_median_usd", "times_median"]
    assert [(row[0], row[5], row[-2], row[-1]) for row in rows[1:]] == [
        (str(world["runs"][2].pk), "1.20000000", "0.10000000", "12.0")
    ]


def test_csv_cells_cannot_become_spreadsheet_formulas(client, alice, world):
    evil = make_workflow(
        pipeline_spec("writer"),
        owner=alice,
        slug="evil",
        name='=HYPERLINK("http://evil.example","x")',
    )
    make_usage(make_run(evil, alice), world["writer"], "0.01", 1, 1, 0, at(3, 8))
    client.force_login(alice)

    rows = read_csv(client.get(URL, {**MARCH, "format": "csv", "table": "by_workflow"}))

    assert ['\'=HYPERLINK("http://evil.example","x")'] == [
        row[0] for row in rows[1:] if "HYPERLINK" in row[0]
    ]


def test_csv_of_an_unknown_table_is_a_clear_400(client, alice, world):
    client.force_login(alice)

    response = client.get(URL, {"format": "csv", "table": "passwords"})

    assert response.status_code == 400
    assert "Unknown table 'passwords'" in response.content.decode()


@pytest.mark.parametrize(
    "query, message",
    [
        ({"start": "2025-13-01"}, "Enter a valid date."),
        ({"start": "not a date"}, "Enter a valid date."),
        ({"start": "2025-03-10", "end": "2025-03-01"}, "The end date is before the start date."),
        ({"start": "0001-01-01"}, "Pick a date between"),
        ({"end": "9999-12-31"}, "Pick a date between"),
        ({"start": "2020-01-01", "end": "2025-01-01"}, "pick a shorter range or a longer bucket"),
        ({"bucket": "year"}, "Select a valid choice"),
        ({"agent": "nobody"}, "Select a valid choice"),
        ({"user": "nobody"}, "Select a valid choice"),
    ],
)
def test_bad_filters_give_a_form_error_never_a_500(client, alice, world, query, message):
    client.force_login(alice)

    page = client.get(URL, query)
    export = client.get(URL, {**query, "format": "csv", "table": "by_model"})

    assert page.status_code == 400
    assert message in page.content.decode()
    assert export.status_code == 400
    assert message in export.content.decode()


def test_long_ranges_are_fine_with_monthly_buckets(client, alice, world):
    client.force_login(alice)

    response = client.get(URL, {"start": "2020-01-01", "end": "2025-12-31", "bucket": "month"})

    assert response.status_code == 200
    assert 'data-total="cost">$1.65<' in response.content.decode()


def test_group_rows_link_to_the_report_narrowed_to_them(client, alice, world):
    client.force_login(alice)

    html = client.get(URL, MARCH).content.decode()

    assert 'href="?start=2025-03-01&amp;end=2025-03-31&amp;bucket=day&amp;workflow=alpha"' in html
    assert (
        'href="?start=2025-03-01&amp;end=2025-03-31&amp;bucket=day&amp;format=csv&amp;'
        'table=by_model"'
    ) in html


def test_default_range_is_the_last_30_days_written_into_the_form_and_links(client, alice):
    client.force_login(alice)
    today = timezone.now().date()
    start = today - dt.timedelta(days=29)

    html = client.get(URL).content.decode()

    assert f'name="start" value="{start.isoformat()}"' in html
    assert f'name="end" value="{today.isoformat()}"' in html
    assert f"?end={today}&amp;start={start}&amp;bucket=day&amp;format=csv" in html


def test_anonymous_visitor_is_sent_to_login(client, world):
    response = client.get(URL)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_reports_page_shows_spend_cap_warnings(client, alice, world):
    alpha = world["alpha"]
    alpha.daily_cost_cap = D("1.00")
    alpha.save()
    make_usage(world["runs"][0], world["writer"], "0.90", 1, 1, 0)  # now
    client.force_login(alice)

    html = client.get(URL).content.decode()

    assert "Workflow alpha daily cap $1.00: 90% used ($0.90 spent today)." in html


def test_run_breakdown_fragment_is_scoped_like_the_run(client, alice, charlie, world):
    url = reverse("costs:run_breakdown", args=[world["runs"][0].pk])

    client.force_login(charlie)
    assert client.get(url).status_code == 404
    client.force_login(alice)
    response = client.get(url)
    assert response.status_code == 200
    assert 'data-total="cost">$0.40<' in response.content.decode()
