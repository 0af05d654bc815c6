from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from orchestrator_site import audit
from orchestrator_site.login import ThrottledLoginView

urlpatterns = [
    path("", RedirectView.as_view(url="/runs/", permanent=False)),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("audit/", audit.audit_log, name="audit"),
    path("workflows/", include("teams.urls")),
    path("runs/", include("runs.urls")),
    path("costs/", include("runs.cost_urls")),
    path("approvals/", include("approvals.urls")),
]
