"""The inbox socket: a dumb pipe that forwards to each user only what they may see.

The APPROVALS_GROUP carries bare "request N was requested / decided" messages (published after
commit by approvals/requests.py and approvals/decisions.py). Visibility and the decide buttons
depend on the user, so each consumer renders its own fragment: a new card (if it matches the
page's filters), a removal, and the user's badge count. No ORM writes here.
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import QueryDict

from approvals import decisions
from approvals.forms import InboxFilterForm
from approvals.models import ApprovalRequest
from approvals.requests import render_added, render_badge, render_card, render_removed
from runs.events import APPROVALS_GROUP


class ApprovalsConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.user = self.scope.get("user")
        self.joined = False
        if self.user is None or not self.user.is_authenticated:
            await self.close()
            return
        self.badge_only = self.scope["url_route"]["kwargs"].get("badge_only", False)
        query = self.scope.get("query_string", b"").decode("latin-1")
        self.filters = QueryDict(query) if query else QueryDict()
        if not await database_sync_to_async(self._filters_allowed)():
            # e.g. ?run=<a run this user cannot see>: an outsider gets nothing, not an empty feed.
            await self.close()
            return
        await self.channel_layer.group_add(APPROVALS_GROUP, self.channel_name)
        self.joined = True
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "joined", False):
            await self.channel_layer.group_discard(APPROVALS_GROUP, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Clients only listen; decisions go through the views (CSRF, permissions, forms)."""

    async def approval_changed(self, message: dict) -> None:
        html = await database_sync_to_async(self._render)(message["request_id"], message["action"])
        if html:
            await self.send(text_data=html)

    def _filters_allowed(self) -> bool:
        if not self.filters:
            return True
        form = InboxFilterForm(self.user, self.filters)
        form.is_valid()
        return "run" not in form.errors and "workflow" not in form.errors

    def _render(self, request_id: int, action: str) -> str:
        visible = ApprovalRequest.objects.for_user(self.user)
        approval = (
            visible.select_related(
                "run__workflow", "run__version", "step", "tool_call", "approver_group"
            )
            .filter(pk=request_id)
            .first()
        )
        if approval is None:  # not this user's business: say nothing at all
            return ""
        badge = render_badge(visible.pending().count())
        if self.badge_only:
            return badge
        if action == "requested" and approval.status == ApprovalRequest.PENDING:
            form = InboxFilterForm(self.user, self.filters)
            if not form.filter(visible.pending()).filter(pk=request_id).exists():
                return badge
            card = render_card(approval, can_decide=decisions.can_decide(self.user, approval))
            return render_added(card) + badge
        return render_removed(request_id) + badge
