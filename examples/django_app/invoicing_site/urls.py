from __future__ import annotations

from django.urls import include, path

urlpatterns = [
    path("invoices/", include("invoices.urls")),
]
