from django.urls import path

from runs import cost_views

app_name = "costs"

urlpatterns = [
    path("", cost_views.cost_report, name="report"),
    path("runs/<int:run_id>/breakdown/", cost_views.run_breakdown, name="run_breakdown"),
]
