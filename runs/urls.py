from django.urls import path, re_path

from runs import views

app_name = "runs"

urlpatterns = [
    path("", views.run_list, name="list"),
    path("new/", views.run_start, name="start"),
    path("stop-everything/", views.stop_everything, name="stop_everything"),
    path("<int:pk>/", views.run_detail, name="detail"),
    path("<int:pk>/events/", views.run_events, name="events"),
    re_path(
        r"^(?P<pk>[0-9]+)/(?P<action>cancel|pause|resume|retry)/$",
        views.run_control,
        name="control",
    ),
    path("<int:pk>/steps/<int:step_pk>/fork/", views.step_fork, name="fork"),
    # The workflow editor's run panel.
    path("editor/<slug:slug>/", views.editor_run, name="editor_run"),
    path(
        "editor/<slug:slug>/status/<int:run_id>/", views.editor_run_status, name="editor_run_status"
    ),
]
