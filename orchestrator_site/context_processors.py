def navigation(request):
    """The approvals badge in every page's navigation."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from approvals.models import ApprovalRequest

    return {"pending_approvals": ApprovalRequest.objects.for_user(user).pending().count()}
