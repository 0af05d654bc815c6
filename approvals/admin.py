"""Approval requests in the admin: an audit view. Requests come from the engine and decisions
only from `decide_approval`, so nothing here can create, decide or delete one; while pending,
only its deadline, default outcome and approver group may be adjusted."""

import json

from django.contrib import admin
from django.utils.html import format_html, format_html_join

from approvals.decisions import decider_name, payload_diff
from approvals.models import ApprovalRequest
from runs.models import RunEvent

PENDING_EDITABLE = ("due_at", "default_outcome", "approver_group")


def _pre(value) -> str:
    return format_html(
        "<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, default=str)
    )


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "title",
        "kind",
        "status",
        "run",
        "created_at",
        "due_at",
        "decided_by_label",
        "decided_at",
    )
    list_filter = ("status", "kind", "decided_by_system", "run__workflow")
    search_fields = ("title", "comment", "run__id", "decided_by__username")
    date_hierarchy = "created_at"
    list_select_related = ("run__workflow", "decided_by")
    fields = (
        "title",
        "kind",
        "status",
        "run",
        "step",
        "tool_call",
        "payload_json",
        "context_json",
        "due_at",
        "default_outcome",
        "approver_group",
        "decided_by_label",
        "decided_at",
        "comment",
        "edited_payload_json",
        "edit_diff",
        "history",
    )

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_readonly_fields(self, request, obj=None):
        every = [f for f in self.fields]
        if obj is not None and obj.status == ApprovalRequest.PENDING:
            return [f for f in every if f not in PENDING_EDITABLE]
        return every

    def save_model(self, request, obj, form, change):
        # Only pending requests reach here with changes; re-check against a concurrent decision.
        if change:
            if not form.changed_data:
                return
            updated = ApprovalRequest.objects.filter(
                pk=obj.pk, status=ApprovalRequest.PENDING
            ).update(
                **{
                    name: form.cleaned_data[name]
                    for name in form.changed_data
                    if name in PENDING_EDITABLE
                }
            )
            if not updated:
                self.message_user(
                    request, "It was decided meanwhile; nothing was changed.", level="error"
                )
            return
        super().save_model(request, obj, form, change)

    @admin.display(description="Decided by")
    def decided_by_label(self, obj: ApprovalRequest) -> str:
        return decider_name(obj) if obj.decided_at else "—"

    @admin.display(description="Payload")
    def payload_json(self, obj: ApprovalRequest) -> str:
        return _pre(obj.payload)

    @admin.display(description="Context")
    def context_json(self, obj: ApprovalRequest) -> str:
        return _pre(obj.context)

    @admin.display(description="Edited payload")
    def edited_payload_json(self, obj: ApprovalRequest) -> str:
        return _pre(obj.edited_payload) if obj.edited_payload is not None else "—"

    @admin.display(description="What the edit changed")
    def edit_diff(self, obj: ApprovalRequest) -> str:
        if obj.edited_payload is None:
            return "—"
        rows = payload_diff(obj.payload, obj.edited_payload)
        return format_html(
            "<table><tr><th>Field</th><th>Change</th><th>Before</th><th>After</th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td></tr>",
                (
                    (
                        r["path"],
                        r["change"],
                        json.dumps(r["old"], default=str),
                        json.dumps(r["new"], default=str),
                    )
                    for r in rows
                ),
            ),
        )

    @admin.display(description="History (run events)")
    def history(self, obj: ApprovalRequest) -> str:
        events = RunEvent.objects.filter(
            run_id=obj.run_id,
            kind__in=("approval.requested", "approval.decided"),
            payload__request_id=obj.pk,
        ).order_by("seq")
        return (
            format_html(
                "<ul>{}</ul>",
                format_html_join(
                    "",
                    "<li>#{} {} at {}: <pre>{}</pre></li>",
                    (
                        (e.seq, e.kind, e.created_at, json.dumps(e.payload, indent=2, default=str))
                        for e in events
                    ),
                ),
            )
            if events
            else "—"
        )
