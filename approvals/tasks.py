"""Celery tasks of the approvals app: thin wrappers around plain functions."""

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mass_mail

from approvals import decisions
from approvals.models import ApprovalRequest


@shared_task(name="approvals.tasks.expire_due_approvals", ignore_result=True)
def expire_due_approvals() -> int:
    """Beat, every few seconds: apply default outcomes to requests past their deadline."""
    return decisions.expire_due_approvals()


@shared_task(name="approvals.tasks.notify_approvers", ignore_result=True)
def notify_approvers(request_id: int) -> int:
    return send_approval_emails(request_id)


def base_url() -> str:
    """Where people reach Baton, for links in emails (BATON_BASE_URL, else the first trusted
    origin, which is the development server by default)."""
    configured = getattr(settings, "BATON_BASE_URL", "")
    if not configured and settings.CSRF_TRUSTED_ORIGINS:
        configured = settings.CSRF_TRUSTED_ORIGINS[0]
    return configured.rstrip("/")


def send_approval_emails(request_id: int) -> int:
    """Email everyone who may decide the request a link to it; return how many were sent."""
    approval = (
        ApprovalRequest.objects.select_related("run__workflow", "step")
        .filter(pk=request_id, status=ApprovalRequest.PENDING)
        .first()
    )
    if approval is None:  # decided (or expired) before the mail went out
        return 0
    link = f"{base_url()}/approvals/{approval.pk}/"
    subject = f"[Baton] Approval needed: {approval.title}"[:200]
    lines = [
        f"Run #{approval.run_id} of {approval.run.workflow.name} is waiting for a decision.",
        "",
        f"{approval.get_kind_display()}: {approval.title}",
    ]
    if approval.due_at:
        lines.append(
            f"Decide by {approval.due_at:%Y-%m-%d %H:%M %Z}; after that the default "
            f"outcome ({approval.default_outcome}) applies."
        )
    lines += ["", f"Approve, edit or reject it here: {link}"]
    body = "\n".join(lines)
    messages = [
        (subject, body, settings.DEFAULT_FROM_EMAIL, [user.email])
        for user in decisions.approvers(approval)
    ]
    return send_mass_mail(messages, fail_silently=False) if messages else 0
