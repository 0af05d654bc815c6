import datetime as dt
from decimal import Decimal

import pytest

from runs import costs
from tests.costs.usage import at, make_run, make_usage
from tests.factories import make_agent, make_workflow, pipeline_spec


@pytest.fixture(autouse=True)
def _fresh_cost_cache():
    """Spend sums and email markers live in the shared cache (Redis, also the Celery broker: no
    flushing it); a new generation of the cost keys keeps tests from seeing each other's."""
    costs.forget_cached_spend()


@pytest.fixture
def world(alice, bob, charlie):
    """March 2025: alice owns alpha (bob is a member) and beta; charlie owns gamma.

    run  workflow  started by  agent   model        cost  prompt  compl.  cached  at (UTC)
    r1   alpha     alice       writer  gpt-4o-mini  0.10  1000    200     100     03-03 10:00
    r1   alpha     alice       critic  claude       0.30  2000    300     0       03-03 11:00
    r2   alpha     bob         writer  gpt-4o-mini  0.05  500     100     0       03-10 09:00
    r3   beta      alice       critic  claude       1.20  4000    800     1000    03-17 12:00
    r4   gamma     charlie     writer  gpt-4o-mini  5.00  9000    900     0       03-05 08:00
    """
    writer = make_agent("writer", model="openai/gpt-4o-mini")
    critic = make_agent("critic", model="anthropic/claude-3-5-sonnet")
    alpha = make_workflow(
        pipeline_spec("writer", "critic"), owner=alice, members=[bob], slug="alpha", name="Alpha"
    )
    beta = make_workflow(pipeline_spec("critic"), owner=alice, slug="beta", name="Beta")
    gamma = make_workflow(pipeline_spec("writer"), owner=charlie, slug="gamma", name="Gamma")
    r1, r2 = make_run(alpha, alice), make_run(alpha, bob)
    r3, r4 = make_run(beta, alice), make_run(gamma, charlie)
    make_usage(r1, writer, "0.10", 1000, 200, 100, at(3, 3, 10))
    make_usage(r1, critic, "0.30", 2000, 300, 0, at(3, 3, 11))
    make_usage(r2, writer, "0.05", 500, 100, 0, at(3, 10, 9))
    make_usage(r3, critic, "1.20", 4000, 800, 1000, at(3, 17, 12))
    make_usage(r4, writer, "5.00", 9000, 900, 0, at(3, 5, 8))
    return {
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "writer": writer,
        "critic": critic,
        "runs": [r1, r2, r3, r4],
    }


MARCH = {"start": "2025-03-01", "end": "2025-03-31"}
D = Decimal
DAY = dt.timedelta(days=1)
