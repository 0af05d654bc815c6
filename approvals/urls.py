from django.urls import path

from approvals import views

app_name = "approvals"

urlpatterns = [
    path("", views.inbox, name="inbox"),
    path("bulk/", views.bulk_decide, name="bulk_decide"),
    path("<int:pk>/", views.approval_detail, name="detail"),
    path("<int:pk>/decide/", views.decide, name="decide"),
]
