"""Approval requests: what an agent wants to do that a human must decide first."""

from django.conf import settings
from django.db import models
from django.db.models import Q


class ApprovalQuerySet(models.QuerySet):
    def for_user(self, user) -> "ApprovalQuerySet":
        """Requests of runs the user may see (staff see all)."""
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self.all()
        return self.filter(
            Q(run__workflow__owner=user) | Q(run__workflow__members=user) | Q(run__started_by=user)
        ).distinct()

    def pending(self) -> "ApprovalQuerySet":
        return self.filter(status=ApprovalRequest.PENDING)


class ApprovalRequest(models.Model):
    KINDS = [
        ("node", "Approval step"),
        ("tool_call", "Tool call"),
        ("escalation", "Escalation"),
        ("budget", "Budget"),
    ]
    PENDING, APPROVED, REJECTED, EXPIRED, CANCELLED = (
        "pending",
        "approved",
        "rejected",
        "expired",
        "cancelled",
    )
    STATUSES = [
        (PENDING, "Pending"),
        (APPROVED, "Approved"),
        (REJECTED, "Rejected"),
        (EXPIRED, "Expired"),
        (CANCELLED, "Cancelled"),
    ]
    OUTCOMES = [("approve", "Approve"), ("reject", "Reject")]

    run = models.ForeignKey("runs.Run", on_delete=models.CASCADE, related_name="approvals")
    step = models.ForeignKey(
        "runs.Step", null=True, blank=True, on_delete=models.CASCADE, related_name="approvals"
    )
    tool_call = models.ForeignKey(
        "runs.ToolCall", null=True, blank=True, on_delete=models.CASCADE, related_name="approvals"
    )
    kind = models.CharField(max_length=20, choices=KINDS)
    title = models.CharField(max_length=300)
    # What is proposed: {"tool": ..., "arguments": {...}} / {"output": ...} / {"raise_by": "0.50"}.
    payload = models.JSONField(default=dict)
    # What a human needs to decide: preceding outputs, the prompt, the budget figures.
    context = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=STATUSES, default=PENDING, db_index=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    decided_by_system = models.BooleanField(default=False)
    decided_at = models.DateTimeField(null=True, blank=True)
    comment = models.TextField(blank=True)
    edited_payload = models.JSONField(null=True, blank=True)
    due_at = models.DateTimeField(null=True, blank=True, db_index=True)
    default_outcome = models.CharField(max_length=8, choices=OUTCOMES, default="reject")
    approver_group = models.ForeignKey(
        "auth.Group", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = ApprovalQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        permissions = [("decide_approvalrequest", "Can decide approval requests")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.title}"

    def save(self, *args, **kwargs):
        # Decisions are written once, by compare-and-swap in approvals/decisions.py.
        if self.pk and type(self).objects.filter(pk=self.pk).exclude(status=self.PENDING).exists():
            raise ValueError("A decided approval request cannot be changed.")
        super().save(*args, **kwargs)
