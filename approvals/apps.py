from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"

    def ready(self):
        # The engine asks for approvals through this one hook; see runs/hooks.py.
        from approvals.requests import open_request
        from runs import hooks

        hooks.register_approval_requester(open_request)
