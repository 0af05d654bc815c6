"""The inbox socket, through the real channel layer (Redis) and real consumers."""

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from approvals.decisions import decide_approval
from orchestrator_site.routing import websocket_urlpatterns
from tests.runs.test_consumers import TIMEOUT

pytestmark = pytest.mark.django_db(transaction=True)

application = URLRouter(websocket_urlpatterns)


async def connect(user, path: str = "/ws/approvals/") -> tuple[WebsocketCommunicator, bool]:
    communicator = WebsocketCommunicator(application, path)
    communicator.scope["user"] = user
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    return communicator, connected


def test_a_new_request_appears_and_a_decided_one_disappears(make_paused_run, deciders, alice):
    async def scenario():
        communicator, connected = await connect(alice)
        assert connected
        _, _, approval = await sync_to_async(make_paused_run)(
            kind="tool_call", node_id="email", title="Call send_email"
        )

        added = await communicator.receive_from(timeout=TIMEOUT)
        assert 'hx-swap-oob="beforeend:#approval-items"' in added
        assert f'id="approval-{approval.pk}"' in added
        assert "Call send_email" in added and 'data-action="approve"' in added
        assert 'id="approvals-badge"' in added and ">1</span>" in added

        await sync_to_async(decide_approval)(approval.pk, alice, approve=True)
        removed = await communicator.receive_from(timeout=TIMEOUT)
        assert f'<div id="approval-{approval.pk}" hx-swap-oob="delete"></div>' in removed
        assert ">0</span>" in removed
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_a_member_without_the_permission_gets_the_card_without_buttons(make_paused_run, bob):
    async def scenario():
        communicator, connected = await connect(bob)
        assert connected
        await sync_to_async(make_paused_run)()
        added = await communicator.receive_from(timeout=TIMEOUT)
        assert "You can see this request but not decide it" in added
        assert 'data-action="approve"' not in added
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_an_outsider_hears_nothing_about_other_peoples_runs(
    make_paused_run, deciders, alice, charlie
):
    async def scenario():
        outsider, connected = await connect(charlie)
        assert connected
        owner, _ = await connect(alice)
        _, _, approval = await sync_to_async(make_paused_run)()
        assert f'id="approval-{approval.pk}"' in await owner.receive_from(timeout=TIMEOUT)
        await sync_to_async(decide_approval)(approval.pk, alice, approve=True)
        assert 'hx-swap-oob="delete"' in await owner.receive_from(timeout=TIMEOUT)
        assert await outsider.receive_nothing(timeout=0.5)
        await outsider.disconnect()
        await owner.disconnect()

    async_to_sync(scenario)()


def test_anonymous_socket_is_closed(db):
    async def scenario():
        communicator, connected = await connect(AnonymousUser())
        assert not connected

    async_to_sync(scenario)()


def test_outsider_socket_filtered_to_someone_elses_run_is_closed(make_paused_run, charlie):
    run, _, _ = make_paused_run()

    async def scenario():
        communicator, connected = await connect(charlie, f"/ws/approvals/?run={run.pk}")
        assert not connected

    async_to_sync(scenario)()


def test_live_additions_respect_the_pages_filters(make_paused_run, alice):
    async def scenario():
        tools_only, connected = await connect(alice, "/ws/approvals/?kind=tool_call")
        assert connected
        await sync_to_async(make_paused_run)(kind="node")
        only_badge = await tools_only.receive_from(timeout=TIMEOUT)
        assert "approval-items" not in only_badge and 'id="approvals-badge"' in only_badge
        _, _, tool = await sync_to_async(make_paused_run)(kind="tool_call", node_id="email")
        assert f'id="approval-{tool.pk}"' in await tools_only.receive_from(timeout=TIMEOUT)
        await tools_only.disconnect()

    async_to_sync(scenario)()


def test_badge_socket_sends_only_the_count(make_paused_run, alice):
    async def scenario():
        badge, connected = await connect(alice, "/ws/approvals/badge/")
        assert connected
        await sync_to_async(make_paused_run)()
        message = await badge.receive_from(timeout=TIMEOUT)
        assert message.startswith('<span id="approvals-badge"') and ">1</span>" in message
        assert "approval-items" not in message
        await badge.disconnect()

    async_to_sync(scenario)()
