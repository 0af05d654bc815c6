from django.urls import path

from teams import import_views, views

app_name = "teams"

urlpatterns = [
    path("", views.workflow_list, name="list"),
    path("new/", views.workflow_create, name="create"),
    path("import/", import_views.import_workflow_view, name="import"),
    path("gallery/", import_views.gallery, name="gallery"),
    path("gallery/<str:key>/", import_views.create_from_template, name="gallery_create"),
    path("<slug:slug>/export/", import_views.export_workflow_view, name="export"),
    path("<slug:slug>/edit/", views.workflow_editor, name="editor"),
    path("<slug:slug>/draft/", views.workflow_draft, name="draft"),
    path("<slug:slug>/publish/", views.workflow_publish, name="publish"),
    path("<slug:slug>/panel/", views.panel_open, name="panel_open"),
    path("<slug:slug>/panel/apply/", views.panel_apply, name="panel_apply"),
    path("<slug:slug>/agents/new/", views.agent_create, name="agent_create"),
    path("<slug:slug>/versions/", views.workflow_versions, name="versions"),
    path("<slug:slug>/versions/<int:number>/rollback/", views.version_rollback, name="rollback"),
    path("<slug:slug>/diff/", views.workflow_diff, name="diff"),
]
