"""Two people decide the same request at the same moment: exactly one wins.

Each thread has its own database connection (Django's are per thread) and the rows are
committed (transactional_db), so this exercises the real compare-and-swap in the database:
on PostgreSQL the loser's UPDATE waits for the winner's row lock, then matches no row.
"""

import threading

import pytest
from django.db import connections

from approvals.decisions import AlreadyDecided, decide_approval
from approvals.models import ApprovalRequest
from runs.models import RunEvent, Step, ToolCall
from tests.worker import quiesce

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _worker_idle_before_flush():
    """A decision rings the resumed step's doorbell: the session's Celery worker, when an
    earlier test started it, takes the step. Let it finish before the tables are flushed."""
    yield
    quiesce()


def decide_at_once(request_id: int, attempts: list[tuple]) -> list:
    """Run decide_approval for every (user, kwargs) in its own thread, released together."""
    barrier = threading.Barrier(len(attempts))
    outcomes: list = [None] * len(attempts)

    def attempt(index: int, user, kwargs: dict) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[index] = decide_approval(request_id, user, **kwargs)
        except Exception as exc:  # collected and asserted on by the test
            outcomes[index] = exc
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=attempt, args=(i, user, kwargs))
        for i, (user, kwargs) in enumerate(attempts)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


@pytest.mark.parametrize("round_", range(3))
def test_two_concurrent_decisions_exactly_one_wins(
    make_paused_run, deciders, alice, admin_user, round_
):
    run, step, approval = make_paused_run(kind="tool_call", node_id="email")

    outcomes = decide_at_once(
        approval.pk,
        [
            (alice, {"approve": True, "comment": "ship it"}),
            (admin_user, {"approve": False, "comment": "hold on"}),
        ],
    )

    winners = [o for o in outcomes if isinstance(o, ApprovalRequest)]
    losers = [o for o in outcomes if isinstance(o, AlreadyDecided)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    winner = winners[0]
    stored = ApprovalRequest.objects.get(pk=approval.pk)
    assert stored.status == winner.status and stored.decided_by_id == winner.decided_by_id
    who = "alice" if winner.status == "approved" else "admin"
    assert str(losers[0]).startswith(f"Already {winner.status} by {who} at ")

    # The run reacted exactly once, the way the winner decided.
    assert RunEvent.objects.filter(run=run, kind="approval.decided").count() == 1
    assert RunEvent.objects.filter(run=run, kind="step.resumed").count() == 1
    call = ToolCall.objects.get(step=step)
    if winner.status == "approved":  # the session's worker may have made the call since
        assert call.status in (ToolCall.APPROVED, ToolCall.SUCCEEDED, ToolCall.FAILED)
    else:
        assert call.status == ToolCall.REJECTED
    # Resumed: pending again, unless the session's worker (if running) has taken it since.
    assert Step.objects.get(pk=step.pk).status != Step.WAITING


def test_a_human_and_the_deadline_at_the_same_moment(make_paused_run, deciders, alice):
    run, _, approval = make_paused_run(due_in_s=1)
    ApprovalRequest.objects.filter(pk=approval.pk).update(due_at=approval.created_at)

    outcomes = decide_at_once(
        approval.pk,
        [
            (alice, {"approve": True}),
            (None, {"approve": False, "comment": "deadline passed", "system": True}),
        ],
    )

    assert sum(isinstance(o, ApprovalRequest) for o in outcomes) == 1, outcomes
    assert sum(isinstance(o, AlreadyDecided) for o in outcomes) == 1, outcomes
    assert RunEvent.objects.filter(run=run, kind="approval.decided").count() == 1
