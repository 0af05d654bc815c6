from approvals.routing import websocket_urlpatterns as approval_patterns
from runs.routing import websocket_urlpatterns as run_patterns

websocket_urlpatterns = [*run_patterns, *approval_patterns]
