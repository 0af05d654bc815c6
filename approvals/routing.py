from django.urls import path

from approvals.consumers import ApprovalsConsumer

websocket_urlpatterns = [
    path("ws/approvals/", ApprovalsConsumer.as_asgi(), {"badge_only": False}),
    # Every page's navigation badge: counts only, no inbox rows.
    path("ws/approvals/badge/", ApprovalsConsumer.as_asgi(), {"badge_only": True}),
]
